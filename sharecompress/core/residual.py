"""Private residuals: an adapter's own low-rank correction on top of the shared fit (``--max-error``).

Where the shared bases leave an adapter's error above a target X, the adapter keeps, per module,
the leading singular directions of what the zoo misses, M = ΔW − Ŵ (a matrix of rank at most
r + p, held as factors L·R and never formed). Stored as RU (n × q) and RV (d × q), its
reconstruction is Ŵ + RU·RVᵀ. How many directions each module gets is chosen for the least
stored numbers, q·(n + d), that brings the whole adapter's error to ≤ X (``choose_ranks``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

f64 = torch.float64


# A first fit aims this share under X: an adapter left right at X has no room for what a later add
# moves it by (nor, in half precision, for the rounding of a residual), so every add would have to
# fold its whole move into the residual (``add.absorb_drift``); with the room, a move costs only
# what brings it back within X.
HEADROOM = 0.05


def first_target(limit: float) -> float:
    """The error a first fit (at merge, or for an adapter an add brings in) aims for under ``limit``."""
    return limit * (1.0 - HEADROOM)


@dataclass
class Spectrum:
    """The thin SVD of one factored matrix L·R: ``left`` (n × c), ``sigma`` (c), ``right`` (d × c)."""

    left: torch.Tensor
    sigma: torch.Tensor
    right: torch.Tensor

    def tail2(self, q: int) -> float:
        """‖M − M_q‖²: what q leading directions leave."""
        return float(self.sigma[q:].pow(2).sum())

    def factors(self, q: int, store: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(RU, RV) of the best rank-q approximation, √σ on each side (balanced for float16), rounded."""
        root = self.sigma[:q].sqrt()
        return (self.left[:, :q] * root).to(store).contiguous(), (self.right[:, :q] * root).to(store).contiguous()


def factored_svd(L: torch.Tensor, R: torch.Tensor) -> Spectrum:
    """SVD of L (n × c) · R (c × d) through two thin QRs and a c × c SVD, in float64."""
    L, R = L.to(f64), R.to(f64)
    QL, RL = torch.linalg.qr(L)
    QR, RR = torch.linalg.qr(R.T)
    u, sigma, vt = torch.linalg.svd(RL @ RR.T)
    return Spectrum(QL @ u, sigma, QR @ vt.T)


def factored_norm2(L: torch.Tensor, R: torch.Tensor) -> float:
    """‖L·R‖²_F without forming it (two thin QRs: no cancellation between large terms)."""
    L, R = L.to(f64), R.to(f64)
    if L.shape[1] == 0:
        return 0.0
    return float((torch.linalg.qr(L)[1] @ torch.linalg.qr(R.T)[1].T).pow(2).sum())


@dataclass
class Candidate:
    """One module of one adapter: its error before any residual is ``floor`` + the residual's tail.

    The module's error bound with q directions is (floor + ‖M − M_q‖)²: floor = 0 at merge
    (M is the whole error), and an earlier bound where an ``add`` folds its drift into M.
    """

    spectrum: Spectrum
    floor: float
    cost: int  # numbers stored per direction: n + d

    def bound2(self, q: int) -> float:
        return (self.floor + self.spectrum.tail2(q) ** 0.5) ** 2


def choose_ranks(candidates: dict[str, Candidate], target2: float) -> dict[str, int] | None:
    """q per module with Σ bound² ≤ target2 at (near) the least Σ q·cost; None when even every
    direction cannot reach it.

    Greedy on the bound² each next direction removes per number it stores (within a module the
    directions come in σ order), then a pass that gives back every direction the target does not need.
    """
    q = {m: 0 for m in candidates}
    total = sum(c.bound2(0) for c in candidates.values())
    heap: list[tuple[float, str]] = []

    def push(m: str) -> None:
        c = candidates[m]
        if q[m] < c.spectrum.sigma.numel():
            gain = c.bound2(q[m]) - c.bound2(q[m] + 1)
            heapq.heappush(heap, (-gain / c.cost, m))

    for m in candidates:
        push(m)
    while total > target2:
        if not heap:
            return None
        _, m = heapq.heappop(heap)
        total += candidates[m].bound2(q[m] + 1) - candidates[m].bound2(q[m])
        q[m] += 1
        push(m)
    dropped = True
    while dropped:  # until no single direction can go
        dropped = False
        for m in sorted(candidates, key=lambda m: -candidates[m].cost):
            c = candidates[m]
            while q[m] > 0 and total + c.bound2(q[m] - 1) - c.bound2(q[m]) <= target2:
                total += c.bound2(q[m] - 1) - c.bound2(q[m])
                q[m] -= 1
                dropped = True
    return q


def fit_residuals(
    parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]], target2: float, store: torch.dtype,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None:
    """{module: (RU, RV, ‖M − RU·RVᵀ‖²)} for one adapter, the least that brings Σ (floor + tail)² to ≤ target2.

    ``parts`` {module: (L, R, floor)}, M = L·R. The tails are measured exactly on the stored
    (rounded) factors; where rounding leaves the sum above the target, the module that gains most
    per number gets one more direction, until it holds. None when every direction cannot reach it.
    """
    spectra = {m: factored_svd(L, R) for m, (L, R, _) in parts.items()}
    candidates = {m: Candidate(spectra[m], floor, parts[m][0].shape[0] + parts[m][1].shape[1])
                  for m, (_, _, floor) in parts.items()}
    q = choose_ranks(candidates, target2)
    if q is None:
        return None
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def realise(m: str) -> None:
        L, R, _ = parts[m]
        RU, RV = spectra[m].factors(q[m], store)
        tail2 = factored_norm2(torch.cat([L.to(f64), -RU.to(f64)], 1), torch.cat([R.to(f64), RV.to(f64).T], 0))
        out[m] = (RU, RV, tail2)

    for m in parts:
        realise(m)
    bound2 = lambda m: (parts[m][2] + out[m][2] ** 0.5) ** 2  # noqa: E731
    while sum(bound2(m) for m in parts) > target2:
        room = [m for m in parts if q[m] < spectra[m].sigma.numel()]
        if not room:
            return None
        best = max(room, key=lambda m: (bound2(m) - candidates[m].bound2(q[m] + 1)) / candidates[m].cost)
        q[best] += 1
        realise(best)
    return out
