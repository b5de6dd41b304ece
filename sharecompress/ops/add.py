"""``add``: fold new adapters into a zoo without the original adapters (DESIGN.md §5).

Everything the zoo knows of a module is U, V and the cores E_t F_t. With Q_U = orth([U | B])
and Q_V = orth([V | Aᵀ]), every stored reconstruction and the new update live inside
span(Q_U) ⊗ span(Q_V), so re-merging them is the same problem on (k + r)-sized factors:
its cost depends on k, r and the number of stored adapters, never on the originals.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..core import linalg
from ..io.adapter import Adapter
from ..core.compress import KRule, module_bases, pad_stack, project_all
from ..errors import InputError, ZooError
from ..store.reader import ZooReader
from ..store.writer import BASIS_METADATA, CORES_METADATA, unique_stem, write_adapter_files
from .hold_budget import hold_budget
from .anchors import Anchors, anchor_here, move, prune
from .entries import (adapter_entry, check_finite, finish_adapter_entry, model_key, module_bound2, module_info, now, refresh_module_stats,
                      source_keys)
from .guarantee import absorb_drift, first_residual, module_move2
from .merge import STORE_DTYPES
from ..io.formats import zoo_module_layouts
from ..io.readers import find_adapters
from ..io.safetensors_file import encode
from ..store.storage import pause_point, save_tensors
from ..store.transaction import Transaction

f64 = torch.float64


def _orth(first: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis whose leading columns span ``first``, extended to cover ``extra``."""
    both = torch.cat([first, extra], dim=1)
    q = torch.linalg.qr(both)[0]
    return q[:, : min(both.shape[0], both.shape[1])]


