"""Benchmark `sharecompress merge` against the read floor, a dense baseline and lorashare.

One run, one machine: every contender runs as its own process on the same synthetic zoo
(Llama-like keys, q/k/v/o, fp16, a planted shared subspace plus noise), and is timed from
outside with its peak memory taken from the kernel's accounting of that process (wait4).
Errors are relative ‖ΔW − ΔŴ‖_F over the whole zoo, measured exactly from factors.

    python scripts/bench.py --adapters 128 --layers 8 --hidden 1024 --rank 16 -k 32 --repeat 5
    python scripts/bench.py --curve 64,128,256,512 --layers 8 --hidden 1024 --rank 16 -k 32

``--curve`` measures only the read floor and merge, on the first N adapters of one zoo for
each N, and prints each one's cost per adapter: it should stay flat as the zoo grows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_zoo import generate, module_shapes  # noqa: E402

READ_FLOOR = """
import sys, torch
from safetensors import safe_open
for path in sys.argv[1:]:
    with safe_open(path + "/adapter_model.safetensors", "pt") as fh:
        for key in fh.keys():
            fh.get_tensor(key)
"""

DENSE_BASELINE = """
import json, sys, torch
from sharecompress.io.readers import find_adapters
k = int(sys.argv[1]); modules = int(sys.argv[2]); adapters = find_adapters(sys.argv[3:])
names = sorted(adapters[0].modules)[:modules]
err2 = norm2 = 0.0
for m in names:
    deltas = [a.modules[m].scale * (lambda b, a_: b @ a_)(*a.factors(m, torch.float32)) for a in adapters]
    U = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)[0][:, :k]
    V = torch.linalg.svd(torch.cat(deltas, dim=0), full_matrices=False)[2][:k].T
    for dw in deltas:
        rec = U @ (U.T @ dw @ V) @ V.T
        err2 += float(((dw - rec).double() ** 2).sum()); norm2 += float((dw.double() ** 2).sum())
print(json.dumps({"relative_error": (err2 / norm2) ** 0.5}))
"""

LORASHARE_ERROR = """
import json, sys, torch
from sharecompress.io.readers import find_adapters
originals, rebuilt = find_adapters(sys.argv[2:]), {a.name: a for a in find_adapters([sys.argv[1]])}
err2 = norm2 = 0.0
for a in originals:
    b2 = rebuilt[a.name]
    for m, spec in a.modules.items():
        B, A = a.factors(m); B2, A2 = b2.factors(m)
        X = torch.cat([spec.scale * B, -b2.modules[m].scale * B2], 1); Y = torch.cat([A, A2], 0)
        err2 += float(((X.T @ X) * (Y @ Y.T)).sum()); norm2 += float(spec.scale ** 2 * ((B.T @ B) * (A @ A.T)).sum())
print(json.dumps({"relative_error": (max(err2, 0.0) / norm2) ** 0.5}))
"""


def run(argv: list[str], env: dict | None = None) -> dict:
    """Run one process; its wall time, peak RSS (MB) and stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(argv[:4])} …\n{err.decode()[-2000:]}")
    return {"wall_s": wall, "peak_mb": usage.ru_maxrss / 1024, "stdout": out.decode()}


