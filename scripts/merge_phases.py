"""Where one merge's time goes, phase by phase, in process: a diagnostic for a machine lent briefly.

Runs ``sharecompress.merge`` on a directory of adapter directories with the merge's own steps
wrapped in timers (the names below are functions of ``sharecompress.ops.merge``; a renamed one
stops this script with an AttributeError rather than time nothing). On a GPU each batch's
compute is followed by a synchronisation, so that its time is the device's too. Phases nest
(reading runs in the reader's thread, alongside the rest; "batches" holds compute, filing and
writing), so they do not add up to the whole.

    python scripts/merge_phases.py /tmp/sharecompress_gpu_bench/src-500x32x4096-r16 --device cuda
    python scripts/merge_phases.py /tmp/bench13/zoo-128x8x1024-r16 --zoo /tmp/phases-zoo
    python scripts/merge_phases.py SRC --device cuda --sketch-half bfloat16   # the GPU's sketch in bfloat16 too

With two compute workers (the package's choice on a CPU where torch has two threads or more,
``ops.merge.compute_workers``) the compute phases add up both workers' time, and the main
thread's waits include its waits on them; ``--workers 1`` times one batch after another.

``--sketch-half`` overrides ``sharecompress.core.linalg.fast_half``, the choice of the dtype the
sketch's early power iterations run in (auto: bfloat16 on a CPU with native bfloat16 products,
float32 elsewhere), so that one machine can time both and compare the zoo's error.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

PHASES = [  # (function in sharecompress.ops.merge, label, synchronise the GPU after it)
    ("find_adapters", "finding and parsing the adapters", False),
    ("_build", "batches, filing and writing (all of _build)", False),
    ("load_stacked", "reading (the reader's thread, overlapped)", False),
    ("compress_stacked", "compute of the batches", True),
    ("nearest_twin", "lora_A cosines", True),
    ("held_out_errors", "held-out errors", True),
    ("_collect", "filing each module's results", False),
    ("write_zoo_files", "writing the zoo's files", False),
    ("manifest_bytes", "the manifest (checked, encoded)", False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", type=Path, help="a directory of adapter directories")
    ap.add_argument("--zoo", type=Path, default=None, help="where the zoo goes (default: a temporary directory, removed)")
    ap.add_argument("-k", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sketch-half", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="dtype of the sketch's early power iterations (default: the package's own choice)")
    ap.add_argument("--workers", type=int, default=None,
                    help="batches computed at once (default: the package's own choice, ops.merge.compute_workers)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    import torch

    import sharecompress.ops.merge as merge_module
    from sharecompress.core import linalg
    from sharecompress.zoo import Zoo

    device = merge_module.resolve_device(args.device)
    if args.sketch_half != "auto":
        half = None if args.sketch_half == "float32" else torch.bfloat16
        linalg.fast_half = lambda _device: half
    half = linalg.fast_half(device)
    if args.workers is not None and args.workers < 1:
        ap.error("--workers must be at least 1")
    if args.workers is not None:
        merge_module.compute_workers = lambda _device: args.workers
    workers = merge_module.compute_workers(device)
    if device.type == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    started = time.perf_counter() - t0
    spent: dict[str, float] = {}
    lock = threading.Lock()

    def timed(name: str, label: str, sync: bool) -> None:
        inner = getattr(merge_module, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                if sync and device.type == "cuda":
                    torch.cuda.synchronize()
                with lock:
                    spent[label] = spent.get(label, 0.0) + time.perf_counter() - t

        setattr(merge_module, name, wrapper)

    for name, label, sync in PHASES:
        timed(name, label, sync)
    result = Future.result

    def waited(self, timeout=None):  # the main thread waiting on the reader or the hashers
        t = time.perf_counter()
        try:
            return result(self, timeout)
        finally:
            if threading.current_thread() is threading.main_thread():
                with lock:
                    spent[waits] = spent.get(waits, 0.0) + time.perf_counter() - t

    waits = "main thread waiting on reads or hashes" + (" or the compute workers" if workers > 1 else "")
    Future.result = waited
    target = args.zoo or Path(tempfile.mkdtemp(prefix="merge_phases_")) / "zoo"
    sources = sorted(str(p) for p in args.sources.iterdir() if p.is_dir())
    t = time.perf_counter()
    try:
        merge_module.merge(sources, target, k=args.k, force=True, device=str(device))
    finally:
        Future.result = result
    total = time.perf_counter() - t
    error = Zoo.open(target).report()["relative_error"]
    print(f"{len(sources)} adapters from {args.sources}, -k {args.k}, on {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}; "
          f"sketch's early iterations: {f'{half} where a batch’s spectrum allows' if half else torch.float32}; "
          f"{workers} compute worker{'s' if workers > 1 else ''} on {torch.get_num_threads() // workers or 1} thread(s) each; "
          f"zoo relative error {error:.6f}")
    print(f"\n| phase | seconds |\n|---|---:|\n| importing torch (and starting CUDA) | {started:.2f} |\n| merge() | {total:.2f} |")
    for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {seconds:.2f} |")
    if args.zoo is None:
        shutil.rmtree(target.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
