"""The math of a shared basis, on factors only (DESIGN.md §2–§3). Pure functions on tensors.

Shapes for one module with T adapters, ranks zero-padded to r (zero columns of B / rows of A
change no ΔW): ``B (T, n, r)``, ``A (T, r, d)``, ``s (T,)``. No n × d matrix is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Eigenvalues of a float64 Gram below this share of the largest are rounding noise.
_NOISE_FLOOR = 1e-13


def left_blocks(B: torch.Tensor, A: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """X (T, n, c) with Σ_t X_t X_tᵀ = Σ_t ΔW_t ΔW_tᵀ, ΔW_t = s_t B_t A_t.

    Thin QR of A_tᵀ = Q_t R_t gives A_t A_tᵀ = R_tᵀ R_t, so X_t = s_t B_t R_tᵀ: the left
    singular subspace no longer depends on how B·A was split (gauge invariance).
    """
    R = torch.linalg.qr(A.transpose(-1, -2), mode="r")[1]
    return s[:, None, None] * (B @ R.transpose(-1, -2))


def right_blocks(B: torch.Tensor, A: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Y with Σ Y_t Y_tᵀ = Σ ΔW_tᵀ ΔW_t (the row space of the updates)."""
    return left_blocks(A.transpose(-1, -2), B.transpose(-1, -2), s)


@dataclass
class Subspace:
    """Top-k orthonormal basis of a stack and the stack's eigen-energies (σ², descending)."""

    basis: torch.Tensor  # (n, k), float64
    energies: torch.Tensor  # (min(n, m),), float64, σ_i² of the whole stack

    @property
    def total(self) -> float:
        return float(self.energies.sum())


def top_subspace(X: torch.Tensor, k: int, seed: int = 0) -> Subspace:
    """Top-k left singular vectors of [X_1 | … | X_T] through the smaller float64 Gram.

    Directions the stack does not have (k above its numerical rank, all-zero adapters) are
    completed with arbitrary orthonormal ones, so the basis always has k columns.
    """
    T, n, c = X.shape
    flat = X.permute(1, 0, 2).reshape(n, T * c).to(torch.float64)
    m = flat.shape[1]
    if m <= n:
        evals, evecs = torch.linalg.eigh(flat.T @ flat)
    else:
        evals, evecs = torch.linalg.eigh(flat @ flat.T)
    evals = evals.flip(0).clamp_min(0.0)
    evecs = evecs.flip(1)
    top = float(evals[0]) if evals.numel() else 0.0
    valid = int((evals[:k] > _NOISE_FLOOR * top).sum()) if top > 0 else 0
    if m <= n:
        basis = flat @ (evecs[:, :valid] / evals[:valid].sqrt())
        if valid:
            basis = torch.linalg.qr(basis)[0]
    else:
        basis = evecs[:, :valid]
    return Subspace(complete_basis(basis, n, k, seed), evals)


def complete_basis(basis: torch.Tensor, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Append orthonormal columns to ``basis`` (n × j, orthonormal) until it has k."""
    j = basis.shape[1]
    if j >= k:
        return basis[:, :k]
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randn(n, k - j, generator=gen, dtype=torch.float64)
    for _ in range(2):  # twice is enough for orthogonality to float64 precision
        extra = extra - basis @ (basis.T @ extra)
    extra = torch.linalg.qr(extra)[0]
    return torch.cat([basis, extra], dim=1)


def smallest_k_for_energy(energies: torch.Tensor, target: float) -> int:
    """Smallest k whose share of Σσ² reaches ``target`` (at least 1)."""
    total = float(energies.sum())
    if total <= 0:
        return 1
    cumulative = torch.cumsum(energies, 0) / total
    reached = torch.nonzero(cumulative >= target - 1e-12)
    return int(reached[0]) + 1 if reached.numel() else energies.numel()


def captured_energy(U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor) -> float:
    """Σ_t ‖Uᵀ ΔW_t V‖²: what orthonormal bases keep with full cores (HOOI's objective)."""
    core = s[:, None, None] * ((U.T @ B) @ (A @ V))
    return float((core.to(torch.float64) ** 2).sum())


def refine(
    U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, sweeps: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Alternating (HOOI) sweeps: best U for fixed V, then best V for fixed U.

    Each half-step is an exact top-k, so the captured energy never falls; stop early once
    a sweep gains less than one part in 1e9.
    """
    k = U.shape[1]
    best = captured_energy(U, V, B, A, s)
    done = 0
    for _ in range(sweeps):
        U_new = top_subspace(left_blocks(B, A @ V.to(A.dtype), s), k).basis
        V_new = top_subspace(right_blocks(U_new.T.to(B.dtype) @ B, A, s), k).basis
        gain = captured_energy(U_new, V_new, B, A, s)
        if gain < best:  # rounding only; keep the better pair
            break
        U, V, done = U_new, V_new, done + 1
        if gain - best <= 1e-9 * max(best, 1e-300):
            break
        best = gain
    return U, V, done


def core_factors(
    U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float, p: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """E (k × p), F (p × k) with E·F the best rank-p core for one adapter on these bases."""
    return core_from_projections(U.T @ B, A @ V, scale, p)


def core_from_projections(P: torch.Tensor, Q: torch.Tensor, scale: float, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the core C = s·P·Q (P = UᵀB, k × r; Q = A·V, r × k), cut to rank p by its SVD.

    With p ≥ r the core is kept exactly, split evenly as (√s P, √s Q).
    """
    r = P.shape[1]
    if p >= r:
        root = abs(scale) ** 0.5
        return (root if scale >= 0 else -root) * P, root * Q
    u, sv, vh = torch.linalg.svd(scale * (P @ Q))
    root = sv[:p].sqrt()
    return u[:, :p] * root, root[:, None] * vh[:p]


def gram_error2(XtX: torch.Tensor, YYt: torch.Tensor) -> float:
    """‖X Y‖²_F = trace((XᵀX)(YYᵀ)) for symmetric Gram blocks already formed."""
    return max(float(torch.sum(XtX * YYt)), 0.0)


def squared_error(
    B: torch.Tensor, A: torch.Tensor, scale: float, U: torch.Tensor, E: torch.Tensor, F: torch.Tensor, V: torch.Tensor
) -> tuple[float, float]:
    """(‖ΔW − U E F Vᵀ‖², ‖ΔW‖²) exactly, from (r + p)-sized Gram matrices in float64.

    X = [s B | −U E], Y = [A ; F Vᵀ]  ⇒  ‖X Y‖² = trace((XᵀX)(YYᵀ)). Holds for any U, V,
    orthonormal or not, so it measures what is stored (rounded to the storage dtype).
    """
    f64 = torch.float64
    B, A, U, E, F, V = (t.to(f64) for t in (B, A, U, E, F, V))
    X = torch.cat([scale * B, -(U @ E)], dim=1)
    Y = torch.cat([A, F @ V.T], dim=0)
    err2 = float(torch.sum((X.T @ X) * (Y @ Y.T)))
    norm2 = scale * scale * float(torch.sum((B.T @ B) * (A @ A.T)))
    return max(err2, 0.0), max(norm2, 0.0)
