#!/usr/bin/env python
"""Budget against uniform k against the energy rule, at equal bytes, on the same adapters.

For each uniform -k, the zoo's all-in bytes (bases + cores) become the budget of a
``--budget`` merge, and ``--energy`` is bisected to the largest target whose zoo fits in
the same bytes. Every zoo error is the tool's own exact figure (``report --json``).

    python scripts/budget_table.py sample_adapters/* --k 8 16 32
"""

from __future__ import annotations

import argparse
import glob
import shutil
import tempfile
import time
from pathlib import Path

import sharecompress


def merged(sources, path, **rule):
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    zoo = sharecompress.merge(sources, path, **rule)
    seconds = time.perf_counter() - t0
    report = zoo.report()
    return report["bytes_compressed"], report["relative_error"], seconds


def energy_at(sources, path, size, steps=12):
    """The largest --energy whose zoo fits in ``size`` bytes (bisection), with its bytes and error."""
    low, high, found = 0.05, 0.9999, None
    for _ in range(steps):
        mid = (low + high) / 2
        used, error, _ = merged(sources, path, energy=mid)
        if used <= size:
            low, found = mid, (mid, used, error)
        else:
            high = mid
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--k", type=int, nargs="+", default=[8, 16, 32])
    args = ap.parse_args(argv)
    sources = sorted(p for s in args.sources for p in (glob.glob(s) or [s]) if Path(p).is_dir() or p.endswith(".safetensors"))
    work = Path(tempfile.mkdtemp(prefix="budget_table."))
    rows = []
    try:
        for k in args.k:
            size, uniform, t_uniform = merged(sources, work / "uniform", k=k)
            used, budgeted, t_budget = merged(sources, work / "budget", budget=size)
            energy = energy_at(sources, work / "energy", size)
            rows.append((k, size, uniform, used, budgeted, energy, t_uniform, t_budget))
            print(f"k={k}: {size} B uniform {uniform:.4f}; budget {used} B {budgeted:.4f}; energy {energy}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| uniform -k | bytes (all-in) | uniform k error | --budget error (bytes) | vs uniform | --energy error at ≤ the same bytes (target, bytes) | merge time uniform / budget |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k, size, uniform, used, budgeted, energy, t_u, t_b in rows:
        shown = f"{energy[2]:.4f} ({energy[0]:.4f}, {energy[1]:,})" if energy else "none fits"
        print(f"| {k} | {size:,} | {uniform:.4f} | {budgeted:.4f} ({used:,}) | {100 * (budgeted / uniform - 1):+.1f}% | {shown} | {t_u:.1f} s / {t_b:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