def sharecompress_merge(sources: list[str], zoo: Path, k: int) -> dict:
    result = run([sys.executable, "-m", "sharecompress", "merge", *sources, "--zoo", str(zoo), "-k", str(k), "-q", "--force"])
    report = json.loads(run([sys.executable, "-m", "sharecompress", "report", "--zoo", str(zoo), "--json"])["stdout"])
    result["relative_error"] = report["relative_error"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("-k", type=int, default=32)
    ap.add_argument("--baseline-adapters", type=int, default=16, help="subset for the dense baseline")
    ap.add_argument("--baseline-modules", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-lorashare", action="store_true")
    ap.add_argument("--no-dense", action="store_true", help="leave out the dense baseline and its small zoo")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of every contender (medians are shown)")
    ap.add_argument("--curve", default=None, help="comma-separated zoo sizes: cost per adapter as the zoo grows")
    args = ap.parse_args()
    if args.curve:
        return cost_curve(args, [int(x) for x in args.curve.split(",")])

    work = args.workdir or Path(tempfile.mkdtemp(prefix="sharebench-"))
    zoo_src = work / f"zoo-{args.adapters}x{args.layers}x{args.hidden}-r{args.rank}"
    if not zoo_src.exists():
        generate(zoo_src, args.adapters, module_shapes(args.layers, args.hidden, None, ["q_proj", "k_proj", "v_proj", "o_proj"]), args.rank)
    sources = sorted(str(p) for p in zoo_src.iterdir())
    size = sum(f.stat().st_size for p in zoo_src.iterdir() for f in p.iterdir())
    print(f"zoo: {len(sources)} adapters × {args.layers * 4} modules of {args.hidden}×{args.hidden}, rank {args.rank}, "
          f"fp16, {size / 1e6:.0f} MB; k = {args.k}; torch threads {os.cpu_count()} cores")

    def lorashare_run() -> dict:
        out = work / "lorashare"
        shutil.rmtree(out, ignore_errors=True)
        cli = [sys.executable, "-c", "import sys; from lorashare.cli import main; sys.exit(main())"]
        result = run([*cli, "compress", *sources, "-o", str(out), "-k", str(args.k), "--device", "cpu"])
        rec = work / "lorashare-rec"
        shutil.rmtree(rec, ignore_errors=True)
        run([*cli, "reconstruct", str(out), "--all", "-o", str(rec)])
        result["relative_error"] = json.loads(run([sys.executable, "-c", LORASHARE_ERROR, str(rec), *sources])["stdout"])["relative_error"]
        return result

    # The dense baseline (materialize each ΔW, stack, SVD) cannot finish on the whole zoo:
    # it and merge both run on a smaller zoo of the same shapes.
    sub_dir = work / f"subset-{args.baseline_adapters}x{args.baseline_modules}x{args.hidden}-r{args.rank}"
    if not sub_dir.exists():
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"][: args.baseline_modules]
        generate(sub_dir, args.baseline_adapters, module_shapes(1, args.hidden, None, targets), args.rank)
    sub_sources = sorted(str(p) for p in sub_dir.iterdir())
    label = f"{len(sub_sources)} adapters × {args.baseline_modules} modules"

    def dense_run() -> dict:
        result = run([sys.executable, "-c", DENSE_BASELINE, str(args.k), str(args.baseline_modules), *sub_sources])
        result["relative_error"] = json.loads(result["stdout"])["relative_error"]
        return result

    floor_name, merge_name, ls_name = ("read floor (import torch + read every tensor)", "sharecompress merge",
                                       "lorashare 0.1.3 compress (same zoo, same k)")
    contenders = {
        floor_name: lambda: run([sys.executable, "-c", READ_FLOOR, *sources]),
        merge_name: lambda: sharecompress_merge(sources, work / "zoo", args.k),
    }
    if not args.no_dense:
        contenders[f"dense baseline ({label})"] = dense_run
        contenders[f"sharecompress merge ({label})"] = lambda: sharecompress_merge(sub_sources, work / "zoo-sub", args.k)
    if not args.no_lorashare and importlib.util.find_spec("lorashare"):
        contenders[ls_name] = lorashare_run
    # Each round runs every contender once, in turn, so that a drift of the machine's speed touches
    # all of them; figures are medians over rounds, and ratios the median of each round's ratio.
    rounds = [{name: go() for name, go in contenders.items()} for _ in range(args.repeat)]
    median = lambda values: statistics.median(values)  # noqa: E731

    print(f"\n{args.repeat} rounds; medians\n\n| run | wall s | peak MB | relative error |\n|---|---:|---:|---:|")
    for name in contenders:
        walls, peaks = [r[name]["wall_s"] for r in rounds], [r[name]["peak_mb"] for r in rounds]
        err = rounds[-1][name].get("relative_error")
        print(f"| {name} | {median(walls):.2f} | {median(peaks):.0f} | {'—' if err is None else f'{err:.4f}'} |")
    ratio = lambda a, b, key="wall_s": median([r[a][key] / r[b][key] for r in rounds])  # noqa: E731

    def spread(a: str, b: str) -> str:  # each round's ratio, lowest to highest: a target is met or not in each
        each = sorted(r[a]["wall_s"] / r[b]["wall_s"] for r in rounds)
        return f"{ratio(a, b):.3f}× (rounds {each[0]:.3f}–{each[-1]:.3f})"

    print(f"\nmerge / read floor: {spread(merge_name, floor_name)}")
    if not args.no_dense:
        print(f"dense baseline / merge on the small zoo: {ratio(f'dense baseline ({label})', f'sharecompress merge ({label})'):.2f}×")
    if ls_name in contenders:
        print(f"merge / lorashare: {spread(merge_name, ls_name)} wall time, {ratio(merge_name, ls_name, 'peak_mb'):.2f}× peak memory; "
              f"error {rounds[-1][merge_name]['relative_error']:.4f} against {rounds[-1][ls_name]['relative_error']:.4f}")


def cost_curve(args, sizes: list[int]) -> None:
    """Read floor and merge on the first N adapters of one zoo, for each N."""
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sharebench-"))
    zoo_src = work / f"zoo-{max(sizes)}x{args.layers}x{args.hidden}-r{args.rank}"
    if not zoo_src.exists():
        generate(zoo_src, max(sizes), module_shapes(args.layers, args.hidden, None, ["q_proj", "k_proj", "v_proj", "o_proj"]), args.rank)
    every = sorted(str(p) for p in zoo_src.iterdir())
    print(f"{args.layers * 4} modules of {args.hidden}×{args.hidden}, rank {args.rank}, fp16; k = {args.k}; {os.cpu_count()} cores")
    print("\n| adapters | read floor s | merge s | merge ms / adapter | merge / floor | peak MB | relative error |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        sources = every[:size]
        floor = run([sys.executable, "-c", READ_FLOOR, *sources])
        merge = sharecompress_merge(sources, work / f"zoo-curve-{size}", args.k)
        print(f"| {size} | {floor['wall_s']:.2f} | {merge['wall_s']:.2f} | {1000 * merge['wall_s'] / size:.1f} | "
              f"{merge['wall_s'] / floor['wall_s']:.2f}× | {merge['peak_mb']:.0f} | {merge['relative_error']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
