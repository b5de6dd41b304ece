"""``merge``: many adapters in, one zoo out, written whole or not at all."""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..core.budget import ModuleSpectrum, allocate, parse_size
from ..core.compress import METHODS, KRule, ModuleResult, as_rows, compress_stacked, spectrum, widened
from ..core.diagnostics import held_out_errors, held_out_fits, nearest_twin
from ..core.scratch import Scratch
from ..errors import InputError, ZooError
from ..io.adapter import Adapter
from ..io.confined import Dir
from ..io.readers import find_adapters
from ..io.safetensors_file import byte_view
from ..store.manifest import DEFAULT_ZOO, MANIFEST, manifest_bytes, replaceable_zoo
from ..store.storage import staged_directory
from ..store.interrupts import held_interrupts
from ..store.spill import BASIS, Spill
from ..store.writer import write_zoo_files
from .anchors import anchor_here
from .guarantee import above_mark, first_residual
from .entries import adapter_entry, check_finite, finish_adapter_entry, model_key, now, refresh_module_stats, source_keys

DEFAULT_ENERGY = 0.99
DEFAULT_SWEEPS = 3
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SOURCE_DTYPE = {"F32": "float32", "F64": "float32", "F16": "float16", "BF16": "bfloat16"}

Progress = Callable[[int, int, str], None]


def storage_dtype(adapters: list[Adapter], requested: str) -> str:
    """``auto``: the inputs' own float type when they all share one, else float32."""
    if requested != "auto":
        if requested not in STORE_DTYPES:
            raise ValueError(f"--dtype {requested}: choose auto, {', '.join(STORE_DTYPES)}")
        return requested
    kinds = {_SOURCE_DTYPE.get(m.dtype, "float32") for a in adapters for m in a.modules.values()}
    return kinds.pop() if len(kinds) == 1 else "float32"


def base_model_of(adapters: list[Adapter]) -> str | None:
    """The adapters' base model; refuses a zoo that mixes base models.

    Compared by the last path component, so a Hub id and a local copy of it agree.
    """
    found: tuple[str, Adapter] | None = None
    for adapter in adapters:
        name = adapter.config.get("base_model_name_or_path")
        if not name:
            continue
        if found is None:
            found = (name, adapter)
        elif model_key(name) != model_key(found[0]):
            raise InputError(
                adapter.source, f"base model {name!r} differs from {found[0]!r} of {found[1].source}"
            )
    return found[0] if found else None


def module_shapes(adapters: list[Adapter]) -> dict[str, tuple[int, int]]:
    """Every adapted module with its (n, d); refuses a module whose shape differs between adapters."""
    shapes: dict[str, tuple[tuple[int, int], Adapter]] = {}
    for adapter in adapters:
        for name, spec in adapter.modules.items():
            shape = (spec.n, spec.d)
            if name not in shapes:
                shapes[name] = (shape, adapter)
            elif shapes[name][0] != shape:
                other = shapes[name][1]
                raise InputError(
                    adapter.file.path,
                    f"module {name!r} has shape {spec.n}x{spec.d} here but "
                    f"{shapes[name][0][0]}x{shapes[name][0][1]} in {other.file.path}",
                )
    return {name: shape for name, (shape, _) in sorted(shapes.items())}


def check_target(target: Path, force: bool) -> None:
    """Refuse early (before any compute) a target that exists without ``force``, or that is not a zoo."""
    if not os.path.lexists(target):
        from ..store.storage import restore_interrupted_swap

        if not restore_interrupted_swap(target):
            return
    if not force:
        raise ZooError(target, "already exists; pass --force to replace it")
    replaceable_zoo(target)


