"""Merge benchmark at 7B shape on a GPU: read floors, ``sharecompress merge --device cuda``, zoo error.

Generates (or reuses) a synthetic zoo of PEFT adapters (Llama-like keys, q/k/v/o of
hidden × hidden per layer, fp16, a planted shared subspace plus noise: the distribution of
``scripts/synthetic_zoo.py``, drawn on the GPU and written with raw parallel writes), then times,
each as its own process from the outside (wall, and peak RSS from wait4):

- the GPU read floor: read every adapter's tensors with safetensors and move them to the GPU
  (synchronized at the end); cold (the sources evicted from the page cache with fsync +
  POSIX_FADV_DONTNEED) and warm;
- the CPU read floor (safetensors, every tensor, warm);
- ``python3 -m sharecompress merge SOURCES --zoo Z -k K --device cuda -q --force`` (warm), with
  GPU utilisation sampled by nvidia-smi and every thread's Python stack sampled four times a
  second from inside (a profile that says where the time went);
- the zoo's relative error from ``sharecompress report --json``.

    python scripts/gpu_bench.py                       # 500 adapters, 32 layers, 4096, rank 16, -k 32
    python scripts/gpu_bench.py --small               # 8 adapters, 2 layers, 256: a smoke test (CPU works)

Prints a markdown table; writes the results as JSON to ``--json`` (default ``$OUT/gpu_bench.json``
when $OUT is set), rewritten after every step so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROJ = "self_attn"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SHARED, NOISE = 24, 0.3  # as scripts/synthetic_zoo.py

FLOOR = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from safetensors import safe_open
device = sys.argv[1]
if device.startswith("cuda"):
    torch.zeros(1, device=device); torch.cuda.synchronize()
t1 = time.perf_counter()
nbytes = 0
for path in sys.argv[2:]:
    with safe_open(path + "/adapter_model.safetensors", "pt") as fh:
        for key in fh.keys():
            t = fh.get_tensor(key)
            if device != "cpu":
                t = t.to(device)
            nbytes += t.numel() * t.element_size()
if device.startswith("cuda"):
    torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({"bytes": nbytes, "import_init_s": t1 - t0, "read_s": t2 - t1}))
"""

# python3 -m sharecompress under a sampling profiler: a daemon thread reads every thread's stack
# (sys._current_frames) every GPU_BENCH_SAMPLE_S seconds and rewrites the counts to GPU_BENCH_PROFILE
# every few seconds, so a run that is killed still leaves its profile. No signals are sent to it.
MERGE_WRAPPER = r"""
import collections, json, os, runpy, sys, threading, time, traceback
_lock, _counts, _samples = threading.Lock(), collections.Counter(), collections.Counter()
def _dump(path, every):
    with _lock:
        data = {"every_s": every, "samples": dict(_samples), "counts": _counts.most_common(400)}
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh)
    os.replace(path + ".tmp", path)
def _sample(path, every):
    me, last = threading.get_ident(), time.monotonic()
    while not _stop.wait(every):
        names = {t.ident: t.name for t in threading.enumerate()}
        seen = []
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            stack = traceback.extract_stack(frame)
            ours = [f for f in stack if "/sharecompress/" in f.filename]
            leaf = stack[-1]
            if not ours and leaf.name in ("wait", "_worker", "get"):
                continue  # an idle pool thread
            where = f"{os.path.basename(leaf.filename)}:{leaf.lineno} {leaf.name}"
            if ours and ours[-1] is not leaf:
                o = ours[-1]
                where += f"  <- {os.path.basename(os.path.dirname(o.filename))}/{os.path.basename(o.filename)}:{o.lineno} {o.name}"
            seen.append((names.get(ident, "?"), where))
        with _lock:
            for thread, where in seen:
                _counts[thread + "  " + where] += 1
                _samples[thread] += 1
        if time.monotonic() - last > 2.0:
            last = time.monotonic()
            _dump(path, every)
_path, _stop = os.environ.get("GPU_BENCH_PROFILE"), threading.Event()
if _path:
    _every = float(os.environ.get("GPU_BENCH_SAMPLE_S", "0.25"))
    _sampler = threading.Thread(target=_sample, args=(_path, _every), daemon=True)
    _sampler.start()
sys.argv[0] = "sharecompress"
try:
    runpy.run_module("sharecompress", run_name="__main__", alter_sys=True)
finally:  # the sampler stopped and joined before the interpreter winds down (2 of 3 profiled runs
    if _path:  # with it still running at exit ended in SIGABRT, "terminate called without an active exception")
        _stop.set()
        _sampler.join()
        _dump(_path, _every)
"""


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# generation


