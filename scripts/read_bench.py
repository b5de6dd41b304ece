"""How fast a merge's reader fills its stacks, with the main thread idle and with it busy in Python.

Reads every batch of a zoo of adapters (``ops.merge.load_stacked``, as a merge plans them) into
two alternating sets of buffers, with ``--threads`` file readers, and prints the best of three
passes. ``--busy`` keeps the main thread in a pure-Python loop meanwhile, as a merge's main thread
is while it files results and writes: each read then waits for Python's lock, and the number of
reads, not their bytes, sets the time (docs/speed.md).

    python scripts/read_bench.py /tmp/bench13/zoo-128x8x1024-r16 --threads 1
    python scripts/read_bench.py /tmp/bench13/zoo-128x8x1024-r16 --threads 1 --busy
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sharecompress.core.scratch import Scratch
from sharecompress.io.readers import find_adapters
from sharecompress.ops.merge import load_stacked, module_shapes, plan_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo", type=Path, help="a directory of adapter directories (scripts/synthetic_zoo.py makes one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--busy", action="store_true", help="keep the main thread running Python meanwhile")
    args = ap.parse_args()
    adapters = find_adapters(sorted(str(p) for p in args.zoo.iterdir() if p.is_dir()))
    batches = plan_batches(module_shapes(adapters), adapters)
    holders = {m: [a for a in adapters if m in a.modules] for batch in batches for m in batch}
    pool = ThreadPoolExecutor(args.threads)
    slots = (Scratch(), Scratch())

    def read_all() -> float:
        t = time.perf_counter()
        for i, batch in enumerate(batches):
            load_stacked(holders[batch[0]], batch, pool, slots[i % 2])
        return time.perf_counter() - t

    read_all()  # the buffers' first touch and the page cache
    result: list[float] = []
    reader = threading.Thread(target=lambda: result.extend(read_all() for _ in range(3)))
    reader.start()
    if args.busy:
        x = 0
        while reader.is_alive():
            for i in range(1000):
                x += i
    reader.join()
    tensors = sum(len(holders[b[0]]) * len(b) * 2 for b in batches)
    best = min(result)
    print(f"{len(adapters)} adapters, {len(batches)} batches, {tensors} tensors; {args.threads} reader thread(s), "
          f"main thread {'busy' if args.busy else 'idle'}: {best:.3f} s, {best / tensors * 1e6:.1f} µs per tensor")


if __name__ == "__main__":
    main()
