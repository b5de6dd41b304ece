"""A new task's trainable cores inside one module's shared subspace (DESIGN.md §8a).

The update is ``[U | P]·C·[V | Q]ᵀ``: ``C`` ((k_u + φ) × (k_v + φ)) starts at zero, so the
model starts exactly at the base model, and it is linear in ``C``, so every entry gets a
gradient from the first step (no zero-times-zero start as with two LoRA factors). With
``extra = φ > 0``, ``P`` (n × φ) and ``Q`` (d × φ) are trainable new directions, kept outside
the bases by projecting the bases out at each forward, ``P ← P − U·(UᵀP)``: they can only add
what the subspace lacks. They start as random orthonormal directions (from torch's global
generator, so ``torch.manual_seed`` makes a run repeatable).
"""

from __future__ import annotations

import torch
from torch import nn


def _outside(basis: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` random orthonormal columns orthogonal to ``basis`` (n × k, orthonormal)."""
    n = basis.shape[0]
    draw = torch.randn(n, count, dtype=torch.float64)  # on the CPU whatever the device: one seed, one draw
    b = basis.detach().to("cpu", torch.float64)
    draw -= b @ (b.mT @ draw)
    draw -= b @ (b.mT @ draw)  # twice: orthogonal to working precision
    return torch.linalg.qr(draw)[0]


class LiveCore(nn.Module):
    """Trainable ``core`` (and with ``extra``, directions ``P``, ``Q``) for one module; U, V stay the bank's."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, extra: int) -> None:
        super().__init__()
        ku, kv = U.shape[1], V.shape[1]
        room_u, room_v = U.shape[0] - ku, V.shape[0] - kv
        self.extra = extra
        self.extra_u, self.extra_v = min(extra, room_u), min(extra, room_v)  # a full basis has no room left
        # float32 at least, as PEFT keeps adapter weights: half-precision Adam states diverge
        dtype = U.dtype if U.dtype in (torch.float32, torch.float64) else torch.float32
        kw = {"device": U.device, "dtype": dtype}
        self.core = nn.Parameter(torch.zeros(ku + self.extra_u, kv + self.extra_v, **kw))
        if self.extra_u:
            self.P = nn.Parameter(_outside(U, self.extra_u).to(**kw))
        if self.extra_v:
            self.Q = nn.Parameter(_outside(V, self.extra_v).to(**kw))

    def bases(self, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[U | P⊥] and [V | Q⊥]: the directions the update may use (in the cores' dtype)."""
        U, V = U.to(self.core.dtype), V.to(self.core.dtype)
        if self.extra_u:
            U = torch.cat([U, self.P - U @ (U.mT @ self.P)], dim=1)
        if self.extra_v:
            V = torch.cat([V, self.Q - V @ (V.mT @ self.Q)], dim=1)
        return U, V

    def lift(self, z: torch.Tensor, U_full: torch.Tensor) -> torch.Tensor:
        """z (…, k_v + φ), the input on [V | Q⊥] → the update (…, n)."""
        return (z @ self.core.mT) @ U_full.mT

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