def _pad_cores(cores: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Stack cores (E k×p_t, F p_t×k) in float64, zero-padded to the largest p; E·F is unchanged."""
    E, F = pad_stack([(e.to(f64), f.to(f64)) for e, f in cores])
    return E, F, [e.shape[1] for e, _ in cores]


def reproject(
    E: torch.Tensor, F: torch.Tensor, ps: list[int], GU: tuple, GV: tuple, p: int | None, store: torch.dtype
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Every old core on the new bases, rounded to ``store``, and its exact drift², batched.

    E (T, k, p), F (T, p, k) zero-padded; GU = (UᵀU, UᵀU', U'ᵀU') and GV likewise. The new
    core is the projection (U'ᵀU E)(F VᵀV'), cut by its SVD to p where p is set; the drift is
    ‖U E F Vᵀ − U' E' F' V'ᵀ‖² (``linalg.difference_norm2`` with X₁ = U E, Y₁ = F Vᵀ, X₂ = U' E',
    Y₂ = F' V'ᵀ).
    """
    P, Q = GU[1].mT @ E, F @ GV[1]
    keeps = [min(pt, P.shape[1], Q.shape[2], pt if p is None else p) for pt in ps]
    E2, F2 = linalg.split_cores(P, Q, torch.ones(len(ps), dtype=f64), keeps, ps)
    E2, F2 = E2.to(store), F2.to(store)
    E2_64, F2_64 = E2.to(f64), F2.to(f64)
    drift2 = linalg.difference_norm2(
        E.mT @ GU[0] @ E, E.mT @ GU[1] @ E2_64, E2_64.mT @ GU[2] @ E2_64,
        F @ GV[0] @ F.mT, F @ GV[1] @ F2_64.mT, F2_64 @ GV[2] @ F2_64.mT,
    )
    moved = [(E2[t, :, :keep].contiguous(), F2[t, :keep].contiguous()) for t, keep in enumerate(keeps)]
    return moved, drift2


def check_new(manifest: dict, adapters: list[Adapter]) -> None:
    """Refuse names or tensors already in the zoo, and shape or base-model mismatches."""
    names = {a["name"]: a for a in manifest["adapters"]}
    digests = {a["sha256"]: a["name"] for a in manifest["adapters"]}
    base = manifest.get("base_model")
    for adapter in adapters:
        if adapter.name in names:
            raise InputError(adapter.source, f"an adapter named {adapter.name!r} is already in the zoo")
        if adapter.sha256 in digests:
            raise InputError(adapter.source, f"its tensors are already in the zoo as {digests[adapter.sha256]!r}")
        other = adapter.config.get("base_model_name_or_path")
        if base and other and model_key(other) != model_key(base):
            raise InputError(adapter.source, f"base model {other!r} differs from the zoo's {base!r}")
        for name, spec in adapter.modules.items():
            known = manifest["modules"].get(name)
            if known and known["shape"] != [spec.n, spec.d]:
                raise InputError(
                    adapter.file.path,
                    f"module {name!r} has shape {spec.n}x{spec.d} here but {known['shape'][0]}x{known['shape'][1]} in the zoo",
                )


def fold_module(
    U: torch.Tensor, V: torch.Tensor, old: dict[str, tuple[torch.Tensor, torch.Tensor]],
    B: torch.Tensor | None, A: torch.Tensor | None, scale: float, rule: KRule, method: str, sweeps: int,
    p: int | None, store: torch.dtype,
):
    """New (U', V'), the re-projected old cores with their exact drift², the new core and its exact error.

    Batched over the old adapters: their cores are one zero-padded stack throughout. Without a
    new adapter (B = A = None: ``remove``'s refit) the bases are refit on the old cores alone,
    inside their own span, and the new core is None.
    """
    U64, V64 = U.to(f64), V.to(f64)
    fresh = B is not None
    if not fresh:
        B, A = U64[:, :0], V64[:, :0].T
    B, A = B.to(f64), A.to(f64)
    QU, QV = _orth(U64, B), _orth(V64, A.T)
    names = list(old)
    E, F, ps = _pad_cores([old[t] for t in names]) if names else (None, None, [])
    width = max([B.shape[1], *ps])
    count = len(names) + fresh
    Bs = torch.zeros(count, QU.shape[1], width, dtype=f64)
    As = torch.zeros(count, width, QV.shape[1], dtype=f64)
    if names:
        Bs[: len(names), :, : E.shape[2]] = (QU.T @ U64) @ E
        As[: len(names), : F.shape[1]] = F @ (V64.T @ QV)
    if fresh:
        Bs[-1, :, : B.shape[1]] = QU.T @ B
        As[-1, : A.shape[0]] = A @ QV
    scales = torch.tensor([1.0] * len(names) + [scale] * fresh, dtype=f64)
    total_rank = sum(ps) + B.shape[1]
    Us, Vs, curve, done = module_bases(Bs, As, scales, rule, method, sweeps, total_rank)
    # module_bases caps k by the small problem's size; the full problem's cap is min(n, d, Σ ranks).
    U2 = (QU @ Us).to(store).contiguous()
    V2 = (QV @ Vs).to(store).contiguous()
    U2_64, V2_64 = U2.to(f64), V2.to(f64)
    GU = (U64.T @ U64, U64.T @ U2_64, U2_64.T @ U2_64)
    GV = (V64.T @ V64, V64.T @ V2_64, V2_64.T @ V2_64)
    cores, drifts = {}, {}
    if names:
        moved, drift2 = reproject(E, F, ps, GU, GV, p, store)
        cores = dict(zip(names, moved))
        drifts = {t: float(v) for t, v in zip(names, drift2)}
    if not fresh:
        return U2, V2, cores, drifts, None, curve, done
    new = project_all(U2, V2, B[None], A[None], torch.tensor([scale], dtype=f64), [B.shape[1]], p, store)[0]
    return U2, V2, cores, drifts, (new.E, new.F, new.err2, new.norm2), curve, done


def add(
    zoo_path: str | Path,
    sources: Iterable[str],
    *,
    grow: str | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    layout: str = "auto",
    max_error: float | None = None,
    anchors: int | None = None,
) -> dict:
    """Fold ``sources`` into the zoo, one adapter at a time; returns {old adapter: relative drift}.

    ``layout`` overrides key-layout detection; modules are matched to the zoo's by name, or
    across layouts by their canonical identity (``formats.align_modules``).
    """
    if grow not in (None, "auto", "off"):
        raise ValueError("--grow must be auto or off")
    zoo_path = Path(zoo_path)
    known = zoo_module_layouts(ZooReader(zoo_path).manifest)  # not a zoo → clear error before reading any source
    adapters = find_adapters(list(sources), rank=rank, alpha=alpha, layout=layout, known=known)
    return add_adapters(zoo_path, adapters, grow=grow, progress=progress, max_error=max_error, anchors=anchors)


def add_adapters(
    zoo_path: Path, adapters: list[Adapter], *, grow: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    keep: dict[str, tuple[int, int]] | None = None,
    max_error: float | None = None,
    anchors: int | None = None,
) -> dict:
    """``add`` on adapters already read (from files, or trained in the zoo's subspace: ``ops.commit``).

    ``keep`` {module: (φ_u, φ_v)}: those modules grow by exactly that many directions per side
    (a committed task's new directions, kept whole), whatever the zoo's rule.
    ``max_error`` (default: the zoo's own, from ``merge --max-error``) holds every adapter's error
    ≤ X: a new adapter above it gets a private residual, and an old one whose bound this add would
    lift above it folds what the add moved into its residual (``absorb_drift``).
    ``anchors``: how many earlier basis generations to keep for tight bounds (``ops.anchors``); None:
    at most 4, and never more bytes than the zoo's own bases, cores and residuals.
    ``grow`` None: ``off`` for a budgeted zoo (k and p reallocated to stay within the budget,
    ``hold_budget``), else ``auto`` (an energy zoo may grow k).
    """
    if grow not in (None, "auto", "off"):
        raise ValueError("--grow must be auto or off")
    if max_error is not None and not (math.isfinite(max_error) and max_error > 0):
        raise ValueError("--max-error must be a positive number")
    if anchors is not None and anchors < 0:
        raise ValueError("--anchors must be 0 or more")
    with Transaction(zoo_path) as tx:
        manifest = tx.manifest  # edited in place: on failure the transaction publishes nothing
        check_new(manifest, adapters)
        zoo = ZooReader.from_manifest(zoo_path, tx.manifest, tx.digest)
        store = STORE_DTYPES[manifest["dtype"]]
        limit = max_error if max_error is not None else manifest.get("max_error")
        budget = (manifest.get("k_rule") or {}).get("budget")
        if grow is None:
            grow = "off" if budget is not None else "auto"
        bases = zoo.bases()
        cores = {e["name"]: zoo.cores(e["name"]) for e in manifest["adapters"]}
        residuals = {e["name"]: zoo.residuals(e["name"]) for e in manifest["adapters"]}
        entries = {e["name"]: e for e in manifest["adapters"]}
        # each old adapter before this add moved it: (its bound, its summed drift) per module, and, where
        # a limit may make it take its drift back, its reconstruction as factors
        prior = {t: {m: (module_bound2(mod), mod.get("drift", 0.0)) for m, mod in entries[t]["modules"].items()} for t in cores}
        old_bases = dict(bases)  # references to the tensors, no copies
        old_cores = {t: dict(cores[t]) for t in cores}
        before = {t: (old_bases, old_cores[t], residuals[t]) for t in cores} if limit is not None else {}
        step_drift: dict[str, float] = {}
        steps = sum(len(a.modules) for a in adapters)
        done_steps = 0
        for adapter in adapters:
            entry = adapter_entry(adapter)
            new_cores: dict[str, tuple] = {}
            for module, spec in adapter.modules.items():
                b, a = adapter.factors(module)
                info = manifest["modules"].get(module)
                n, d = spec.n, spec.d
                if info is None:
                    U, V = torch.zeros(n, 0, dtype=store), torch.zeros(d, 0, dtype=store)
                else:
                    U, V = bases[module]
                rule = _rule_for(manifest, (U.shape[1], V.shape[1]), grow, (keep or {}).get(module))
                holders = {t: cores[t][module] for t in cores if module in cores[t]}
                U2, V2, moved, drifts, new, curve, sweeps_done = fold_module(
                    U, V, holders, b, a, spec.scale, rule, manifest.get("method", "share"),
                    manifest.get("sweeps", 3), (info or {}).get("p") or manifest.get("p"), store,
                )
                check_finite(adapter.source, module, (U2, V2, new[0], new[1], *(x for pair in moved.values() for x in pair)),
                             (new[2], new[3], *drifts.values()))
                bases[module] = (U2, V2)
                for t, pair in moved.items():  # how far each moved is measured once, at the end of the add
                    cores[t][module] = pair
                    entries[t]["modules"][module]["p"] = pair[0].shape[1]
                E, F, err2, norm2 = new
                new_cores[module] = (E, F)
                entry["modules"][module] = {
                    "rank": spec.rank, "scale": spec.scale, "p": E.shape[1], "err2": err2, "norm2": norm2,
                    "drift": 0.0, **source_keys(spec),
                }
                manifest["modules"][module] = module_info(info, n, d, U2.shape[1], V2.shape[1], curve, sweeps_done)
                done_steps += 1
                if progress:
                    progress(done_steps, steps, f"{adapter.name}: {module}")
            cores[adapter.name] = new_cores
            residuals[adapter.name] = {}
            entry["file"] = None
            entries[adapter.name] = entry
            manifest["adapters"].append(entry)

        if budget is not None and grow == "off":
            hold_budget(zoo_path, manifest, bases, cores, entries, store, fold_module)
        fresh = {a.name: a for a in adapters}
        for adapter in adapters:  # measured again where they end: exact, even when a later one moved them
            residuals[adapter.name] = measure_new(adapter, entries[adapter.name], bases, cores[adapter.name], limit, store)
        # each old adapter's move over the whole add, exactly (not the sum of its steps)
        grams: dict[str, tuple] = {}
        for t, own in old_cores.items():
            for module, old in own.items():
                if cores[t][module] is old:
                    continue
                moved2 = module_move2(module, old_bases[module], bases[module], old, cores[t][module], grams)
                move(entries[t]["modules"][module], moved2**0.5)
                step_drift[t] = step_drift.get(t, 0.0) + moved2
        tight = Anchors(zoo)
        for t in [t for t in step_drift if t not in fresh]:
            tight.tighten(entries[t], bases, cores[t], residuals[t])
            if limit is not None:
                moved2 = absorb_drift(t, entries[t], before[t], prior[t], bases, cores[t], residuals, limit, store, zoo_path,
                                      lambda e=entries[t]: tight.totals(e))
                if moved2 is not None:
                    step_drift[t] = moved2
                    tight.tighten(entries[t], bases, cores[t], residuals[t])
        if limit is not None:
            manifest["max_error"] = limit

        write_generation(tx, manifest, bases, cores, fresh, residuals)
        for name in fresh:
            anchor_here(manifest, entries[name], tx.root)
        prune(manifest, anchors, tx.root)
        for entry in manifest["adapters"]:
            finish_adapter_entry(entry)
        refresh_module_stats(manifest)
        manifest["updated"] = now()
        tx.commit(manifest)
    norms = {e["name"]: e["norm2"] for e in manifest["adapters"]}
    return {t: (v / norms[t]) ** 0.5 if norms[t] > 0 else 0.0 for t, v in step_drift.items() if t not in fresh}


def measure_new(adapter: Adapter, entry: dict, bases: dict, cores: dict, limit: float | None, store: torch.dtype) -> dict:
    """A new adapter where the add leaves it: its exact error per module (a later adapter of the same
    add may have moved it), and its first residual where ``limit`` asks for one (``guarantee``).
    Returns its residuals."""
    mods = entry["modules"]
    for module, (E, F) in cores.items():
        b, a = adapter.factors(module)
        U, V = bases[module]
        mod = mods[module]
        mod["err2"], _ = linalg.squared_error(b, a, adapter.modules[module].scale, U, E, F, V)
        mod["drift"], mod["p"] = 0.0, E.shape[1]
        mod.pop("bound2", None)
    return first_residual(adapter, mods, bases, cores, limit, store)


def _rule_for(manifest: dict, k_old: tuple[int, int], grow: str, keep: tuple[int, int] | None = None) -> KRule:
    """The zoo's own k rule; an energy zoo never shrinks k, and with ``grow off`` keeps it.

    A fixed-k zoo keeps k, or a module's larger k where a commit grew it (``ops.commit``).
    ``keep`` = (φ_u, φ_v): new directions a commit brings, kept whole: k grows by them.
    """
    rule = manifest.get("k_rule") or {}
    if keep is not None:
        return KRule(sides=(k_old[0] + keep[0], k_old[1] + keep[1]))
    if rule.get("budget") is not None and k_old != (0, 0):
        return KRule(sides=k_old)  # a budgeted zoo's k were allocated for it: held (``ops.merge``)
    if rule.get("k") is not None:
        if k_old[0] > rule["k"] or k_old[1] > rule["k"]:
            return KRule(sides=(max(k_old[0], rule["k"]), max(k_old[1], rule["k"])))
        return KRule(k=rule["k"])
    floor = (max(k_old[0], 1), max(k_old[1], 1))
    new_module = k_old == (0, 0)
    return KRule(energy=rule.get("energy") or 0.99, k_min=floor, k_max=None if grow == "auto" or new_module else floor)


def check_shapes(zoo_path: Path, manifest: dict, bases: dict, cores: dict, residuals: dict) -> None:
    """Every tensor about to be written against what the manifest will say of it: a mismatch is a bug,
    and publishing it would leave a zoo nothing can read, so it stops the write (nothing published)."""
    wrong = []
    for module, (U, V) in bases.items():
        info = manifest["modules"].get(module)
        if info is None or list(U.shape) != [info["shape"][0], info["k_u"]] or list(V.shape) != [info["shape"][1], info["k_v"]]:
            wrong.append(f"basis of {module!r}")
    for entry in manifest["adapters"]:
        own = cores[entry["name"]]
        if set(own) != set(entry["modules"]):
            wrong.append(f"modules of {entry['name']!r}")
            continue
        for module, (E, F) in own.items():
            info, mod = manifest["modules"][module], entry["modules"][module]
            if list(E.shape) != [info["k_u"], mod["p"]] or list(F.shape) != [mod["p"], info["k_v"]]:
                wrong.append(f"cores of {entry['name']!r} in {module!r}")
            held = residuals.get(entry["name"], {}).get(module)
            if (held[0].shape[1] if held is not None else 0) != mod.get("residual", 0):
                wrong.append(f"residual of {entry['name']!r} in {module!r}")
    if wrong:
        raise ZooError(zoo_path, f"internal error, nothing was written: {wrong[0]} disagrees with the manifest "
                                 f"({len(wrong)} such); please report it")


def write_generation(tx: Transaction, manifest: dict, bases, cores, fresh: dict[str, Adapter], residuals: dict) -> None:
    """Every file of the new generation under fresh names, before the manifest names them.

    ``residuals`` {adapter: {module: (RU, RV)}}: the private residuals (``--max-error``) travel with
    each adapter's cores into its new file.
    """
    check_shapes(tx.zoo, manifest, bases, cores, residuals)
    gen = tx.generation
    basis_rel = f"basis.g{gen}.safetensors"
    flat = {}
    for module, (U, V) in bases.items():
        flat[f"{module}.U"], flat[f"{module}.V"] = U, V
    manifest["basis_sha256"] = save_tensors(tx.root, basis_rel, flat, BASIS_METADATA)
    manifest["basis_file"] = basis_rel
    pause_point("after-basis")
    used = {Path(e["file"]).name.split(".")[0].lower() for e in manifest["adapters"] if e.get("file")}
    for entry in manifest["adapters"]:
        tensors = {}
        for module, (E, F) in cores[entry["name"]].items():
            tensors[f"{module}.E"], tensors[f"{module}.F"] = E, F
        for module, (RU, RV) in residuals.get(entry["name"], {}).items():
            if RU.shape[1]:
                tensors[f"{module}.RU"], tensors[f"{module}.RV"] = RU, RV
        if entry["name"] in fresh:
            stem = unique_stem(entry["name"], used)
            entry.update(write_adapter_files(tx.adapters, stem, encode(tensors, CORES_METADATA), fresh[entry["name"]].extra_tensors(), gen))
        else:
            stem = entry["file"].rsplit("/", 1)[1].split(".")[0]
            name = f"{stem}.g{gen}.safetensors"
            entry["file_sha256"] = save_tensors(tx.adapters, name, tensors, CORES_METADATA)
            entry["file"] = f"adapters/{name}"
        finish_adapter_entry(entry)
        pause_point("between-adapters")
    for adapter in fresh.values():  # read and hashed: each must still be the file whose header was read
        adapter.file.check_unchanged()
