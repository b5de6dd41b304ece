#!/usr/bin/env python
"""How tight the error figures stay after adds: the chain bound, the anchored bound and the exact error.

Merges the first ``--merge`` sources, adds the rest one at a time, and after the last add compares,
for every adapter the adds moved, three figures of its relative error:

* chain: its error at merge plus every add's drift (what the tool reported before anchors);
* anchored: what ``report`` says now (``ops.anchors``, ``core.bounds``);
* exact: ``report --against`` the originals.

    python scripts/bound_table.py sample_adapters/* --merge 4 -k 8
    python scripts/bound_table.py --synthetic 16 --merge 8 -k 8     # planted shared subspace, 16 adapters
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sharecompress  # noqa: E402


def chain(entry: dict) -> float:
    mods = entry["modules"].values()
    err2 = sum((m["err2"] ** 0.5 + m.get("drift", 0.0)) ** 2 for m in mods)
    norm2 = sum(m["norm2"] for m in mods)
    return math.sqrt(err2 / norm2) if norm2 else 0.0


def synthetic(folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` adapters of 8 modules 64 × 48, rank 4–8, on a shared 12-dim subspace plus 30 % noise."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = {f"base_model.model.layers.{i}.self_attn.{p}": (64, 48) for i in range(4) for p in ("q_proj", "v_proj")}
    planted = {m: (torch.linalg.qr(torch.randn(n, 12, generator=gen))[0], torch.linalg.qr(torch.randn(d, 12, generator=gen))[0])
               for m, (n, d) in shapes.items()}
    out = []
    for t in range(count):
        rank = 4 + 2 * (t % 3)
        tensors = {}
        for m, (n, d) in shapes.items():
            P, Q = planted[m]
            B = P @ torch.randn(12, rank, generator=gen) + 0.3 * torch.randn(n, rank, generator=gen)
            A = torch.randn(rank, 12, generator=gen) @ Q.T + 0.3 * torch.randn(rank, d, generator=gen)
            tensors[f"{m}.lora_B.weight"], tensors[f"{m}.lora_A.weight"] = B.contiguous(), A.contiguous()
        path = folder / f"task{t:02d}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": "synthetic",
            "target_modules": ["q_proj", "v_proj"]}))
        out.append(str(path))
    return out


def run(sources: list[str], merge: int, k: int, anchors: str, work: Path) -> dict:
    zoo = sharecompress.merge(sources[:merge], work / f"zoo-{anchors}", k=k)
    for source in sources[merge:]:
        zoo.add([source], anchors=None if anchors == "auto" else int(anchors))
    entries = {e["name"]: e for e in zoo.manifest["adapters"]}
    tight = {a["name"]: a for a in zoo.report()["adapters"]}
    exact = {a["name"]: a for a in zoo.report(against=sources)["adapters"]}
    rows = []
    for name, entry in entries.items():
        if entry["exact"]:
            continue
        rows.append({"adapter": name, "chain": chain(entry), "anchored": tight[name]["relative_error"],
                     "exact": exact[name]["relative_error"]})
    moved = {e for e in entries if not entries[e]["exact"]}
    norm2 = {n: entries[n]["norm2"] for n in moved}
    zoo_fig = {}
    for key, source in (("chain", None), ("anchored", tight), ("exact", exact)):
        err2 = sum((chain(entries[n]) if source is None else source[n]["relative_error"]) ** 2 * norm2[n] for n in moved)
        zoo_fig[key] = math.sqrt(err2 / sum(norm2.values())) if moved else 0.0
    return {"rows": rows, "zoo": zoo_fig, "anchor_bytes": zoo.report()["bytes_anchors"],
            "basis_bytes": (work / f"zoo-{anchors}" / zoo.manifest["basis_file"]).stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="*")
    ap.add_argument("--synthetic", type=int, default=0, help="generate this many synthetic adapters instead")
    ap.add_argument("--merge", type=int, required=True, help="how many sources the first merge takes")
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--anchors", nargs="*", default=["auto", "4", "0"], help="auto (the default), or a count")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = synthetic(work / "src", a.synthetic) if a.synthetic else sorted(s for s in a.sources if not s.endswith(".md"))
        results = {n: run(sources, a.merge, a.k, n, work) for n in a.anchors}
    if a.json:
        print(json.dumps(results, indent=2))
        return
    for n, r in results.items():
        z = r["zoo"]
        print(f"\n--anchors {n}: merge {a.merge} + add {len(sources) - a.merge} one at a time, -k {a.k}; "
              f"anchors cost {r['anchor_bytes'] / 1e6:.2f} MB (basis file {r['basis_bytes'] / 1e6:.2f} MB)")
        print("| adapter | chain | anchored | exact | chain / exact | anchored / exact |")
        print("|---|---|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['adapter']} | {row['chain']:.4f} | {row['anchored']:.4f} | {row['exact']:.4f} | "
                  f"{row['chain'] / row['exact']:.2f}× | {row['anchored'] / row['exact']:.2f}× |")
        print(f"| **moved adapters together** | {z['chain']:.4f} | {z['anchored']:.4f} | {z['exact']:.4f} | "
              f"{z['chain'] / z['exact']:.2f}× | {z['anchored'] / z['exact']:.2f}× |")
        worst = max((row["anchored"] / row["exact"] for row in r["rows"]), default=0.0)
        print(f"worst adapter anchored / exact: {worst:.2f}×; every anchored ≥ exact: "
              f"{all(row['anchored'] >= row['exact'] * (1 - 1e-9) for row in r['rows'])}")


if __name__ == "__main__":
    main()
