"""One module's shared bases and every adapter's core, and the low-rank update they make.

ΔŴ_t = U·E_t·F_t·Vᵀ (DESIGN.md §8): the input is projected once for the whole batch (z = x·V,
one GEMM d → k_v), each row goes through its own adapter's small core (F then E: k_v → p → k_u),
and the result is lifted once (·Uᵀ, one GEMM k_u → n). Cores are stacked by pseudo-rank p (one
stack per distinct p, usually one or two), so memory is exactly Σ_t (k_u + k_v)·p_t, and a mixed
batch costs one gather and two batched matmuls per stack present in it.
"""

from __future__ import annotations

import torch
from torch import nn

from .routing import Routing


class CoreBank(nn.Module):
    """U (n × k_u), V (d × k_v) and, per distinct p, E (m, k_u, p) and F (m, p, k_v): non-persistent buffers."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, cores: list[tuple[torch.Tensor, torch.Tensor] | None],
                 routing: Routing, device: torch.device, dtype: torch.dtype,
                 residuals: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> None:
        super().__init__()
        self.routing = routing
        self.register_buffer("U", U.to(device=device, dtype=dtype).contiguous(), persistent=False)
        self.register_buffer("V", V.to(device=device, dtype=dtype).contiguous(), persistent=False)
        by_p: dict[int, list[int]] = {}
        for t, pair in enumerate(cores):
            if pair is not None and pair[0].shape[1] > 0:
                by_p.setdefault(pair[0].shape[1], []).append(t)
        self.widths = sorted(by_p)
        # where each slot's core lives: (stack, position); -1 for none (the base model's slot, and
        # the slot of a task in training, whose cores are the wrapper's ``live`` module, included)
        stack_of = torch.full((len(cores) + 2,), -1, dtype=torch.long)
        position = torch.zeros(len(cores) + 2, dtype=torch.long)
        for i, p in enumerate(self.widths):
            members = by_p[p]
            E = torch.stack([cores[t][0] for t in members]).to(device=device, dtype=dtype)
            F = torch.stack([cores[t][1] for t in members]).to(device=device, dtype=dtype)
            self.register_buffer(f"E{i}", E.contiguous(), persistent=False)
            self.register_buffer(f"F{i}", F.contiguous(), persistent=False)
            stack_of[members] = i
            position[members] = torch.arange(len(members))
        self.stack_of, self.position = stack_of.tolist(), position.tolist()
        self.register_buffer("_stack_of", stack_of.to(device), persistent=False)
        self.register_buffer("_position", position.to(device), persistent=False)
        # private residuals (``merge --max-error``): slot → (RU n × q, RV d × q), each its own low-rank path
        self.residual_slots: list[int] = []
        for t, pair in enumerate(residuals or []):
            if pair is not None and pair[0].shape[1] > 0:
                self.register_buffer(f"RU{t}", pair[0].to(device=device, dtype=dtype).contiguous(), persistent=False)
                self.register_buffer(f"RV{t}", pair[1].to(device=device, dtype=dtype).contiguous(), persistent=False)
                self.residual_slots.append(t)
        self._plan: tuple[tuple, list] | None = None
        self._active: tuple[int, bool] | None = None
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def stacks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"E{i}"), getattr(self, f"F{i}")) for i in range(len(self.widths))]

    def residual(self, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(RU, RV) of the adapter in ``slot``, or None when it has no private residual here."""
        return (getattr(self, f"RU{slot}"), getattr(self, f"RV{slot}")) if slot in self.residual_slots else None

    def residual_rows(self, rows: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """[(slot, its rows)] of the batch's adapters that hold a private residual here."""
        if not self.residual_slots:
            return []
        return [(t, sel) for t in self.residual_slots if (sel := (rows == t).nonzero().squeeze(1)).numel()]

    def core_bytes(self) -> int:
        own = sum(getattr(self, f"R{x}{t}").numel() * self.U.element_size() for t in self.residual_slots for x in "UV")
        return sum(t.numel() * t.element_size() for pair in self.stacks() for t in pair) + own

    def folded_bytes(self) -> int:
        """The single adapter's folded factors, while cached (see ``folded``)."""
        if self._folded is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._folded[1:])

    def basis_bytes(self) -> int:
        return self.U.numel() * self.U.element_size() + self.V.numel() * self.V.element_size()

    def active(self) -> bool:
        """False when no row of the next forward has a core here (the base model, or adapters without this module)."""
        r = self.routing
        if r.rows is None:
            return self.stack_of[r.single] >= 0 or r.single in self.residual_slots
        if self._active is None or self._active[0] != r.version:
            self._active = (r.version, any(self.stack_of[s] >= 0 or s in self.residual_slots for s in r.rows.tolist()))
        return self._active[1]

    def _rows_plan(self, rows: torch.Tensor) -> list:
        """[(stack, rows in it, their positions)] for the current routing; made once per ``use``."""
        key = (self.routing.version, torch.is_inference_mode_enabled())
        if self._plan is None or self._plan[0] != key:
            stack, pos = self._stack_of[rows], self._position[rows]
            plan = []
            for i in range(len(self.widths)):
                sel = (stack == i).nonzero().squeeze(1)
                if sel.numel():
                    plan.append((i, sel, pos[sel]))
            self._plan = (key, plan)
        return self._plan[1]

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) = (F_t·Vᵀ, U·E_t) of the one adapter every row uses: a plain rank-p LoRA, made once per ``use``.

        For a whole batch on one adapter this costs what PEFT costs (x·Aᵀ·Bᵀ, rank p) instead of
        going through both bases; it is p·(n + d) numbers, the size of that adapter alone, and is
        dropped at the next ``use``. Only the mixed batch needs the shared-basis path.
        """
        key = (self.routing.version, torch.is_inference_mode_enabled())
        if self._folded is None or self._folded[0] != key:
            slot = self.routing.single
            A, B = self.V.new_zeros(0, self.V.shape[0]), self.U.new_zeros(self.U.shape[0], 0)
            if self.stack_of[slot] >= 0:
                E, F = self.stacks()[self.stack_of[slot]]
                at = self.position[slot]
                A, B = F[at] @ self.V.mT, self.U @ E[at]
            own = self.residual(slot)
            if own is not None:  # the private residual's directions join the adapter's own factors
                A, B = torch.cat([A, own[1].mT]), torch.cat([B, own[0]], 1)
            self._folded = (key, A, B)
        return self._folded[1], self._folded[2]

    def forget(self) -> None:
        """Drop what was derived for the previous ``use`` (the folded factors, the row plan)."""
        self._folded = self._plan = self._active = None

    def lift(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, …, k_v) = x·V for the batch → the update (B, …, n): each row through its own core, then ·Uᵀ."""
        r = self.routing
        if r.rows is None:
            if self.stack_of[r.single] < 0:  # only a private residual here
                return z.new_zeros(*z.shape[:-1], self.U.shape[0])
            E, F = self.stacks()[self.stack_of[r.single]]
            at = self.position[r.single]
            return ((z @ F[at].mT) @ E[at].mT) @ self.U.mT
        rows = r.rows_on(z.device, z.shape[0])
        flat = z.reshape(z.shape[0], -1, z.shape[-1])
        plan = self._rows_plan(rows)
        stacks = self.stacks()
        if len(plan) == 1 and plan[0][1].numel() == z.shape[0]:  # every row in one stack: no scatter
            i, _, at = plan[0]
            E, F = stacks[i]
            w = torch.bmm(torch.bmm(flat, F[at].mT), E[at].mT)
        else:
            w = flat.new_zeros(flat.shape[0], flat.shape[1], self.U.shape[1])
            for i, sel, at in plan:
                E, F = stacks[i]
                w[sel] = torch.bmm(torch.bmm(flat[sel], F[at].mT), E[at].mT)
        return w.reshape(*z.shape[:-1], -1) @ self.U.mT
