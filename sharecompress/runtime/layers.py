"""One wrapper per module kind: the base module's output plus the zoo's low-rank update.

Each wrapper holds the original module untouched (``base_layer``, as PEFT names it), so
``detach`` puts the very same object back and the model is bit-identical to before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bank import CoreBank
from .wrapper import Wrapper


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return t.to(device=ref.device, dtype=ref.dtype)


class SharedLinear(Wrapper):
    """y = W₀x + b + U·E_t·F_t·Vᵀx."""

    def __init__(self, base_layer: nn.Linear, bank: CoreBank) -> None:
        super().__init__(base_layer)
        self.bank = bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.bank.active():
            return y
        if self.bank.routing.rows is None:  # one adapter for the batch: its own rank-p factors
            A, B = self.bank.folded()
            return y + _like((_like(x, A) @ A.mT) @ B.mT, y)
        z = _like(x, self.bank.V) @ self.bank.V
        return y + _like(self.bank.lift(z), y)


class SharedConv2d(Wrapper):
    """A conv's update: V as a k_v-channel conv kernel (PEFT's lora_A), the cores, then U as 1 × 1."""

    def __init__(self, base_layer: nn.Conv2d, bank: CoreBank) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ValueError("grouped convolutions are not supported")
        self.bank = bank
        out, inp, kh, kw = base_layer.weight.shape
        self.kernel_shape = (inp, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.bank.active():
            return y
        conv = self.base_layer
        kernel = self.bank.V.mT.reshape(-1, *self.kernel_shape)
        x = _like(x, kernel)
        padding = conv.padding
        if conv.padding_mode != "zeros":  # as nn.Conv2d does it: pad by the mode, then no padding
            x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
        z = F.conv2d(x, kernel, None, conv.stride, padding, conv.dilation)
        delta = self.bank.lift(z.movedim(1, -1)).movedim(-1, 1)
        return y + _like(delta, y)


class SharedEmbedding(Wrapper):
    """An embedding's update: the rows of V looked up by id (PEFT's lora_embedding_A), the cores, ·Uᵀ.

    The lookup never renormalises (``max_norm`` is the base table's business: applied to V it
    would change the shared basis in place for every adapter).
    """

    def __init__(self, base_layer: nn.Embedding, bank: CoreBank) -> None:
        super().__init__(base_layer)
        self.bank = bank

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)
        if not self.bank.active():
            return y
        z = F.embedding(ids.to(self.bank.V.device), self.bank.V)
        return y + _like(self.bank.lift(z), y)


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