def module_names(layers: int) -> list[str]:
    return [f"model.layers.{layer}.{PROJ}.{proj}" for layer in range(layers) for proj in TARGETS]


def header_bytes(names: list[str], hidden: int, rank: int) -> tuple[bytes, list[tuple[int, str]]]:
    """The safetensors header (identical for every adapter) and the data order: (module index, 'A'|'B')."""
    keys = {}
    for i, m in enumerate(names):
        keys[f"base_model.model.{m}.lora_A.weight"] = (i, "A", [rank, hidden])
        keys[f"base_model.model.{m}.lora_B.weight"] = (i, "B", [hidden, rank])
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    order, offset = [], 0
    for key in sorted(keys):
        i, side, shape = keys[key]
        size = shape[0] * shape[1] * 2
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
        order.append((i, side))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def generate(out: Path, adapters: int, layers: int, hidden: int, rank: int, device: str, jobs: int, seed: int = 0) -> dict:
    """Write ``adapters`` PEFT dirs under ``out`` (fp16); the tensors are drawn on ``device``."""
    import torch

    names = module_names(layers)
    M, n = len(names), hidden
    head, order = header_bytes(names, hidden, rank)
    config = json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "synthetic/llama-like",
        "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(TARGETS),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
    })
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    P = torch.linalg.qr(torch.randn(M, n, SHARED, generator=gen, device=device))[0]
    Q = torch.linalg.qr(torch.randn(M, n, SHARED, generator=gen, device=device))[0]
    scale = NOISE / math.sqrt(n) * math.sqrt(SHARED)
    out.mkdir(parents=True, exist_ok=True)
    slots = threading.Semaphore(2 * jobs)  # bounds the host memory in flight
    written = [0]

    def write(t: int, data) -> None:
        try:
            path = out / f"adapter_{t:04d}"
            path.mkdir(exist_ok=True)
            with open(path / "adapter_model.safetensors", "wb") as fh:
                fh.write(head)
                fh.write(memoryview(data.numpy()).cast("B"))
            (path / "adapter_config.json").write_text(config)
            written[0] += len(head) + data.numel() * 2
        finally:
            slots.release()

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = []
        for t in range(adapters):
            B = P @ torch.randn(M, SHARED, rank, generator=gen, device=device) \
                + scale * torch.randn(M, n, rank, generator=gen, device=device)
            A = torch.randn(M, rank, SHARED, generator=gen, device=device) @ Q.mT / math.sqrt(n) \
                + NOISE * torch.randn(M, rank, n, generator=gen, device=device) / math.sqrt(n)
            B, A = (B * 0.05).half(), A.half()
            data = torch.cat([(A if side == "A" else B)[i].reshape(-1) for i, side in order]).cpu()
            slots.acquire()
            futures.append(pool.submit(write, t, data))
        for f in futures:
            f.result()
    secs = time.perf_counter() - t0
    return {"seconds": secs, "bytes": written[0], "adapters": adapters, "device": device, "jobs": jobs}


def zoo_params(args) -> dict:
    return {"adapters": args.adapters, "layers": args.layers, "hidden": args.hidden, "rank": args.rank, "format": 1}


def evict(paths: list[Path], jobs: int) -> dict:
    """fsync every source file and drop it from the page cache (POSIX_FADV_DONTNEED: no root needed)."""
    t0 = time.perf_counter()
    ok = [0]

    def one(p: Path) -> None:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            ok[0] += 1
        finally:
            os.close(fd)

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, paths))
        error = None
    except Exception as exc:  # noqa: BLE001
        error = repr(exc)
    return {"seconds": time.perf_counter() - t0, "files": ok[0], "error": error}


def fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-PT", str(path)], capture_output=True, text=True, timeout=10).stdout.splitlines()
        return out[-1].split()[1] if len(out) > 1 else "?"
    except Exception:  # noqa: BLE001
        return "?"


