"""One module's shared bases and every adapter's core, and the low-rank update they make.

ΔŴ_t = U·E_t·F_t·Vᵀ (DESIGN.md §8): the input is projected once for the whole batch (z = x·V,
one GEMM d → k_v), each row goes through its own adapter's small core (F then E: k_v → p → k_u,
gathered by row and applied with two batched matmuls), and the result is lifted once (z·Uᵀ, one
GEMM k_u → n). The cores are stacked, zero-padded to the largest p, with one extra all-zero slot
that is the base model: a padded row contributes exactly zero.
"""

from __future__ import annotations

import torch
from torch import nn

from .routing import Routing


class CoreBank(nn.Module):
    """U (n × k_u), V (d × k_v), E (T+1, k_u, P), F (T+1, P, k_v) as non-persistent buffers."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, cores: list[tuple[torch.Tensor, torch.Tensor] | None],
                 routing: Routing, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        ku, kv = U.shape[1], V.shape[1]
        width = max([e.shape[1] for e, _ in filter(None, cores)], default=0)
        E = torch.zeros(len(cores) + 1, ku, width, dtype=dtype)
        F = torch.zeros(len(cores) + 1, width, kv, dtype=dtype)
        self.ps = []
        for t, pair in enumerate(cores):
            p = 0
            if pair is not None:
                p = pair[0].shape[1]
                E[t, :, :p], F[t, :p] = pair[0].to(dtype), pair[1].to(dtype)
            self.ps.append(p)
        self.ps.append(0)  # the base model's slot
        self.register_buffer("U", U.to(device=device, dtype=dtype).contiguous(), persistent=False)
        self.register_buffer("V", V.to(device=device, dtype=dtype).contiguous(), persistent=False)
        self.register_buffer("E", E.to(device), persistent=False)
        self.register_buffer("F", F.to(device), persistent=False)
        self.routing = routing

    def core_bytes(self) -> int:
        return self.E.numel() * self.E.element_size() + self.F.numel() * self.F.element_size()

    def basis_bytes(self) -> int:
        return self.U.numel() * self.U.element_size() + self.V.numel() * self.V.element_size()

    def active(self) -> bool:
        """False when no row of the next forward uses an adapter with a core here."""
        r = self.routing
        if r.rows is None:
            return self.ps[r.single] > 0
        return True

    def lift(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, …, k_v) = x·V for the batch → the update (B, …, n): each row through its own core, then ·Uᵀ."""
        r = self.routing
        if r.rows is None:
            p = self.ps[r.single]
            w = (z @ self.F[r.single, :p].mT) @ self.E[r.single, :, :p].mT
        else:
            rows = r.rows_on(z.device, z.shape[0])
            flat = z.reshape(z.shape[0], -1, z.shape[-1])
            w = torch.bmm(torch.bmm(flat, self.F[rows].mT), self.E[rows].mT).reshape(*z.shape[:-1], -1)
        return w @ self.U.mT
