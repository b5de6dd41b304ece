"""One wrapper per module kind: the base module's output plus the zoo's low-rank update.

Each wrapper holds the original module untouched (``base_layer``, as PEFT names it), so
``detach`` puts the very same object back and the model is bit-identical to before. A kind
differs from another only in how its input meets a basis (``project``: a matmul, a conv, a
lookup) and where the channels of the result go (``place``); routing rows to adapters, and to a
new task's trainable cores (``live``), is common to all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bank import CoreBank
from .live import LiveCore
from .wrapper import Wrapper


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return t.to(device=ref.device, dtype=ref.dtype)


class SharedLayer(Wrapper):
    """y = base(x) + U·E_t·F_t·Vᵀ·x for each row's adapter t, or + [U|P]·C·[V|Q]ᵀ·x for the task in training."""

    def __init__(self, base_layer: nn.Module, bank: CoreBank) -> None:
        super().__init__(base_layer)
        self.bank = bank
        self.live: LiveCore | None = None
        self.live_slot = -1

    def project(self, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """The input against the columns of ``basis`` (d × c), channels last: (…, c)."""
        raise NotImplementedError

    def place(self, delta: torch.Tensor) -> torch.Tensor:
        """An update computed channels-last, in the layout of the base module's output."""
        return delta

    def _zoo_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Every row's update through the shared bases, plus, for adapters that hold one, their private residual."""
        delta = self.place(self.bank.lift(self.project(x, self.bank.V)))
        routing = self.bank.routing
        if routing.rows is None:
            own = self.bank.residual(routing.single)
            return delta if own is None else delta + self.place(self.project(x, own[1]) @ own[0].mT)
        for slot, rows in self.bank.residual_rows(routing.rows_on(x.device, x.shape[0])):
            RU, RV = self.bank.residual(slot)
            rows = rows.to(delta.device)
            delta = delta.index_add(0, rows, _like(self.place(self.project(x[rows], RV) @ RU.mT), delta))
        return delta

    def _live_delta(self, x: torch.Tensor) -> torch.Tensor:
        U, V = self.live.bases(self.bank.U, self.bank.V)
        return self.place(self.live.lift(self.project(x, V), U))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        routing = self.bank.routing
        if routing.rows is None:
            if self.live is not None and routing.single == self.live_slot:
                return y + _like(self._live_delta(x), y)
            if not self.bank.active():
                return y
            return y + _like(self._single_delta(x), y)
        if self.bank.active():
            y = y + _like(self._zoo_delta(x), y)
        if self.live is not None:
            rows = (routing.rows_on(x.device, x.shape[0]) == self.live_slot).nonzero().squeeze(1)
            if rows.numel():
                y = y.index_add(0, rows.to(y.device), _like(self._live_delta(x[rows]), y))
        return y

    def _single_delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._zoo_delta(x)


class SharedLinear(SharedLayer):
    """y = W₀x + b + U·E_t·F_t·Vᵀx."""

    def project(self, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        return _like(x, basis) @ basis

    def _single_delta(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.bank.folded()  # one adapter for the batch: its own rank-p factors
        return (_like(x, A) @ A.mT) @ B.mT


class SharedConv2d(SharedLayer):
    """A conv's update: the basis as a conv kernel (PEFT's lora_A), the cores, then U as 1 × 1."""

    def __init__(self, base_layer: nn.Conv2d, bank: CoreBank) -> None:
        if base_layer.groups != 1:
            raise ValueError("grouped convolutions are not supported")
        super().__init__(base_layer, bank)
        out, inp, kh, kw = base_layer.weight.shape
        self.kernel_shape = (inp, kh, kw)

    def project(self, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        conv = self.base_layer
        kernel = basis.mT.reshape(-1, *self.kernel_shape)
        x = _like(x, kernel)
        padding = conv.padding
        if conv.padding_mode != "zeros":  # as nn.Conv2d does it: pad by the mode, then no padding
            x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
        return F.conv2d(x, kernel, None, conv.stride, padding, conv.dilation).movedim(1, -1)

    def place(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.movedim(-1, 1)


class SharedEmbedding(SharedLayer):
    """An embedding's update: the rows of the basis looked up by id (PEFT's lora_embedding_A), the cores, ·Uᵀ.

    The lookup never renormalises (``max_norm`` is the base table's business: applied to V it
    would change the shared basis in place for every adapter).
    """

    def project(self, ids: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(basis.device), basis)


WRAPPERS: dict[type, type] = {nn.Linear: SharedLinear, nn.Conv2d: SharedConv2d, nn.Embedding: SharedEmbedding}


def flat_shape(module: nn.Module) -> tuple[int, int]:
    """(n, d) of the update ΔW a zoo stores for ``module`` (DESIGN.md §9's conventions)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Conv2d):
        out, inp, kh, kw = module.weight.shape
        return out, inp * kh * kw
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    raise TypeError(type(module).__name__)
