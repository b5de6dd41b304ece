"""Choosing k per module and side for a size budget (``merge --budget`` / ``--ratio``).

A module at (k_u, k_v) with cores of pseudo-rank p keeps, on its stacks' leading directions, an
energy known before any basis is fitted (``ModuleSpectrum.captured``). So is the gain of each
move: one more component on a side (or on both at once, which adds their crossing term), or one
more rank in every core. A move costs what it adds to the stored numbers: a basis column (n or
d), or the cores' growth ((k_u + k_v)·p_t summed over the adapters). Cores are where a budget
finds room cheaply. On the sample adapters, cutting every core from its full rank to p = 4 at
k = 16 moved the zoo error from 0.21407 to 0.21420 and freed 8% of the bytes.

From k = p = 1 everywhere, the move with the largest gain per stored number is taken until none
fits the budget. Then exchanges: one unit taken back from a module and the room filled again
elsewhere, kept when it holds more. A greedy fill alone can lock k and p of a module into each
other, which the exchanges undo. The bases are then fitted and refined at the chosen k as usual,
so the merge's figures are exact, and refinement only adds to the gains.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``3MB``, ``1.5GB``, ``512KiB``, ``2000000`` → bytes (k, M, G, T are powers of 1000; Ki, Mi, … of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size: give e.g. 3MB, 1.5GB or 512KiB")
    unit = match.group(2).lower()
    unit = unit if unit.endswith("b") or unit == "" else unit + "b"
    if _UNITS[unit] == 1 and "." in match.group(1):
        raise ValueError(f"{text!r}: a number of bytes is a whole number")
    value = float(match.group(1)) * _UNITS[unit]
    if not value >= 1:
        raise ValueError(f"{text!r}: a budget must be at least one byte")
    return int(value)


@dataclass
class ModuleSpectrum:
    """What the allocation needs of one module: its shape, its adapters' ranks, and ``cores``:
    G_t = u_iᵀ·ΔW_t·v_j for every adapter t on the leading singular directions u_i, v_j of the
    module's two stacks (T × cap_u × cap_v).

    A merge at (k_u, k_v) with cores of pseudo-rank p keeps, on those directions, the energy of
    each G_t's leading k_u × k_v block cut to its best rank min(p, r_t): so every candidate's gain
    is exact for these bases, and refinement then only improves on it.
    """

    n: int
    d: int
    ranks: list[int]
    cores: torch.Tensor  # (T, cap_u, cap_v), float64

    def cap(self, side: int) -> int:
        return max(1, self.cores.shape[1 + side])

    def captured(self, ku: int, kv: int, p: int) -> float:
        sv = torch.linalg.svdvals(self.cores[:, :ku, :kv]).pow(2)  # (T, min(ku, kv)), descending
        keep = torch.tensor([min(p, r) for r in self.ranks])
        mask = torch.arange(sv.shape[1])[None, :] < keep[:, None]
        return float((sv * mask).sum())


def module_numbers(spec: ModuleSpectrum, ku: int, kv: int, p: int | None) -> int:
    """Numbers stored for one module at (k_u, k_v) and core pseudo-rank p: both bases and every core."""
    cores = sum((ku + kv) * min(r, ku, kv, p or r) for r in spec.ranks)
    return spec.n * ku + spec.d * kv + cores


MOVES = ((1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1))  # one more on U, on V, on both, or in each core's rank
BACK = (*MOVES, (1, 0, 1), (0, 1, 1), (1, 1, 1), (2, 0, 0), (0, 2, 0), (0, 0, 2))  # what an exchange may take back
MAX_ROUNDS = 20
EXCHANGE_TRIES = 48


def allocate(spectra: dict[str, ModuleSpectrum], budget_numbers: int, p: int | None = None) -> dict[str, tuple[int, int, int]]:
    """(k_u, k_v, p) per module: the most energy kept within ``budget_numbers`` stored numbers.

    A greedy fill on energy per stored number, then exchanges: take one unit back from a module
    (a component or a core rank) and fill again without it, keeping the result when it holds
    more. ``p`` caps every core's pseudo-rank (the user's ``--p``). Raises ValueError when even
    k = p = 1 everywhere does not fit.
    """
    top = {m: (s.cap(0), s.cap(1), min(p or max(s.ranks), max(s.ranks))) for m, s in spectra.items()}
    memo: dict[tuple[str, tuple[int, int, int]], float] = {}

    def kept(module: str, state: tuple[int, int, int]) -> float:
        if (module, state) not in memo:
            memo[module, state] = spectra[module].captured(*state)
        return memo[module, state]

    def numbers(module: str, state: tuple[int, int, int]) -> int:
        return module_numbers(spectra[module], *state)

    def usable(module: str, q: int) -> int:
        """Directions the cores can use at pseudo-rank q: the sum of their ranks (a merge's bases
        beyond it would hold nothing, and the next ``add`` would cut them)."""
        return sum(min(q, r) for r in spectra[module].ranks)

    def fill(state: dict[str, tuple[int, int, int]], frozen: tuple[str, tuple[int, int, int]] | None = None) -> dict:
        """Greedy from ``state``; ``frozen`` = (module, axes) whose axes may not grow."""
        state = dict(state)
        used = sum(numbers(m, st) for m, st in state.items())
        heap: list[tuple[float, str, tuple[int, int, int], int]] = []
        version = dict.fromkeys(state, 0)  # a module's entries are stale once it changed

        def push(module: str) -> None:
            now = state[module]
            for move in MOVES:
                grown = tuple(a + b for a, b in zip(now, move))
                if any(g > t for g, t in zip(grown, top[module])) or (
                        frozen and frozen[0] == module and any(a and b for a, b in zip(move, frozen[1]))):
                    continue
                if max(grown[:2]) > usable(module, grown[2]):
                    continue  # no core of this p could use another direction
                ratio = (kept(module, grown) - kept(module, now)) / max(numbers(module, grown) - numbers(module, now), 1)
                heapq.heappush(heap, (-ratio, module, grown, version[module]))

        for module in state:
            push(module)
        while heap:
            _, module, grown, seen = heapq.heappop(heap)
            if seen != version[module]:
                continue
            extra = numbers(module, grown) - numbers(module, state[module])
            if used + extra > budget_numbers:
                continue  # this one does not fit; a cheaper one elsewhere may
            state[module] = grown
            used += extra
            version[module] += 1
            push(module)
        return state

    start = {m: (1, 1, 1) for m in spectra}
    smallest = sum(numbers(m, st) for m, st in start.items())
    if smallest > budget_numbers:
        raise ValueError(f"the smallest zoo (k = 1 for every module) needs {smallest} numbers; the budget allows {budget_numbers}")
    best = fill(start)
    value = sum(kept(m, st) for m, st in best.items())
    for _ in range(MAX_ROUNDS):
        improved = False
        for module, back, now, lowered in _cheapest_units(best, kept, numbers, usable):
            if best[module] != now:
                continue  # this module moved in an earlier exchange of the round
            trial = fill({**best, module: lowered}, (module, back))
            trial_value = sum(kept(m, st) for m, st in trial.items())
            fits = sum(numbers(m, st) for m, st in trial.items()) <= budget_numbers
            if fits and trial_value > value * (1 + 1e-12):
                best, value, improved = trial, trial_value, True
        if not improved:
            break
    return best


def _cheapest_units(state, kept, numbers, usable) -> list:
    """The units an exchange may take back, least energy per number first, at most ``EXCHANGE_TRIES``:
    trying every one of every module costs (modules)² per round."""
    found = []
    for module, now in state.items():
        for back in BACK:
            lowered = tuple(v - b for v, b in zip(now, back))
            if min(lowered) < 1 or max(lowered[:2]) > usable(module, lowered[2]):
                continue
            freed = numbers(module, now) - numbers(module, lowered)
            found.append(((kept(module, now) - kept(module, lowered)) / max(freed, 1), module, back, lowered))
    found.sort(key=lambda item: item[0])
    return [(module, back, state[module], lowered) for _, module, back, lowered in found[:EXCHANGE_TRIES]]