def merge(
    sources: Iterable[str],
    zoo: str | os.PathLike = DEFAULT_ZOO,
    *,
    k: int | None = None,
    energy: float | None = None,
    method: str = "share",
    sweeps: int = DEFAULT_SWEEPS,
    p: int | None = None,
    dtype: str = "auto",
    force: bool = False,
    rank: int | None = None,
    alpha: float | None = None,
    device: str = "auto",
    shard: tuple[int, int] | None = None,
    progress: Progress | None = None,
    layout: str = "auto",
    budget: int | str | None = None,
    ratio: float | None = None,
    max_error: float | None = None,
) -> Path:
    """Compress the adapters named by ``sources`` into a new zoo at ``zoo``; returns its path.

    Everything is validated and computed into a hidden temporary directory beside the target,
    which is renamed into place only when complete: on any error nothing is left behind.
    ``shard=(i, n)`` (1 ≤ i ≤ n) computes only every n-th batch of modules (see ``plan_batches``),
    starting with the i-th, into a partial zoo; ``combine`` joins the n parts into the zoo an unsharded merge writes.
    ``layout`` (auto, peft, kohya, diffusers) overrides each source's detected key layout.
    ``budget`` (bytes, or a size such as "3MB") or ``ratio`` (original bytes ÷ ratio) replace
    ``k``/``energy``: k per module and side and each module's core rank are chosen for the least
    error within that size of bases and cores (``core.budget``).
    ``max_error`` X: every adapter whose exact relative error is above X after the shared fit
    keeps a private low-rank residual, the least that brings it to ≤ X (``core.residual``); the
    zoo records X and ``add`` holds it.
    ``progress(done, total, module)`` is called once per module, in order, one call at a time, from
    the thread that computed it (on a CPU two batches compute at once: ``compute_workers``); the
    merge sets torch's thread count for its duration (``compute_threads``).
    """
    sources = list(sources)
    chosen = [flag for flag, value in (("-k", k), ("--energy", energy), ("--budget", budget), ("--ratio", ratio)) if value is not None]
    if len(chosen) > 1:
        raise ValueError(f"give one of -k, --energy, --budget, --ratio (got {' and '.join(chosen)})")
    if isinstance(budget, str):
        budget = parse_size(budget)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError("--budget must be a size of at least one byte")
    if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
        raise ValueError("--ratio must be a positive number")
    if (budget is not None or ratio is not None) and shard is not None:
        raise ValueError("--budget and --ratio allocate across all modules: they cannot be sharded")
    if max_error is not None and not (math.isfinite(max_error) and max_error > 0):
        raise ValueError("--max-error must be a positive number")
    if max_error is not None and shard is not None:
        raise ValueError("--max-error is a figure per adapter over all its modules: it cannot be sharded (merge without --shard)")
    if k is not None and energy is not None:
        raise ValueError("give either k or energy, not both")
    if k is not None and k < 1:
        raise ValueError("-k must be at least 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError("--energy must be in (0, 1]")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}")
    if p is not None and p < 1:
        raise ValueError("--p must be at least 1")
    if sweeps < 0:
        raise ValueError("--sweeps must be 0 or more")
    rule = KRule(k=k, energy=None if k is not None else (energy if energy is not None else DEFAULT_ENERGY))

    compute_on = resolve_device(device)
    target = Path(zoo)
    check_target(target, force)
    adapters = find_adapters(sources, rank=rank, alpha=alpha, layout=layout)
    shapes = module_shapes(adapters)
    batches = plan_batches(shapes, adapters)
    total_modules = len(shapes)
    if shard is not None:
        index, count = shard
        if not 1 <= index <= count:
            raise ValueError(f"--shard {index}/{count}: need 1 <= I <= N")
        batches = batches[index - 1 :: count]
        mine = {m for batch in batches for m in batch}
        shapes = {m: shape for m, shape in shapes.items() if m in mine}
    base_model = base_model_of(adapters)
    store_name = storage_dtype(adapters, dtype)
    store = STORE_DTYPES[store_name]

    sized, core_p = None, None
    if budget is not None or ratio is not None:
        original = sum(a.lora_bytes for a in adapters)
        limit = budget if budget is not None else int(original / ratio)
        size = torch.empty((), dtype=store).element_size()
        # k = p = 1 everywhere: n + d + 2 numbers per adapter and module (known before any factor is read)
        smallest = size * sum(n + d + 2 * sum(m in a.modules for a in adapters) for m, (n, d) in shapes.items())
        if smallest > limit:
            flag = "--budget" if budget is not None else f"--ratio {ratio:g}"
            raise ValueError(f"{flag}: {limit:,} bytes, but the smallest zoo of these adapters (k = 1 for every module) "
                             f"takes {smallest:,}")
        spectra = _spectra(adapters, shapes, batches, progress)
        ks = allocate(spectra, limit // size, p)
        rule = {m: KRule(sides=ks[m][:2]) for m in shapes}
        core_p = {m: ks[m][2] for m in shapes}
        sized = {"budget": limit}
    with staged_directory(target, replaceable_zoo if force else None, lock=True) as staging:
        with_extras = shard is None or shard[0] == 1  # heads go with the first part only
        manifest = _build(adapters, shapes, batches, rule, method, sweeps, core_p or p, store, staging, progress, compute_on,
                          with_extras, max_error)
        if shard is not None:
            manifest["shard"] = {"index": shard[0], "count": shard[1]}
            manifest["shard_modules"] = total_modules  # how many the whole merge has: report says what this part lacks
        for module, q in (core_p or {}).items():
            manifest["modules"][module]["p"] = q  # a budget's core rank per module: add and commit keep it
        manifest.update(
            base_model=base_model,
            method=method,
            k_rule=sized or {"k": rule.k, "energy": rule.energy},
            sweeps=sweeps,
            p=p,
            dtype=store_name,
        )
        if max_error is not None:
            manifest["max_error"] = max_error
        staging.write_new(MANIFEST, [manifest_bytes(manifest)])
    return target


def resolve_device(requested: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; naming an absent device is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"unknown device {requested!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return device


# Bytes of float32 factors computed in one batched call. On the CPU batching saves only call
# overhead (the arithmetic is what it is); on a GPU it fills the device with small modules.
# One figure for every device, so that shards cut on different machines still fit together.
BATCH_BYTES = 32 << 20
READ_TASKS = 16  # tasks a batch's reading is cut into (each a run of adapters): enough to keep 8 readers busy


def compute_workers(device: torch.device) -> int:
    """Batches computed at once: two on a CPU where torch has two threads or more, one on a GPU.

    Much of a batch's compute is small solves and products that one core runs as fast as two
    (eigen-solves of 64 × 64, r × r Grams, Python between them): with one worker the second
    core idled through them. Two workers, each on half of torch's threads, keep both busy.
    Measured on the 2-core machine, a merge's compute took 2.46 s on one thread against 2.17 s on
    two (docs/speed.md). torch's thread count, not the machine's cores, decides: a process held to
    one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``) keeps one worker. A GPU runs
    one batch at a time: its work is queued on one stream anyway.
    """
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


_threads_lock = threading.Lock()
# while any merge shares torch's threads out: the count from before the first, then one entry per such merge
_threads_held: list[int] = []


@contextmanager
def compute_threads(workers: int) -> Iterator[None]:
    """torch's threads shared among ``workers`` batches computed at once, while any merge shares them.

    The count is the process's for new threads and for MKL, and each thread's own for OpenMP: a
    merge that ends gives its thread the count from before the first merge back, and the last
    one to end gives it back to the process (two merges that overlap in one process, in one thread
    or two, must not leave either at the share).
    """
    if workers <= 1:
        yield
        return
    with held_interrupts(), _threads_lock:
        if not _threads_held:
            _threads_held.append(torch.get_num_threads())
        torch.set_num_threads(max(1, _threads_held[0] // workers))
        _threads_held.append(workers)
    try:
        yield
    finally:
        with held_interrupts(), _threads_lock:  # a Ctrl-C in here would leave the share for good
            _threads_held.pop()
            before = _threads_held[0]
            if len(_threads_held) == 1:
                _threads_held.clear()
            torch.set_num_threads(before)


def wait_out(futures: Iterable[Future | None]) -> None:
    """Cancel the futures not started and wait until the others' work has ended.

    A compute worker may be inside torch when a merge fails or is interrupted: the process must
    not go on to exit under it (a C++ abort). ``Thread.join`` cannot be trusted for that (see
    ``store.interrupts``); the callers hold Ctrl-C (``held_interrupts``) while this waits.
    """
    pending = [f for f in futures if f is not None]
    for future in pending:
        future.cancel()  # what has not started never will
    concurrent.futures.wait(pending)


def plan_batches(shapes: dict[str, tuple[int, int]], adapters: list[Adapter], budget: int | None = None) -> list[list[str]]:
    """Modules grouped for batched compute: same shape, same adapters with the same ranks.

    Each group is cut into batches of at most ``budget`` bytes of float32 factors (at least one
    module), which, with the next batch read ahead, bounds the memory a merge needs. Shards
    take whole batches, so a sharded merge computes exactly what the unsharded one does.
    """
    budget = BATCH_BYTES if budget is None else budget
    groups: dict[tuple, list[str]] = {}
    for module, (n, d) in shapes.items():
        ranks = tuple((a.name, a.modules[module].rank) for a in adapters if module in a.modules)
        groups.setdefault((n, d, ranks), []).append(module)
    batches = []
    for (n, d, ranks), modules in groups.items():
        size = max(1, budget // (4 * len(ranks) * max(r for _, r in ranks) * (n + d)))
        batches += [modules[i : i + size] for i in range(0, len(modules), size)]
    return batches


def _spectra(adapters: list[Adapter], shapes: dict, batches: list[list[str]], progress) -> dict[str, ModuleSpectrum]:
    """Every module's adapters on its stacks' leading directions (``compress.spectrum``): what a
    budget is allocated on, in a pass over the factors before the merge."""
    holders_of = {m: [a for a in adapters if m in a.modules] for m in shapes}
    out = {}
    for batch in batches:
        for module, factors in zip(batch, _load(holders_of, batch)):
            cores = spectrum(factors, [a.modules[module].scale for a in holders_of[module]])
            n, d = shapes[module]
            out[module] = ModuleSpectrum(n, d, [b.shape[1] for b, _ in factors], cores)
            if progress:
                progress(len(out), len(shapes), f"sizing {module}")
    return out


def _load(holders_of: dict[str, list[Adapter]], modules: list[str]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return [[a.factors(module, None) for a in holders_of[module]] for module in modules]


_WIDE = {"F64": torch.float64, "F32": torch.float32}


def stack_dtype(holders: list[Adapter], modules: list[str]) -> torch.dtype:
    """The stacks' dtype: the sources' own when they share one (float16 travels as float16), else wider.

    Wider too where a module's factors are a product (a stored rank above min(n, d),
    ``adapter.reduce_rank``): B·A rounded to half precision would lose what the sources hold.
    """
    specs = [a.modules[m] for m in modules for a in holders]
    kinds = {spec.dtype for spec in specs}
    if len(kinds) == 1 and kinds <= {"F16", "BF16", *_WIDE} and not any(spec.stored_rank for spec in specs):
        return {"F16": torch.float16, "BF16": torch.bfloat16, **_WIDE}[kinds.pop()]
    return torch.float64 if "F64" in kinds else torch.float32


def load_stacked(holders: list[Adapter], modules: list[str], pool: ThreadPoolExecutor | None = None,
                 scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One batch's factors read straight into its stacks: B (G, T, n, r), A (G, T, r, d), zero-padded
    to the largest rank, and each adapter's rank. Every module of a batch has the same adapters,
    shape and ranks (``plan_batches``). With ``pool``, the adapters are read in up to
    ``READ_TASKS`` runs, one task each; the stacks in ``scratch``'s buffers when given.

    The stacks are not checked for NaN or Inf here: ``compress_stacked`` checks each whole stack
    once on the device, and ``name_the_bad_tensor`` finds the file.
    """
    first = holders[0].modules[modules[0]]
    ranks = [a.modules[modules[0]].rank for a in holders]
    r = max(ranks)
    dtype = stack_dtype(holders, modules)
    shapes = (len(modules), len(holders), first.n, r), (len(modules), len(holders), r, first.d)
    if scratch is not None:
        B, A = (scratch.take(name, shape, dtype, torch.device("cpu")) for name, shape in zip(("read B", "read A"), shapes))
    else:
        B, A = (torch.empty(shape, dtype=dtype) for shape in shapes)
    # every slot is written whole: ``read_into`` zero-pads what is beyond an adapter's rank
    T, n, d = len(holders), first.n, first.d
    step_B, step_A = n * r * B.element_size(), r * d * A.element_size()
    bytes_B, bytes_A = byte_view(B), byte_view(A)

    def fill(ts: range) -> None:
        for t in ts:
            adapter, spans, other = holders[t], [], []
            for g, module in enumerate(modules):
                keys = adapter.stored_as(module, dtype, r)
                if keys is None:
                    other.append(g)
                    continue
                at = g * T + t
                spans += [(keys[0], bytes_B[at * step_B : (at + 1) * step_B]), (keys[1], bytes_A[at * step_A : (at + 1) * step_A])]
            with adapter.file.opened() as fd:
                adapter.file.read_spans(spans, fd)  # one read per run of tensors back to back in the file
                for g in other:
                    adapter.read_into(modules[g], B[g, t], A[g, t], fd)

    # a few adapters per task: each hand-over between threads, like each read, waits for Python's lock
    tasks = min(T, READ_TASKS) if pool is not None else 1
    chunks = [range(i * T // tasks, (i + 1) * T // tasks) for i in range(tasks) if i * T // tasks < (i + 1) * T // tasks]
    list(pool.map(fill, chunks) if pool is not None else map(fill, chunks))
    return B, A, ranks


def ready_for(B: torch.Tensor, A: torch.Tensor, ranks: list[int], device: str | torch.device, scratch: Scratch
              ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Stacks as the compute takes them on the CPU (float32 at least, B held as its rows: ``as_rows``),
    made in the reader's thread while earlier batches compute, in ``scratch``'s buffers and never in
    B's or A's own memory: the next batch is read into that. A GPU gets them as read (half precision
    travels at half the bytes) and widens them there."""
    if torch.device(device).type != "cpu":
        return B, A, ranks
    work = torch.float64 if B.dtype == torch.float64 else torch.float32
    return as_rows(B, work, scratch, "rows B", copy=True), widened(A, work, scratch, "A", copy=True), ranks


def name_the_bad_tensor(holders: list[Adapter], modules: list[str]) -> None:
    """Called when a batch's stacks hold NaN or Inf: checks each tensor, to name the file (raises)."""
    for module in modules:
        for adapter in holders:
            adapter.factors(module, None)  # raises, naming the file and tensor


def compute_batch(batch: list[str], holders: list[Adapter], B: torch.Tensor, A: torch.Tensor, ranks: list[int],
                  rule, method: str, sweeps: int, p, store: torch.dtype, device: torch.device,
                  tick: Callable[[int], None] | None) -> tuple[list[ModuleResult], dict, dict]:
    """One batch's results and its diagnostics: (results, lora_A cosines, held-out errors), each
    diagnostic keyed by (adapter, module). Reads B and A and writes nothing shared: two run at once."""
    scales = torch.tensor([[a.modules[m].scale for a in holders] for m in batch], dtype=torch.float64)
    B, A = B.to(device), A.to(device)  # once: the compute and the diagnostics below use them there
    bad = lambda: name_the_bad_tensor(holders, batch)  # noqa: E731
    try:
        results = compress_stacked(B, A, scales, ranks, rule, method, sweeps, p, store, device, tick, bad)
    except torch.linalg.LinAlgError as exc:  # finite factors whose products overflow float32, say
        where = holders[0].source if len(holders) == 1 else "the adapters"
        raise InputError(where, f"the factors of {', '.join(batch)} could not be decomposed ({str(exc).splitlines()[0]}); "
                                "are their magnitudes sane?") from exc
    cosines, held_out = {}, {}
    for g, m in enumerate(batch):  # after the stacks were found finite
        As = A[g] if len(set(ranks)) == 1 else [A[g, t, :r] for t, r in enumerate(ranks)]
        for a, cosine in zip(holders, nearest_twin(As)):
            if cosine is not None:
                cosines[a.name, m] = round(cosine, 4)
    if held_out_fits(ranks):  # else held_out_errors computes nothing: no T views per module for it
        for g, (module, result) in enumerate(zip(batch, results)):
            factors = [(B[g, t, :, :r], A[g, t, :r]) for t, r in enumerate(ranks)]
            held = held_out_errors(factors, scales[g].tolist(), result.U.shape[1], result.V.shape[1])
            for a, err2 in zip(holders, held or []):
                held_out[a.name, module] = err2
    return results, cosines, held_out


def _build(adapters, shapes, batches, rule, method, sweeps, p, store, staging: Dir, progress, device, with_extras=True,
           max_error=None) -> dict:
    """Compute every batch of modules (two at once on a CPU, ``compute_workers``, reading the next
    meanwhile), then write the files.

    Each batch's bases and cores wait in a ``Spill`` on the zoo's disk until the files are written,
    so the memory a merge needs does not grow with its modules.
    """
    with Spill(staging) as spill:
        return _build_into(spill, adapters, shapes, batches, rule, method, sweeps, p, store, staging, progress, device,
                           with_extras, max_error)


def _build_into(spill: Spill, adapters, shapes, batches, rule, method, sweeps, p, store, staging: Dir, progress, device,
                with_extras, max_error) -> dict:
    entries = {a.name: adapter_entry(a, hashed=False) for a in adapters}
    modules: dict[str, dict] = {}
    order = list(shapes.items())
    holders_of = {m: [a for a in adapters if m in a.modules] for m, _ in order}
    cores_here = os.cpu_count() or 1
    twins: dict[tuple[str, str], float] = {}  # (adapter, module): lora_A's largest cosine with another's
    loo: dict[tuple[str, str], float] = {}  # (adapter, module): squared error on bases fit without it
    finished, ticking = itertools.count(1), threading.Lock()  # modules done, whichever worker did them, told in order
    workers = min(compute_workers(device), max(1, len(batches)))  # a lone batch keeps every thread
    slots = tuple(Scratch(pinned=device.type == "cuda") for _ in range(workers + 1))
    # on the CPU each batch is read into one set of buffers, and its stacks made from them in its slot
    reading = Scratch() if device.type == "cpu" else None
    reader = files = hasher = compute = None
    digests: list[Future] = []

    def load(i: int):
        batch = batches[i]
        slot = slots[i % len(slots)]
        return ready_for(*load_stacked(holders_of[batch[0]], batch, files, reading if reading is not None else slot), device, slot)

    def run(i: int, B: torch.Tensor, A: torch.Tensor, ranks: list[int]):
        batch = batches[i]

        def tick(g: int) -> None:
            with ticking:
                progress(next(finished), len(order), batch[g])

        per = lambda x: [x[m] for m in batch] if isinstance(x, dict) else x  # noqa: E731  (a budget's per-module k and p)
        return compute_batch(batch, holders_of[batch[0]], B, A, ranks, per(rule), method, sweeps, per(p), store, device,
                             tick if progress else None)

    def file(i: int, outcome) -> None:
        """Batch i's results into the manifest's entries and the spill, in batch order."""
        results, cosines, held_out = outcome
        twins.update(cosines)
        loo.update(held_out)
        batch = batches[i]
        basis: dict[str, torch.Tensor] = {}
        cores: dict[str, dict[str, torch.Tensor]] = {a.name: {} for a in holders_of[batch[0]]}
        for module, result in zip(batch, results):
            n, d = shapes[module]
            _collect(module, n, d, holders_of[module], result, basis, modules, cores, entries)
        spill.put({BASIS: basis, **cores})

    in_flight: deque[tuple[int, Future]] = deque()
    pending: Future | None = None

    def file_oldest() -> None:
        """The oldest batch in flight, filed once its compute ends; it leaves ``in_flight`` only then,
        so that an interrupted wait for it still finds it there (``wait_out``)."""
        j, outcome = in_flight[0]
        done = outcome.result()
        in_flight.popleft()
        file(j, done)

    # The thread count is given back only once no worker runs: one inside ``linalg.one_thread``
    # would otherwise set its own saved count back after it.
    with compute_threads(workers):
        try:
            # Each hand-over of work to a thread (its start included) completes with Ctrl-C held, so
            # that everything started is held here and waited out below (``store.interrupts``).
            with held_interrupts():
                # sources read one batch ahead, a file per task; hashed alongside. Both take their share
                # of a large machine, and one thread each on a small one, where the compute needs the cores
                reader = ThreadPoolExecutor(max_workers=1)
                files = ThreadPoolExecutor(max_workers=max(1, min(8, cores_here // 2)))
                hasher = ThreadPoolExecutor(max_workers=max(1, min(4, cores_here // 4)))
                compute = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
                digests = [hasher.submit(lambda a=a: a.sha256) for a in adapters]
                # Batch i's stacks live in slots[i % (workers + 1)]: the reader fills batch i + 1's only
                # once batch i − workers is filed, and nothing of a batch outlives its filing.
                pending = reader.submit(load, 0) if batches else None
            for i in range(len(batches)):
                stacks = pending.result()
                while len(in_flight) >= workers:  # batch i − workers is done with its slot before the next read
                    file_oldest()
                with held_interrupts():
                    pending = reader.submit(load, i + 1) if i + 1 < len(batches) else None
                    if compute is not None:
                        in_flight.append((i, compute.submit(run, i, *stacks)))
                if compute is None:
                    file(i, run(i, *stacks))
                del stacks
            while in_flight:
                file_oldest()
            for adapter, digest in zip(adapters, digests):
                entries[adapter.name]["sha256"] = digest.result()
        finally:  # on an error, stop what is queued rather than finish it, and wait for what runs
            with held_interrupts():
                wait_out([pending, *(outcome for _, outcome in in_flight), *digests])
                for pool in (compute, reader, files, hasher):
                    if pool is not None:
                        pool.shutdown(wait=True, cancel_futures=True)
    if max_error is not None:
        add_residuals(adapters, spill, entries, max_error, store, progress)
    modules = {m: modules[m] for m in shapes}  # the manifest lists modules in name order
    for entry in entries.values():
        entry["modules"] = {m: entry["modules"][m] for m in shapes if m in entry["modules"]}
    extras = {a.name: (a.extra_tensors if with_extras else dict) for a in adapters}
    if not with_extras:
        for entry in entries.values():
            entry["extras"], entry["bytes_extras"] = [], 0
    for entry in entries.values():
        for module, mod in entry["modules"].items():
            if (entry["name"], module) in twins:
                mod["init_cosine"] = twins[entry["name"], module]
            if (entry["name"], module) in loo:
                mod["held_out_err2"] = loo[entry["name"], module]
        finish_adapter_entry(entry)
    manifest = write_zoo_files([a.name for a in adapters], spill, modules, entries, extras, staging)
    for adapter in adapters:  # everything of the sources is read and hashed now: it must all be one file each
        adapter.file.check_unchanged()
    for entry in manifest["adapters"]:
        anchor_here(manifest, entry, staging)  # every adapter's error is exact here: the first anchor
    if max_error is not None:
        refresh_module_stats(manifest)  # the residuals lowered some errors: each module's energy kept again
    manifest["created"] = manifest["updated"] = now()
    return manifest


def add_residuals(adapters: list[Adapter], spill: Spill, entries: dict, max_error: float,
                  store: torch.dtype, progress=None) -> None:
    """A first residual for each adapter above ``max_error``'s mark after the shared fit (``guarantee``).

    A second pass over those adapters alone: their factors are read again, one adapter at a time,
    so memory holds the bases and one adapter's residual problem, never the zoo's cores.
    """
    over = [a for a in adapters if above_mark(entries[a.name]["modules"], max_error)]
    basis = spill.tensors(BASIS) if over else {}
    for i, adapter in enumerate(over):
        mods, own = entries[adapter.name]["modules"], spill.tensors(adapter.name)
        held = first_residual(adapter, mods, {m: (basis[f"{m}.U"], basis[f"{m}.V"]) for m in mods},
                              {m: (own[f"{m}.E"], own[f"{m}.F"]) for m in mods}, max_error, store)
        spill.put({adapter.name: {f"{module}.{side}": R for module, pair in held.items() for side, R in zip(("RU", "RV"), pair)}})
        if progress:
            progress(i + 1, len(over), f"residual {adapter.name}")


def _collect(module, n, d, holders, result, basis, modules, cores, entries) -> None:
    """File one module's result into the basis, the cores and the manifest entries."""
    basis[f"{module}.U"], basis[f"{module}.V"] = result.U, result.V
    # a core with NaN or Inf makes its error figures NaN or Inf (they are computed from it): the
    # tensors are checked one by one only when some figure is not finite
    if not all(math.isfinite(c.err2) and math.isfinite(c.norm2) for c in result.cores):
        for adapter, core in zip(holders, result.cores):
            check_finite(adapter.source, module, (core.E, core.F), (core.err2, core.norm2))
    check_finite(holders[0].source if len(holders) == 1 else "the adapters", module, (result.U, result.V), ())
    modules[module] = _module_entry(result, n, d)
    e_name, f_name = f"{module}.E", f"{module}.F"  # one string each, shared by every adapter's entry in the spill
    for adapter, core in zip(holders, result.cores):
        cores[adapter.name][e_name], cores[adapter.name][f_name] = core.E, core.F
        spec = adapter.modules[module]
        entries[adapter.name]["modules"][module] = {
            "rank": spec.rank,
            "scale": spec.scale,
            "p": core.E.shape[1],
            "err2": core.err2,
            "norm2": core.norm2,
            "drift": 0.0,
            "err_parts": core.parts,  # what its anchor's bound needs later (``ops.anchors``)
            **source_keys(spec),
        }


def _module_entry(result: ModuleResult, n: int, d: int) -> dict:
    total = sum(c.norm2 for c in result.cores)
    err2 = sum(c.err2 for c in result.cores)
    keep = min(result.energies.numel(), max(2 * result.k, 64))
    curve = torch.cumsum(result.energies[:keep], 0).tolist() if total > 0 else []
    return {
        "shape": [n, d],
        "k": max(result.k, result.k_v),
        "k_u": result.k,
        "k_v": result.k_v,
        "adapters": len(result.cores),
        "energy_total": total,
        "energy_kept": 1.0 - err2 / total if total > 0 else 1.0,
        "energy_curve": [round(x, 7) for x in curve],
        "sweeps": result.sweeps_done,
    }
