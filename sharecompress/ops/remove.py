"""``remove``: drop adapters from a zoo, and fit the bases to the adapters that stay, data-free.

What the remaining adapters hold lies inside span(U) ⊗ span(V), so the bases are refit on their
stored cores alone (the same small problem ``add`` solves, without a new adapter): a module's k
shrinks to what the zoo's rule asks of the remaining adapters, never grows, and a module no
adapter holds any more is dropped. Each remaining adapter's drift is measured exactly and
returned; where the bases keep their span (a fixed-k zoo whose adapters still fill it), nothing
moves and the files are carried over as they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from ..core.compress import KRule
from ..errors import ZooError
from ..store.reader import ZooReader
from ..store.transaction import Transaction
from .add import fold_module, write_generation
from .guarantee import absorb_drift
from .anchors import Anchors, move, prune
from .entries import check_finite, finish_adapter_entry, module_bound2, module_info, now, refresh_module_stats
from .merge import STORE_DTYPES



def remove(zoo_path: str | Path, names: Iterable[str]) -> dict[str, float]:
    """Drop ``names``; returns {remaining adapter: relative drift} for those the refit moved."""
    names = list(names)
    with Transaction(Path(zoo_path)) as tx:
        manifest = tx.manifest  # edited in place: on failure the transaction publishes nothing
        known = {e["name"] for e in manifest["adapters"]}
        missing = [n for n in names if n not in known]
        if missing:
            raise ZooError(zoo_path, f"no adapter named {missing[0]!r} in this zoo (it has: {', '.join(sorted(known))})")
        manifest["adapters"] = [e for e in manifest["adapters"] if e["name"] not in names]
        zoo = ZooReader.from_manifest(tx.zoo, manifest, tx.digest)
        bases = zoo.bases()
        cores = {e["name"]: zoo.cores(e["name"]) for e in manifest["adapters"]}
        residuals = {e["name"]: zoo.residuals(e["name"]) for e in manifest["adapters"]}
        entries = {e["name"]: e for e in manifest["adapters"]}
        limit = manifest.get("max_error")
        # as each adapter was: what --max-error takes a move back to (``add.absorb_drift``)
        old_bases, old_cores = dict(bases), {t: dict(own) for t, own in cores.items()}
        prior = {t: {m: (module_bound2(mod), mod.get("drift", 0.0)) for m, mod in e["modules"].items()} for t, e in entries.items()}
        drift2: dict[str, float] = {}
        moved = False
        for module in list(manifest["modules"]):
            holders = {t: cores[t][module] for t in cores if module in cores[t]}
            if not holders:  # nobody holds it any more
                del manifest["modules"][module]
                del bases[module]
                moved = True
                continue
            refit = _refit(manifest, module, bases[module], holders)
            if refit is None:
                continue
            (U2, V2), new_cores, drifts = refit
            moved = True
            bases[module] = (U2, V2)
            for t, pair in new_cores.items():
                cores[t][module] = pair
                mod = entries[t]["modules"][module]
                move(mod, drifts[t] ** 0.5)
                mod["p"] = pair[0].shape[1]
                drift2[t] = drift2.get(t, 0.0) + drifts[t]
        tight = Anchors(zoo)
        for t in list(drift2):
            tight.tighten(entries[t], bases, cores[t], residuals[t])
            if limit is not None:  # the zoo's guarantee holds through a remove as through an add
                moved2 = absorb_drift(t, entries[t], (old_bases, old_cores[t], residuals[t]), prior[t], bases, cores[t],
                                      residuals, limit, STORE_DTYPES[manifest["dtype"]], Path(zoo_path),
                                      lambda e=entries[t]: tight.totals(e))
                if moved2 is not None:
                    drift2[t] = moved2
                    moved = True
                    tight.tighten(entries[t], bases, cores[t], residuals[t])
        if moved:
            write_generation(tx, manifest, bases, cores, {}, residuals)
        prune(manifest, root=tx.root)  # anchors only removed adapters used go with them
        for entry in manifest["adapters"]:
            finish_adapter_entry(entry)
        refresh_module_stats(manifest)
        manifest["updated"] = now()
        tx.commit(manifest)
    norms = {e["name"]: e["norm2"] for e in manifest["adapters"]}
    return {t: (v / norms[t]) ** 0.5 if norms[t] > 0 else 0.0 for t, v in drift2.items() if v > 0}


def _refit(manifest: dict, module: str, basis: tuple[torch.Tensor, torch.Tensor], holders: dict) -> tuple | None:
    """New bases for one module fit on the remaining cores, their re-projected cores and exact drifts
    (``add.fold_module`` without a new adapter); None when the zoo's rule keeps the module's k."""
    U, V = basis
    info = manifest["modules"][module]
    rule = _shrink_rule(manifest, (U.shape[1], V.shape[1]))
    if rule.sides is not None and sum(E.shape[1] for E, _ in holders.values()) >= max(rule.sides):
        return None  # fixed sides, and the remaining cores' ranks still reach them: the refit keeps k (its cap)
    U2, V2, cores, drifts, _, curve, done = fold_module(
        U, V, holders, None, None, 0.0, rule, manifest.get("method", "share"), manifest.get("sweeps", 3),
        info.get("p") or manifest.get("p"), STORE_DTYPES[manifest["dtype"]])
    if (U2.shape[1], V2.shape[1]) == (U.shape[1], V.shape[1]):
        return None  # the remaining adapters still fill the module's k: its span, and every core, stay
    check_finite(module, module, (U2, V2, *(x for pair in cores.values() for x in pair)), list(drifts.values()))
    n, d = info["shape"]
    manifest["modules"][module] = module_info(info, n, d, U2.shape[1], V2.shape[1], curve, done)
    return (U2, V2), cores, drifts


def _shrink_rule(manifest: dict, k_old: tuple[int, int]) -> KRule:
    """The zoo's rule on the remaining adapters, never above the module's k: fixed k (a budget's sizes,
    or any k in a zoo with --max-error) stays, capped by what the remaining adapters span; an energy
    target may ask for less."""
    rule = manifest.get("k_rule") or {}
    if rule.get("k") is not None or rule.get("budget") is not None or manifest.get("max_error") is not None:
        # with a guarantee too: a basis direction given up would come back as the same direction in
        # every residual that needs it (measured: an energy zoo's residuals grew 11× on one remove)
        return KRule(sides=k_old)
    return KRule(energy=rule.get("energy") or 0.99, k_max=k_old)
