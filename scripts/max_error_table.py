#!/usr/bin/env python
"""What ``--max-error X`` costs: private residuals against raising k for everyone.

For each k and each X: merge with ``-k K --max-error X`` and report the bytes the residuals add,
how many adapters hold one, and the worst adapter's exact error (``report --against``); then the
smallest uniform k whose worst adapter is ≤ X without residuals, and its bytes (bases and cores).

    python scripts/max_error_table.py sample_adapters/* -k 8 16 --max-error 0.3 0.2 0.1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sharecompress  # noqa: E402


def worst(zoo, sources) -> float:
    return max(a["relative_error"] for a in zoo.report(against=sources)["adapters"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("-k", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--max-error", type=float, nargs="+", default=[0.3, 0.2, 0.1])
    a = ap.parse_args()
    sources = sorted(s for s in a.sources if not s.endswith(".md"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plain = {}  # k → (bytes of bases and cores, worst exact error)

        def uniform(k: int) -> tuple[int, float]:
            if k not in plain:
                zoo = sharecompress.merge(sources, work / f"k{k}", k=k)
                r = zoo.report()
                plain[k] = (r["bytes_basis"] + r["bytes_coefficients"], worst(zoo, sources))
            return plain[k]

        for k in a.k:
            base_bytes, base_worst = uniform(k)
            for x in a.max_error:
                zoo = sharecompress.merge(sources, work / f"k{k}-x{x}", k=k, max_error=x)
                r = zoo.report()
                held = sum(1 for e in r["adapters"] if e["bytes_residual"])
                k_needed = next((kk for kk in range(k, 257) if uniform(kk)[1] <= x), None)
                rows.append((k, x, base_worst, r["bytes_residual"], held, len(r["adapters"]), base_bytes,
                             base_bytes + r["bytes_residual"], worst(zoo, sources), k_needed,
                             uniform(k_needed)[0] if k_needed else None, r["relative_error"]))
    print("| `-k` | `--max-error` | worst adapter without | residual bytes | adapters holding one | "
          "bases + cores + residuals | worst adapter with (exact) | uniform k for the same worst | its bytes |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, x, before, res, held, total, base, with_res, after, kk, kk_bytes, _ in rows:
        print(f"| {k} | {x:g} | {before:.4f} | {res / 1e3:,.1f} kB | {held} of {total} | {with_res / 1e3:,.1f} kB "
              f"(+{100 * res / base:.0f} %) | {after:.4f} | {kk if kk else '> 256'} | "
              f"{f'{kk_bytes / 1e3:,.1f} kB' if kk_bytes else '—'} |")


if __name__ == "__main__":
    main()
