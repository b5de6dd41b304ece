"""The ``--max-error`` guarantee kept by merge, add and remove: private residuals fit and refit.

A first fit (at merge, or for the adapter an add brings in) gives an adapter above the limit the
least residual that brings it a little under (``core.residual.first_target``). When a later add or
remove moves an old adapter, whose original is gone, its error is known only as a bound; where
that bound passes the mark, the move is folded back into the residual (``absorb_drift``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..core import linalg
from ..core.bounds import orthonormal, parts_of
from ..core.residual import factored_norm2, first_target, fit_residuals
from ..errors import InputError, ZooError
from ..io.adapter import Adapter
from .anchors import stored_factors
from .entries import check_finite, finish_adapter_entry, relative

f64 = torch.float64


def dtype_name(store: torch.dtype) -> str:
    return str(store).removeprefix("torch.")


def missed(adapter: Adapter, bases: dict, cores: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (L, R)}: what the shared fit misses of the adapter, ΔW − U·E·F·Vᵀ = L·R, as factors."""
    out = {}
    for module, (E, F) in cores.items():
        b, a = adapter.factors(module)
        U, V = (t.to(f64) for t in bases[module])
        out[module] = (torch.cat([adapter.modules[module].scale * b, -(U @ E.to(f64))], 1), torch.cat([a, F.to(f64) @ V.T], 0))
    return out


def above_mark(mods: dict, limit: float | None) -> bool:
    """Whether an adapter's exact error (its modules' ``err2``) is above the first fit's mark under ``limit``."""
    return limit is not None and relative(sum(m["err2"] for m in mods.values()), sum(m["norm2"] for m in mods.values())) > first_target(limit)


