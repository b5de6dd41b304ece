"""One wrapper per module kind: the base module's output plus the zoo's low-rank update.

Each wrapper holds the original module untouched (``base_layer``, as PEFT names it), so
``detach`` puts the very same object back and the model is bit-identical to before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bank import CoreBank


class SharedLinear(nn.Module):
    """y = W₀x + b + U·E_t·F_t·Vᵀx."""

    def __init__(self, base_layer: nn.Linear, bank: CoreBank) -> None:
        super().__init__()
        self.base_layer, self.bank = base_layer, bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.bank.active():
            return y
        if self.bank.routing.rows is None:  # one adapter for the batch: its own rank-p factors
            A, B = self.bank.folded()
            return y + ((x.to(A.dtype) @ A.mT) @ B.mT).to(y.dtype)
        z = x.to(self.bank.V.dtype) @ self.bank.V
        return y + self.bank.lift(z).to(y.dtype)


class SharedConv2d(nn.Module):
    """A conv's update: V as a k_v-channel conv kernel (PEFT's lora_A), the cores, then U as 1 × 1."""

    def __init__(self, base_layer: nn.Conv2d, bank: CoreBank) -> None:
        super().__init__()
        if base_layer.groups != 1:
            raise ValueError("grouped convolutions are not supported")
        self.base_layer, self.bank = base_layer, bank
        out, inp, kh, kw = base_layer.weight.shape
        self.kernel_shape = (inp, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.bank.active():
            return y
        conv = self.base_layer
        kernel = self.bank.V.mT.reshape(-1, *self.kernel_shape)
        z = F.conv2d(x.to(kernel.dtype), kernel, None, conv.stride, conv.padding, conv.dilation)
        delta = self.bank.lift(z.movedim(1, -1)).movedim(-1, 1)
        return y + delta.to(y.dtype)


class SharedEmbedding(nn.Module):
    """An embedding's update: the rows of V looked up by id (PEFT's lora_embedding_A), the cores, ·Uᵀ."""

    def __init__(self, base_layer: nn.Embedding, bank: CoreBank) -> None:
        super().__init__()
        self.base_layer, self.bank = base_layer, bank

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)
        if not self.bank.active():
            return y
        e = self.base_layer
        z = F.embedding(ids, self.bank.V, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return y + self.bank.lift(z).to(y.dtype)


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
