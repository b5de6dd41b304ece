"""What the compression figures alone do not tell: whether the adapters share their initialisation.

LoRA starts lora_A random and lora_B at zero, and training moves lora_A little. Adapters trained
from one seed therefore carry nearly the same lora_A, and a shared basis captures that common
start as well as anything learned. The zoo's "sharing" is then partly the init, which a new task
trained from another seed will not have.
"""

from __future__ import annotations

import torch

SKETCH = 256  # random projections of each flattened lora_A: cosines to about ±0.1, whatever r·d


def nearest_twin(As: list[torch.Tensor], seed: int = 0) -> list[float]:
    """For each A_t (r_t × d), its largest cosine with another adapter's A of the same shape (0 when none).

    Compared as flattened matrices (a shared init shares its gauge too), through a common random
    sketch of width 256 when r·d is larger, so the cost is T·r·d + T²·256.
    """
    out = [0.0] * len(As)
    groups: dict[tuple[int, ...], list[int]] = {}
    for t, A in enumerate(As):
        groups.setdefault(tuple(A.shape), []).append(t)
    for shape, members in groups.items():
        if len(members) < 2:
            continue
        flat = torch.stack([As[t].reshape(-1).float() for t in members])
        if flat.shape[1] > SKETCH:
            gen = torch.Generator().manual_seed(seed)
            flat = flat @ torch.randn(flat.shape[1], SKETCH, generator=gen)
        flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos = flat @ flat.T
        cos.fill_diagonal_(-1.0)
        for i, t in enumerate(members):
            out[t] = float(cos[i].max())
    return out