def pick_workdir(need: int, requested: Path | None) -> Path:
    if requested is not None:
        return requested
    candidates = [Path(tempfile.gettempdir()), Path("/var/tmp"), ROOT / ".gpu_bench_work", Path("/dev/shm")]
    for c in candidates:
        try:
            c.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(c).free > 1.1 * need + (2 << 30):
                return c / "sharecompress_gpu_bench"
        except OSError:
            continue
    raise SystemExit(f"no directory with {need / 1e9:.1f} GB free among {', '.join(map(str, candidates))}")


# ------------------------------------------------------------------------------------------------
# timed processes


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run(argv: list[str], limit: float, *, gpu_sample: bool = False, name: str = "run", logdir: Path | None = None,
        env: dict | None = None) -> dict:
    """One process, timed from outside: wall, peak RSS (wait4), rc, stdout, stderr tail.

    ``gpu_sample``: sample GPU utilisation and memory with nvidia-smi meanwhile.
    """
    logdir = logdir or Path(tempfile.mkdtemp(prefix="gpu_bench_logs_"))
    out_path, err_path = logdir / f"{name}.stdout", logdir / f"{name}.stderr"
    sampler, samples_path = None, logdir / f"{name}.nvidia-smi.csv"
    if gpu_sample and shutil.which("nvidia-smi"):
        sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                    "-lms", "250"], stdout=open(samples_path, "w"), stderr=subprocess.DEVNULL)
    start = time.perf_counter()
    with open(out_path, "wb") as so, open(err_path, "wb") as se:
        proc = subprocess.Popen(argv, stdout=so, stderr=se, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - start
            if elapsed > limit:
                timed_out = True
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    result = {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode, "timed_out": timed_out,
              "user_s": usage.ru_utime, "sys_s": usage.ru_stime}
    if sampler is not None:
        sampler.terminate()
        sampler.wait()
        util, mem = [], []
        for line in samples_path.read_text().splitlines():
            try:
                u, m = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            util.append(u)
            mem.append(m)
        if util:
            result["gpu_util_mean_pct"] = sum(util) / len(util)
            result["gpu_util_busy_share"] = sum(u > 0 for u in util) / len(util)
            result["gpu_mem_peak_mb"] = max(mem)
    result["stdout"] = out_path.read_text(errors="replace")
    err = err_path.read_text(errors="replace")
    result["stderr_tail"] = err[-3000:]
    return result


def read_profile(path: Path, top: int = 25) -> dict | None:
    """The merge's sampled profile: per thread, the share of samples at each place."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    samples = data["samples"]
    rows, by_function = [], collections.Counter()
    for label, count in data["counts"]:
        thread, where = label.split("  ", 1)
        rows.append((label, count, count / max(samples.get(thread, 1), 1)))
        place = where.split("  <- ", 1)[-1]  # the innermost sharecompress frame, else the leaf
        file_line, _, function = place.partition(" ")
        by_function[f"{thread}  {file_line.rsplit(':', 1)[0]} {function}"] += count
    functions = [(label, count, count / max(samples.get(label.split("  ", 1)[0], 1), 1))
                 for label, count in by_function.most_common(top)]
    main = [row for row in rows if row[0].startswith("MainThread  ")][:top]  # the compute's own thread, apart
    return {"every_s": data["every_s"], "samples": samples, "top": rows[:top], "functions": functions, "main": main}


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=500)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("-k", type=int, default=32)
    ap.add_argument("--small", action="store_true", help="8 adapters, 2 layers, hidden 256, -k 8 (unless given)")
    ap.add_argument("--device", default="auto", help="merge device: auto (cuda when present), cuda, cpu")
    ap.add_argument("--workdir", type=Path, default=None, help="where the sources and the zoo go (not $OUT)")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 4))
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting new steps after this (whole script)")
    ap.add_argument("--no-cold", action="store_true", help="skip evicting the sources and the cold floor")
    ap.add_argument("--no-cpu-floor", action="store_true", help="skip the CPU read floor")
    ap.add_argument("--evict-cap-s", type=float, default=30.0, help="longest wait for fsync + eviction before the cold floor")
    ap.add_argument("--sample-s", type=float, default=0.25, help="seconds between stack samples of the merge (its profile)")
    ap.add_argument("--clean", action="store_true", help="remove sources and zoo at the end")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.small:
        dflt = ap.parse_args([])
        for key, small in (("adapters", 8), ("layers", 2), ("hidden", 256), ("k", 8)):
            if getattr(a, key) == getattr(dflt, key):
                setattr(a, key, small)
        if a.budget_s == dflt.budget_s:
            a.budget_s = 120.0
    deadline = Deadline(a.budget_s)
    t_script = time.perf_counter()

    import torch

    has_cuda = torch.cuda.is_available()
    device = ("cuda" if has_cuda else "cpu") if a.device == "auto" else a.device
    if device.startswith("cuda") and not has_cuda:
        log("--device cuda but no CUDA device here: merging on the CPU instead")
        device = "cpu"
    gen_device = "cuda" if has_cuda else "cpu"
    out_env = os.environ.get("OUT")
    json_path = a.json or (Path(out_env) / "gpu_bench.json" if out_env else None)
    logdir = Path(out_env) / "gpu_bench_logs" if out_env else Path(tempfile.mkdtemp(prefix="gpu_bench_logs_"))
    logdir.mkdir(parents=True, exist_ok=True)

    per_adapter = 4 * a.layers * (2 * a.hidden * a.rank * 2) + 4096
    need = a.adapters * per_adapter
    work = pick_workdir(need, a.workdir)
    src = work / f"src-{a.adapters}x{a.layers}x{a.hidden}-r{a.rank}"
    gpu_name = torch.cuda.get_device_name() if has_cuda else None
    res: dict = {
        "config": {**zoo_params(a), "k": a.k, "merge_device": device, "gpu": gpu_name, "cores": os.cpu_count(),
                   "torch": torch.__version__, "workdir": str(work), "sources_dir": str(src), "workdir_fs": None, "source_bytes": need},
        "steps": {},
    }

    def save() -> None:
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            slim = json.loads(json.dumps(res, default=str))
            json_path.write_text(json.dumps(slim, indent=1))

    log(f"{a.adapters} adapters × {4 * a.layers} modules of {a.hidden}×{a.hidden}, rank {a.rank}, fp16 "
        f"({need / 1e9:.2f} GB); -k {a.k}; merge on {device}{f' ({gpu_name})' if gpu_name else ''}; work in {work}")

    # 1. sources
    marker = src / "complete.json"
    if marker.exists() and json.loads(marker.read_text()) == zoo_params(a):
        log(f"reusing the sources in {src}")
        res["steps"]["generate"] = {"reused": True}
    else:
        shutil.rmtree(src, ignore_errors=True)
        g = generate(src, a.adapters, a.layers, a.hidden, a.rank, gen_device, a.jobs)
        marker.write_text(json.dumps(zoo_params(a)))
        log(f"generated {g['bytes'] / 1e9:.2f} GB in {g['seconds']:.1f} s ({g['bytes'] / 1e9 / g['seconds']:.2f} GB/s, "
            f"drawn on {gen_device}, {a.jobs} writers)")
        res["steps"]["generate"] = g
    res["config"]["workdir_fs"] = fs_type(src)
    sources = sorted(str(p) for p in src.iterdir() if p.is_dir())
    files = [Path(s) / "adapter_model.safetensors" for s in sources]
    save()

    py = sys.executable
    floor_dev = "cuda" if has_cuda else "cpu"
    floor_label = "GPU" if has_cuda else "CPU (no CUDA)"

    def floor(label: str, dev: str, key: str, cap: float = 120) -> dict | None:
        left = deadline.left() - 30
        if left < 10:
            log(f"skipping {label}: {deadline.left():.0f} s left")
            return None
        r = run([py, "-c", FLOOR, dev, *sources], min(left, cap), name=key, logdir=logdir)
        try:
            r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
        except (ValueError, IndexError):
            pass
        log(f"{label}: {r['wall_s']:.2f} s wall (rc {r['rc']}{', TIMED OUT' if r['timed_out'] else ''}), "
            f"read {r.get('read_s', float('nan')):.2f} s after {r.get('import_init_s', float('nan')):.2f} s import/init, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB")
        if r["rc"]:
            log(r["stderr_tail"][-1500:])
        res["steps"][key] = r
        save()
        return r

    # 2. cold floor (sources out of the page cache), then warm floors
    if not a.no_cold and deadline.left() > min(150.0, 0.5 * a.budget_s):
        # fsync writes back what generation left dirty: on a slow disk that can take long, so it is capped
        box: dict = {}
        worker = threading.Thread(target=lambda: box.update(evict(files, a.jobs)), daemon=True)
        t0 = time.perf_counter()
        worker.start()
        worker.join(timeout=a.evict_cap_s)
        if worker.is_alive():
            log(f"evicting the sources (fsync + fadvise) still running after {a.evict_cap_s:.0f} s: the disk writes back "
                f"slower than {need / 1e9 / a.evict_cap_s:.2f} GB/s; no cold floor")
            res["steps"]["evict"] = {"seconds": time.perf_counter() - t0, "finished": False}
        else:
            e = box
            log(f"evicted {e.get('files')} source files from the page cache (fsync + fadvise) in {e.get('seconds', 0):.1f} s"
                + (f"; error {e['error']}" if e.get("error") else ""))
            res["steps"]["evict"] = e
            if deadline.left() > min(175.0, 0.6 * a.budget_s):
                floor(f"{floor_label} read floor, cold", floor_dev, "floor_cold", cap=60)
            else:
                log(f"skipping the cold floor: {deadline.left():.0f} s left")
    floor(f"{floor_label} read floor, warm", floor_dev, "floor_warm")

    # 3. merge
    zoo = work / f"zoo-{a.adapters}x{a.layers}x{a.hidden}-k{a.k}"
    left = deadline.left() - 25
    if left > 15:
        argv = [py, "-c", MERGE_WRAPPER, "merge", *sources, "--zoo", str(zoo), "-k", str(a.k), "--device", device, "-q", "--force"]
        log(f"merge: python3 -m sharecompress merge <{len(sources)} dirs> --zoo {zoo} -k {a.k} --device {device} -q --force "
            f"(limit {min(left, 300):.0f} s)")
        profile_path = logdir / "merge.profile.json"
        profile_path.unlink(missing_ok=True)
        m = run(argv, min(left, 300), gpu_sample=has_cuda, name="merge", logdir=logdir,
                env={"GPU_BENCH_PROFILE": str(profile_path), "GPU_BENCH_SAMPLE_S": str(a.sample_s)})
        m["profile"] = read_profile(profile_path)
        res["steps"]["merge"] = m
        log(f"merge: {m['wall_s']:.2f} s wall (rc {m['rc']}{', TIMED OUT' if m['timed_out'] else ''}), peak RSS "
            f"{m['peak_rss_mb']:.0f} MB, user {m['user_s']:.0f} s sys {m['sys_s']:.0f} s"
            + (f", GPU util mean {m['gpu_util_mean_pct']:.0f} % (busy in {100 * m['gpu_util_busy_share']:.0f} % of samples), "
               f"GPU mem peak {m['gpu_mem_peak_mb']:.0f} MB" if "gpu_util_mean_pct" in m else ""))
        if m["rc"]:
            log("merge stderr tail:\n" + m["stderr_tail"][-2500:])
        if m.get("profile"):
            prof = m["profile"]
            log(f"merge profile, sampled every {prof['every_s']} s (samples per thread: {dict(prof['samples'])}); "
                "share of each thread's samples at each place:")
            for label, count, share in prof["top"]:
                print(f"    {100 * share:5.1f} %  {label}")
            lines = [f"merge profile by function (innermost sharecompress frame, else the leaf; share of the thread's "
                     f"samples, one every {prof['every_s']} s; samples {dict(prof['samples'])}):"]
            lines += [f"    {100 * share:5.1f} %  {label}" for label, count, share in prof["functions"]]
            print("\n".join(lines), flush=True)
            lines += ["merge profile of the main thread (where the compute runs; every place, innermost frame first):"]
            lines += [f"    {100 * share:5.1f} %  {label}" for label, count, share in prof["main"]]
            print("\n".join(lines[-len(prof["main"]) - 1:]), flush=True)
            (Path(out_env) if out_env else logdir).joinpath("merge_profile.txt").write_text("\n".join(lines) + "\n")
        save()
        # 4. the zoo's error
        if m["rc"] == 0 and deadline.left() > 10:
            r = run([py, "-m", "sharecompress", "report", "--zoo", str(zoo), "--json"], max(10, deadline.left() - 5),
                    name="report", logdir=logdir)
            try:
                rep = json.loads(r["stdout"])
                errs = [x["relative_error"] for x in rep["adapters"]]
                r = {"wall_s": r["wall_s"], "rc": r["rc"], "relative_error": rep["relative_error"],
                     "max_adapter_error": max(errs), "compression_ratio": rep["compression_ratio"],
                     "bytes_compressed": rep["bytes_compressed"], "bytes_original": rep["bytes_original"],
                     "adapters": len(errs), "modules": len(rep["modules"])}
                log(f"zoo relative error {r['relative_error']:.4f} (worst adapter {r['max_adapter_error']:.4f}), "
                    f"{r['adapters']} adapters × {r['modules']} modules, compression {r['compression_ratio']:.1f}×")
            except (ValueError, KeyError) as exc:
                log(f"report failed (rc {r['rc']}): {exc}\n{r['stderr_tail'][-1500:]}")
                r = {"wall_s": r["wall_s"], "rc": r["rc"] or 1, "error": repr(exc)}
            res["steps"]["report"] = r
            save()
    else:
        log(f"skipping the merge: {deadline.left():.0f} s left")

    # 5. CPU floor, last (least important)
    if has_cuda and not a.no_cpu_floor:
        floor("CPU read floor, warm", "cpu", "floor_cpu")

    # table
    steps = res["steps"]
    rows = []
    for key, label in (("floor_cold", f"{floor_label} read floor, cold (safetensors + .to(device))"),
                       ("floor_warm", f"{floor_label} read floor, warm"),
                       ("floor_cpu", "CPU read floor, warm (safetensors)"),
                       ("merge", f"sharecompress merge -k {a.k} --device {device} (warm)")):
        r = steps.get(key)
        if not r:
            continue
        extra = ""
        if key == "merge" and "report" in steps and "relative_error" in steps["report"]:
            extra = f"{steps['report']['relative_error']:.4f}"
        gpu = f"{r['gpu_util_mean_pct']:.0f} % / {r['gpu_mem_peak_mb'] / 1024:.1f} GiB" if "gpu_util_mean_pct" in r else "—"
        read = f"{r['read_s']:.2f}" if "read_s" in r else "—"
        status = "ok" if r["rc"] == 0 else ("TIMED OUT" if r["timed_out"] else f"rc {r['rc']}")
        rows.append(f"| {label} | {r['wall_s']:.2f} | {read} | {r['peak_rss_mb']:.0f} | {gpu} | "
                    f"{extra or '—'} | {status} |")
    print(f"\n### merge benchmark: {a.adapters} adapters × {4 * a.layers} modules {a.hidden}×{a.hidden}, rank {a.rank}, fp16 "
          f"({need / 1e9:.1f} GB), -k {a.k}; {gpu_name or 'no GPU'}; {os.cpu_count()} cores; sources on "
          f"{res['config']['workdir_fs']}")
    g = steps.get("generate", {})
    if g.get("seconds"):
        print(f"generation: {g['seconds']:.1f} s ({g['bytes'] / 1e9 / g['seconds']:.2f} GB/s)")
    print("\n| run | wall s | read s (in process) | peak RSS MB | GPU util mean / mem peak | zoo rel. error | status |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    merge = steps.get("merge")
    warm = steps.get("floor_warm")
    if merge and merge["rc"] == 0 and warm and warm["rc"] == 0:
        ratio = merge["wall_s"] / warm["wall_s"]
        res["merge_over_floor_warm"] = ratio
        line = f"\nmerge / {floor_label} read floor (warm): {ratio:.2f}× (target ≤ 1.5×: {'PASS' if ratio <= 1.5 else 'FAIL'})"
        cold = steps.get("floor_cold")
        if cold and cold["rc"] == 0:
            res["merge_over_floor_cold"] = merge["wall_s"] / cold["wall_s"]
            line += f"; over the cold floor: {merge['wall_s'] / cold['wall_s']:.2f}×"
        print(line)
        print(f"merge wall {merge['wall_s']:.1f} s (target < 60 s on one H100: {'PASS' if merge['wall_s'] < 60 else 'FAIL'})")
    res["script_s"] = time.perf_counter() - t_script
    save()
    if a.clean:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(zoo, ignore_errors=True)
    ok = merge is not None and merge["rc"] == 0 and "relative_error" in steps.get("report", {})
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