def first_residual(adapter: Adapter, mods: dict, bases: dict, cores: dict, limit: float | None,
                   store: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's residual where its exact error is above the mark under ``limit`` (``mods`` its
    manifest modules, their ``err2`` exact on ``bases`` and ``cores``); records each module's residual
    rank, exact error and ``err_parts`` (its anchor is here). Returns {module: (RU, RV)}."""
    parts = missed(adapter, bases, cores)
    out: dict = {}
    if above_mark(mods, limit):
        norm2 = sum(m["norm2"] for m in mods.values())
        fitted = fit_residuals({m: (L, R, 0.0) for m, (L, R) in parts.items()}, first_target(limit) ** 2 * norm2, store)
        if fitted is None:
            raise InputError(adapter.source, f"--max-error {limit:g} is below what {dtype_name(store)} storage can hold "
                                             "for this adapter; store the zoo as float32 (--dtype float32)")
        for module, (RU, RV, tail2) in fitted.items():
            if RU.shape[1]:
                check_finite(adapter.source, module, (RU, RV), (tail2,))
                out[module] = (RU, RV)
                mods[module]["residual"], mods[module]["err2"] = RU.shape[1], tail2
    for module, (L, R) in parts.items():
        if module in out:
            L, R = torch.cat([L, -out[module][0].to(f64)], 1), torch.cat([R, out[module][1].to(f64).T], 0)
        U, V = bases[module]
        mods[module]["err_parts"] = parts_of(orthonormal(U), orthonormal(V), L, R)
    return out


def _towards(reference: dict, bases: dict, cores: dict, floors: dict) -> dict:
    """{module: (L, R, floor)} for M = (``reference``, an earlier stored update L₀·R₀) − (the shared part now)."""
    out = {}
    for module, (L0, R0) in reference.items():
        U, V = (t.to(f64) for t in bases[module])
        E, F = (t.to(f64) for t in cores[module])
        out[module] = (torch.cat([L0, -(U @ E)], 1), torch.cat([R0, F @ V.T], 0), floors[module])
    return out


def _hold(mod: dict, own: dict, module: str, RU: torch.Tensor, RV: torch.Tensor) -> None:
    """A module's new private residual, in the adapter's residuals and its manifest entry (none when empty)."""
    if RU.shape[1]:
        own[module] = (RU, RV)
        mod["residual"] = RU.shape[1]
    else:
        mod.pop("residual", None)


def _fits_in(fitted: dict, bases: dict, kept: dict | None = None) -> bool:
    """No module's residual (with what ``kept`` holds already) would have more directions than the module's rank."""
    kept = kept or {}
    return all(RU.shape[1] + (kept[m][0].shape[1] if m in kept else 0) <= min(bases[m][0].shape[0], bases[m][1].shape[0])
               for m, (RU, _, _) in fitted.items())


def absorb_drift(name: str, entry: dict, before: tuple, prior: dict, bases: dict, cores: dict, residuals: dict,
                 limit: float, store: torch.dtype, zoo_path: Path,
                 anchored: Callable[[], dict | None] | None = None) -> float | None:
    """Hold an old adapter's bound ≤ ``limit`` after an add (or a remove) moved it; returns its move²
    over the operation (None: untouched).

    Without the original, its error is known only as a bound. Where it has an anchor
    (``anchored()``: its stored update at its exact point, built only when needed), its residual is refit on
    M = Ŵ₀ − (the new shared part), with the exact error there as the floor: the floor never grows
    from add to add. Else on M = (its reconstruction before) − (the new shared part), with its bound
    before as the floor; in float16 or bfloat16, where rounding a whole new residual costs more than
    the room left, the old residual stays as it was and new directions are fit to the shared part's
    move alone. Either way, the least that brings the bound back to ≤ limit.
    ``before`` = (bases, cores, residuals) before the operation; ``prior`` {module: (bound², drift)}.
    """
    finish_adapter_entry(entry)
    if entry["relative_error"] <= first_target(limit):  # taken back once it passes the first fit's mark
        return None
    mods = entry["modules"]
    anchored = anchored() if anchored is not None else None
    if anchored is not None:
        fitted = fit_residuals(_towards(anchored, bases, cores, {m: mod["err2"] ** 0.5 for m, mod in mods.items()}),
                               limit**2 * entry["norm2"], store)  # the floor sits under X by the first fit's room
        if fitted is not None and _fits_in(fitted, bases):
            return _refit(name, mods, fitted, {}, bases, cores, residuals, before, prior, from_anchor=True)

    old_bases, old_cores, old_residuals = before
    floors = {m: prior[m][0] ** 0.5 for m in old_cores}
    aims = [first_target(limit) ** 2 * entry["norm2"], limit**2 * entry["norm2"]]  # room for the next move where it can be had

    def fit(own: dict) -> dict | None:
        parts = _towards(stored_factors(old_bases, old_cores, own), bases, cores, floors)
        return next((f for f in (fit_residuals(parts, t, store) for t in aims) if f is not None), None)

    fitted, kept = fit(old_residuals), {}
    if fitted is None and old_residuals:
        fitted, kept = fit({}), old_residuals
        if fitted is not None and not _fits_in(fitted, bases, kept):
            fitted = None
    if fitted is None:
        floors2 = sum(prior[m][0] for m in old_cores)
        if floors2 > aims[1]:
            raise ZooError(zoo_path, f"adapter {name!r}: its error bound before this change, ≤ {relative(floors2, entry['norm2']):.4g}, "
                                     f"is already above --max-error {limit:g}; without its original nothing can bring it down "
                                     "(merge it again with --max-error, or use a larger one)")
        raise ZooError(zoo_path, f"adapter {name!r}: --max-error {limit:g} cannot be held in {dtype_name(store)} storage "
                                 "after this change (rounding its residual costs more than the room it has left under the "
                                 "limit); merge with --dtype float32, or use a larger --max-error")
    return _refit(name, mods, fitted, kept, bases, cores, residuals, before, prior, from_anchor=False)


def _refit(name: str, mods: dict, fitted: dict, kept: dict, bases: dict, cores: dict, residuals: dict,
           before: tuple, prior: dict, from_anchor: bool) -> float:
    """File a refit residual (after ``kept``, the old one kept as it was) and each module's new bound
    and drift; returns the adapter's move² over the operation."""
    was = stored_factors(*before)
    residuals[name] = {}
    total = 0.0
    for module, (RU, RV, tail2) in fitted.items():
        check_finite(name, module, (RU, RV), (tail2,))
        if module in kept:  # the old residual as it was, the move's directions after it
            RU, RV = torch.cat([kept[module][0], RU], 1), torch.cat([kept[module][1], RV], 1)
        mod = mods[module]
        _hold(mod, residuals[name], module, RU, RV)
        U, V = (t.to(f64) for t in bases[module])
        E, F = (t.to(f64) for t in cores[module])
        L0, R0 = was[module]  # the exact move over this operation, for the chain of drifts
        move2 = factored_norm2(torch.cat([L0, -(U @ E), -RU.to(f64)], 1), torch.cat([R0, F @ V.T, RV.to(f64).T], 0))
        bound2, drift = prior[module]
        mod["drift"] = drift + move2**0.5
        # by the triangle inequality, from the anchor's exact error, or from the bound before
        mod["bound2"] = ((mod["err2"] if from_anchor else bound2) ** 0.5 + tail2**0.5) ** 2
        total += move2
    return total


def module_move2(module: str, old_basis: tuple, basis: tuple, old: tuple, new: tuple, grams: dict) -> float:
    """‖U₀·E₀·F₀·V₀ᵀ − U·E·F·Vᵀ‖² from k-sized Grams (``grams`` caches each module's; a private residual
    the operation kept cancels)."""
    if module not in grams:
        (U0, V0), (U, V) = [(a.to(f64), b.to(f64)) for a, b in (old_basis, basis)]
        grams[module] = ((U0.T @ U0, U0.T @ U, U.T @ U), (V0.T @ V0, V0.T @ V, V.T @ V))
    GU, GV = grams[module]
    E0, F0, E, F = (t.to(f64) for t in (*old, *new))
    return float(linalg.difference_norm2(E0.T @ GU[0] @ E0, E0.T @ GU[1] @ E, E.T @ GU[2] @ E,
                                         F0 @ GV[0] @ F0.T, F0 @ GV[1] @ F.T, F @ GV[2] @ F.T))
