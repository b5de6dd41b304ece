"""Per-adapter parameters of whole modules (PEFT's modules_to_save: classifier heads and the like).

The module keeps its own parameters (the base model's); an adapter's tensors replace them for
its rows only, through ``torch.func.functional_call``, one call per group of rows that share an
adapter. Heads of different widths (a 2-label and a 4-label task in one batch) give the widest
output, each row padded with -inf: probability 0 under softmax, never a real class.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .routing import Routing


class HeadSwitch(nn.Module):
    def __init__(self, base_layer: nn.Module, overrides: list[dict[str, torch.Tensor] | None], routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.overrides = overrides + [None]  # the base model's slot
        self.routing = routing

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for o in self.overrides if o for t in o.values())

    def _run(self, slot: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        params = self.overrides[slot]
        if params is None:
            return self.base_layer(x, *args, **kwargs)
        return functional_call(self.base_layer, params, (x, *args), kwargs, strict=False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        r = self.routing
        if r.rows is None:
            return self._run(r.single, x, *args, **kwargs)
        r.rows_on(x.device, x.shape[0])  # checks the batch size
        parts = [(rows, self._run(slot, x[rows], *args, **kwargs)) for slot, rows in r.groups()]
        width = max(out.shape[-1] for _, out in parts)
        first = parts[0][1]
        result = first.new_full((x.shape[0], *first.shape[1:-1], width), float("-inf"))
        for rows, out in parts:
            result[rows, ..., : out.shape[-1]] = out
        return result
