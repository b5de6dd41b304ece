"""Rigorous error bounds for an adapter the zoo has moved since its error was last measured.

At its exact point (the merge, or the add that brought it in) an adapter's stored update Ŵ₀
leaves R = ΔW − Ŵ₀, whose norm e is known exactly. With P_U, P_V the projectors onto that
point's bases (Q_U, Q_V orthonormal), I splits into four orthogonal parts X ↦ A·X·B for A, B
each P or I − P: both inside (P_U·X·P_V), left inside only, right inside only, both outside.
At the exact point the tool records ‖R‖ on each part, e_j (``err_parts``: e² = Σ e_j²).
Later adds move the stored update to Ŵ; with Δ = Ŵ₀ − Ŵ, ΔW − Ŵ = R + Δ and, since the parts
are orthogonal, Cauchy–Schwarz on each:

    ‖ΔW − Ŵ‖² = e² + ‖Δ‖² + 2⟨R, Δ⟩ ≤ e² + ‖Δ‖² + 2·Σ_j e_j·δ_j,   δ_j = ‖Δ on part j‖.

It is never above (e + ‖Δ‖)² (the triangle inequality on the total move, itself never above the
chain e + Σ per-add drifts). Where the core was a full projection, R has (up to rounding)
nothing inside both bases; a module's update lies inside both, so R's parts outside them meet
only the part of the move that leaves the anchor's span. Everything is computed on factors
(Ŵ = L·R), never on n × d matrices.
"""

from __future__ import annotations

import torch

from .linalg import factor_grams
from .residual import factored_norm2

f64 = torch.float64


def orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of a stored U or V (rounded in storage: not exactly orthonormal)."""
    return torch.linalg.qr(basis.to(f64))[0]


def split(total2: float, left_in2: float, right_in2: float, in2: float) -> list[float]:
    """The four parts' squared norms [both in, left in only, right in only, both out] from
    ‖X‖², ‖P_U·X‖², ‖X·P_V‖², ‖P_U·X·P_V‖² (rounding can make a difference slightly negative: 0 then)."""
    return [max(in2, 0.0), max(left_in2 - in2, 0.0), max(right_in2 - in2, 0.0), max(total2 - left_in2 - right_in2 + in2, 0.0)]


def _measured(QU: torch.Tensor, QV: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> tuple[float, list[float]]:
    """(‖L·R‖², the four parts' squared norms) of a factored matrix for orthonormal Q_U, Q_V."""
    L, R = L.to(f64), R.to(f64)
    left, right = QU.T @ L, R @ QV
    total2 = factored_norm2(L, R)
    return total2, split(total2, factored_norm2(left, R), factored_norm2(L, right), float((left @ right).pow(2).sum()))


def parts_of(QU: torch.Tensor, QV: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> list[float]:
    """The four parts' norms of a factored matrix L·R (n × c, c × d) for orthonormal Q_U, Q_V."""
    return [x**0.5 for x in _measured(QU, QV, L, R)[1]]


def bound2(err2: float, parts: list[float], move2: float, moved: list[float]) -> float:
    """e² + ‖Δ‖² + 2·Σ e_j·δ_j (``moved``: the four δ_j², as ``split`` gives them)."""
    return err2 + move2 + 2.0 * sum(e * max(m, 0.0) ** 0.5 for e, m in zip(parts, moved))


def anchored_bound2(err2: float, parts: list[float], QU: torch.Tensor, QV: torch.Tensor,
                    L0: torch.Tensor, R0: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> float:
    """The bound on ‖ΔW − Ŵ‖² for Ŵ₀ = L0·R0 at the exact point and Ŵ = L·R now (any factors: e.g. a
    private residual that changed since); ``Frame.bound2`` is the fast case."""
    move2, moved = _measured(QU, QV, torch.cat([L0.to(f64), -L.to(f64)], 1), torch.cat([R0.to(f64), R.to(f64)], 0))
    return bound2(err2, parts, move2, moved)


def merge_parts(U: torch.Tensor, V: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                s: torch.Tensor, E: torch.Tensor, F: torch.Tensor, grams: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
    """``err_parts`` of every adapter of one module at the merge (T × 4), batched, from k- and r-sized products.

    U (n × k), V (d × k) as stored; P = UᵀB_t, Q = A_t·V as ``compress.project_all`` has them;
    E, F the stored cores. With U = Q_U·R_U, Q_Uᵀ·B = R_U⁻ᵀ·P; U·E·F·Vᵀ lies inside both bases, so
    every part outside them is ΔW's alone: ‖(I − P_U)·ΔW‖² = s²⟨BᵀB − B̃ᵀB̃, AAᵀ⟩ and so on.
    ``grams`` = (BᵀB, AAᵀ) when the caller has them.
    """
    U, V, P, Q, s, E, F = (t.to(f64) for t in (U, V, P, Q, s, E, F))
    RU, RV = torch.linalg.qr(U)[1], torch.linalg.qr(V)[1]
    eye_u, eye_v = torch.eye(RU.shape[0], dtype=f64, device=RU.device), torch.eye(RV.shape[0], dtype=f64, device=RV.device)
    Pt = torch.linalg.solve_triangular(RU.T, eye_u, upper=False) @ P  # Q_Uᵀ·B = R_U⁻ᵀ·UᵀB  (T, k, r)
    Qt = Q @ torch.linalg.solve_triangular(RV, eye_v, upper=True)  # A·Q_V  (T, r, k)
    s1 = s[:, None, None]
    inside = s1 * (Pt @ Qt) - RU @ E @ F @ RV.T
    BtB, AAt = grams if grams is not None else factor_grams(B, A)
    BB, AA = s1 * s1 * BtB, AAt
    BBin, AAin = s1 * s1 * (Pt.mT @ Pt), Qt @ Qt.mT
    inner = lambda G, H: (G * H).sum(dim=(-2, -1))  # noqa: E731
    left_out2 = inner(BB - BBin, AA)  # ‖(I − P_U)·R‖²
    right_out2 = inner(BB, AA - AAin)  # ‖R·(I − P_V)‖²
    out2 = inner(BB - BBin, AA - AAin)
    squared = torch.stack([inside.pow(2).sum(dim=(-2, -1)), right_out2 - out2, left_out2 - out2, out2], dim=1)
    return squared.clamp_min(0.0).sqrt()


class Frame:
    """One module between an anchor's bases (U₀, V₀) and today's (U, V): the k-sized products every
    adapter anchored there shares, so that each adapter's bound costs O(k²·p), never O(n).

    For Ŵ₀ = U₀·E₀·F₀·V₀ᵀ and Ŵ = U·E·F·Vᵀ (a private residual that did not change cancels in Δ).
    """

    def __init__(self, U0: torch.Tensor, V0: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> None:
        U0, V0, U, V = (t.to(f64) for t in (U0, V0, U, V))
        self.QU, self.QV = orthonormal(U0), orthonormal(V0)
        self.GU = (U0.T @ U0, U0.T @ U, U.T @ U)
        self.GV = (V0.T @ V0, V0.T @ V, V.T @ V)
        self.PU = (self.QU.T @ U0, self.QU.T @ U)
        self.PV = (V0.T @ self.QV, V.T @ self.QV)

    def bound2(self, err2: float, parts: list[float], E0: torch.Tensor, F0: torch.Tensor, E: torch.Tensor, F: torch.Tensor) -> float:
        E0, F0, E, F = (t.to(f64) for t in (E0, F0, E, F))
        # Δ = L·R with L = [U₀E₀, −UE], R = [F₀V₀ᵀ; FVᵀ]: its Grams and its coordinates inside the anchor's bases
        GL = torch.block_diag(E0, -E).T @ torch.cat([torch.cat([self.GU[0], self.GU[1]], 1),
                                                    torch.cat([self.GU[1].T, self.GU[2]], 1)]) @ torch.block_diag(E0, -E)
        GR = torch.block_diag(F0, F) @ torch.cat([torch.cat([self.GV[0], self.GV[1]], 1),
                                                  torch.cat([self.GV[1].T, self.GV[2]], 1)]) @ torch.block_diag(F0, F).T
        left = torch.cat([self.PU[0] @ E0, -(self.PU[1] @ E)], 1)  # Q_Uᵀ·L
        right = torch.cat([F0 @ self.PV[0], F @ self.PV[1]], 0)  # R·Q_V
        inner = lambda G, H: float((G * H).sum())  # noqa: E731
        move2 = max(inner(GL, GR), 0.0)
        moved = split(move2, inner(left.T @ left, GR), inner(GL, right @ right.T), float((left @ right).pow(2).sum()))
        return bound2(err2, parts, move2, moved)
