"""A budgeted zoo after ``add``: k and p reallocated, data-free, so that it stays within its budget.

``merge --budget`` chose k per module and side, and each module's core rank p, for the least error
within a size. An add brings new cores (and maybe new modules), so the zoo outgrows that size
unless something gives. Without the originals, the stored reconstructions are the data: each
module's stored updates on their own leading directions (``compress.spectrum``) are what
``budget.allocate`` works on, exactly as at the merge, and the modules whose (k_u, k_v, p) change
are refit on their stored cores (``add.fold_module`` without a new adapter); the add then measures every move exactly.
"""

from __future__ import annotations

import torch

from ..core.budget import ModuleSpectrum, allocate
from ..core.compress import KRule, spectrum
from ..errors import ZooError
from .entries import module_info

f64 = torch.float64


def stored_numbers(bases: dict, cores: dict) -> int:
    """Numbers in the bases and every adapter's cores (what a budget counts; residuals and heads apart)."""
    total = sum(U.numel() + V.numel() for U, V in bases.values())
    return total + sum(E.numel() + F.numel() for own in cores.values() for E, F in own.values())


def hold_budget(zoo_path, manifest: dict, bases: dict, cores: dict, entries: dict, store: torch.dtype, refit) -> int:
    """Bring the zoo back within ``manifest["k_rule"]["budget"]`` bytes; returns how many modules were
    resized (0 when it fits already). ``refit`` is ``add.fold_module``. Raises ZooError when even
    k = p = 1 everywhere does not fit."""
    limit = manifest["k_rule"]["budget"]
    size = torch.empty((), dtype=store).element_size()
    if stored_numbers(bases, cores) * size <= limit:
        return 0
    spectra, holders_of = {}, {}
    for module, (U, V) in bases.items():
        holders = {t: cores[t][module] for t in cores if module in cores[t]}
        holders_of[module] = holders
        U64, V64 = U.to(f64), V.to(f64)
        factors = [(U64 @ E.to(f64), F.to(f64) @ V64.T) for E, F in holders.values()]
        G = spectrum(factors, [1.0] * len(factors), width=(U.shape[1], V.shape[1]))  # never more than each side holds
        spectra[module] = ModuleSpectrum(U.shape[0], V.shape[0], [E.shape[1] for E, _ in holders.values()], G)
    try:
        sizes = allocate(spectra, limit // size, manifest.get("p"))
    except ValueError:
        raise ZooError(zoo_path, f"its size budget, {limit:,} bytes, cannot hold {len(cores)} adapters even at k = 1 "
                                 "for every module; add --grow auto lets it grow past the budget") from None
    resized = 0
    for module, (ku, kv, p) in sizes.items():
        U, V = bases[module]
        info = manifest["modules"][module]
        holders = holders_of[module]
        if (ku, kv) == (U.shape[1], V.shape[1]) and p == info.get("p") and all(E.shape[1] <= p for E, _ in holders.values()):
            continue
        U2, V2, moved, drifts, _, curve, done = refit(
            U, V, holders, None, None, 0.0, KRule(sides=(ku, kv)), manifest.get("method", "share"),
            manifest.get("sweeps", 3), p, store)
        bases[module] = (U2, V2)
        for t, pair in moved.items():  # the add measures how far each moved, once, at its end
            cores[t][module] = pair
            entries[t]["modules"][module]["p"] = pair[0].shape[1]
        # the sides the refit made (never above what the stored updates span)
        info.update(module_info(info, *info["shape"], U2.shape[1], V2.shape[1], curve, done), p=p)
        resized += 1
    return resized
