"""Per-adapter parameters of whole modules (PEFT's modules_to_save: classifier heads and the like).

The module keeps its own parameters (the base model's); an adapter's tensors replace them for
its rows only, through ``torch.func.functional_call``, one call per group of rows that share an
adapter. The tensors are non-persistent buffers, so they follow ``model.to(…)`` / ``.half()``
with the module they belong to. Heads of different widths (a 2-label and a 4-label task in one
batch) give the widest output, each row padded with -inf: probability 0 under softmax.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .routing import Routing
from .wrapper import Wrapper


class HeadSwitch(Wrapper):
    def __init__(self, base_layer, overrides: list[dict[str, torch.Tensor] | None], routing: Routing) -> None:
        super().__init__(base_layer)
        self.routing = routing
        self.names: list[dict[str, str] | None] = []  # per slot: {parameter: buffer name}
        for slot, tensors in enumerate(overrides):
            if tensors is None:
                self.names.append(None)
                continue
            names = {}
            for i, (param, tensor) in enumerate(tensors.items()):
                names[param] = f"slot{slot}_{i}"
                self.register_buffer(names[param], tensor, persistent=False)
            self.names.append(names)
        self.names.append(None)  # the base model's slot
        self.names.append(None)  # a task in training (``train``)

    def train_slot(self, slot: int) -> list[nn.Parameter]:
        """Trainable copies of the base module's parameters for ``slot``, the new task's own head,
        and copies of its buffers (running statistics update these, never the base module's)."""
        names, trainable = {}, []
        for i, (name, value) in enumerate(self.base_layer.named_parameters()):
            names[name] = f"live_{i}"
            self.register_parameter(names[name], nn.Parameter(value.detach().clone()))
            trainable.append(getattr(self, names[name]))
        for i, (name, value) in enumerate(self.base_layer.named_buffers()):
            names[name] = f"live_buffer_{i}"
            self.register_buffer(names[name], value.detach().clone(), persistent=False)
        self.names[slot] = names
        return trainable

    def drop_slot(self, slot: int) -> None:
        for attr in (self.names[slot] or {}).values():
            if hasattr(self, attr):
                delattr(self, attr)
        self.names[slot] = None

    def slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        return {param: getattr(self, attr) for param, attr in (self.names[slot] or {}).items()}

    def extra_bytes(self) -> int:
        return sum(getattr(self, b).numel() * getattr(self, b).element_size()
                   for names in self.names[:-1] if names for b in names.values())

    def _run(self, slot: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self.names[slot]
        if names is None:
            return self.base_layer(x, *args, **kwargs)
        params = {param: getattr(self, buffer) for param, buffer in names.items()}
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
