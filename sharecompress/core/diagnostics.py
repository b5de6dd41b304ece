"""What the compression figures alone do not tell: whether the adapters share their initialisation.

LoRA starts lora_A random and lora_B at zero, and training moves lora_A little. Adapters trained
from one seed therefore carry nearly the same lora_A, and a shared basis captures that common
start as well as anything learned. The zoo's "sharing" is then partly the init, which a new task
trained from another seed will not have.
"""

from __future__ import annotations

import functools

import torch

SKETCH = 256  # buckets of the sketch of each flattened lora_A: cosines to about ±0.1, whatever r·d


@functools.lru_cache(maxsize=8)
def _hashing(size: int, seed: int) -> torch.Tensor:
    """A count sketch of ``size`` coordinates: each to one of ``SKETCH`` buckets with a random
    sign, as one index into 2·SKETCH slots (the second half counted negative)."""
    gen = torch.Generator().manual_seed(seed)
    bucket = torch.randint(0, SKETCH, (size,), generator=gen)
    negative = torch.randint(0, 2, (size,), generator=gen)
    return bucket + SKETCH * negative


def nearest_twin(As: list[torch.Tensor] | torch.Tensor, seed: int = 0) -> list[float | None]:
    """For each A_t (r_t × d), its largest cosine with another adapter's A of the same shape (None when none).

    Compared as flattened matrices (a shared init shares its gauge too), through a common count
    sketch of width 256 when r·d is larger (each coordinate added, with a random sign, into one of
    256 buckets: inner products kept in expectation, one pass over each A and no random matrix of
    size r·d × 256 to draw or multiply), so the cost is T·r·d + T²·256. The sign is a second set of
    256 slots subtracted at the end, so no signed copy of the A's is made; ``As`` may be one
    (T, r, d) tensor (all of one shape), which is then not copied either.
    """
    if isinstance(As, torch.Tensor):
        groups = {tuple(As.shape[1:]): list(range(As.shape[0]))}
    else:
        groups = {}
        for t, A in enumerate(As):
            groups.setdefault(tuple(A.shape), []).append(t)
    out: list[float | None] = [None] * len(As)
    for shape, members in groups.items():
        if len(members) < 2:
            continue
        if isinstance(As, torch.Tensor):
            flat = As.reshape(As.shape[0], -1).float()
        else:
            flat = torch.stack([As[t].reshape(-1) for t in members]).float()
        if flat.shape[1] > SKETCH:
            slots = _hashing(flat.shape[1], seed).to(flat.device)
            signed = flat.new_zeros(flat.shape[0], 2 * SKETCH).index_add_(1, slots, flat)
            flat = signed[:, :SKETCH] - signed[:, SKETCH:]
        flat = flat.double()  # the squares of tiny factors underflow float32: the norm would be 0
        flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
        cos = (flat @ flat.T).clamp(-1.0, 1.0)
        cos.fill_diagonal_(-1.0)
        for i, value in zip(range(len(members)), cos.max(dim=1).values.tolist()):
            out[members[i]] = value
    return out


# Held-out errors cost T eigen-solves of the module's total rank: computed where T·(Σr)³ stays
# below this (about a tenth of a second per module on one core), left out above it.
LOO_WORK = 2 * 10**8
NOISE = 1e-12  # eigenvalues below this share of the largest are rounding, not a direction


def held_out_fits(ranks: list[int]) -> bool:
    """Whether ``held_out_errors`` computes anything for adapters of these ranks (else it is None):
    asked first, a large zoo's merge does not gather T factor views per module for nothing."""
    return len(ranks) >= 2 and len(ranks) * sum(ranks) ** 3 <= LOO_WORK


def held_out_errors(factors: list[tuple[torch.Tensor, torch.Tensor]], scales: list[float], ku: int, kv: int) -> list[float] | None:
    """Each adapter's squared error on bases of the same size fit without it (leave-one-out).

    Per side, the stack's column space is orthonormalised once (Q, with M = Q·R); leaving adapter
    t out subtracts its columns' Gram R_t·R_tᵀ, and the top-k eigenvectors of what is left give
    the bases the other adapters alone would choose (before refinement). The error is then the
    adapter's energy outside U_{-t} ⊗ V_{-t}: ‖ΔW_t‖² − ‖U_{-t}ᵀ·ΔW_t·V_{-t}‖², from factors only.
    None when T·(Σr)³ is above ``LOO_WORK``. Bases never take more directions than the other
    adapters have (k beyond their rank would hand t its own).
    """
    from . import linalg

    if not held_out_fits([b.shape[1] for b, _ in factors]):
        return None
    B = [b.double() for b, _ in factors]
    A = [a.double() for _, a in factors]
    s = torch.tensor(scales, dtype=torch.float64, device=B[0].device)  # where the factors are (a GPU merge's stacks)
    sides = []
    for side in (0, 1):
        blocks = [linalg.left_blocks(b[None], a[None], s[t : t + 1])[0] if side == 0 else
                  linalg.right_blocks(b[None], a[None], s[t : t + 1])[0] for t, (b, a) in enumerate(zip(B, A))]
        M = torch.cat(blocks, dim=1)
        Q, R = torch.linalg.qr(M)
        sides.append((Q, R, [blk.shape[1] for blk in blocks]))
    out = []
    for t in range(len(factors)):
        bases = []
        for (Q, R, widths), k in zip(sides, (ku, kv)):
            start = sum(widths[:t])
            keep = torch.cat([R[:, :start], R[:, start + widths[t]:]], dim=1)
            evals, evecs = linalg.eigh(keep @ keep.T)
            # only the directions the others have: Q also spans t's own, which must not leak in
            have = int((evals > NOISE * float(evals[-1].clamp_min(0.0))).sum()) if evals.numel() and float(evals[-1]) > 0 else 0
            take = min(k, have)
            bases.append(Q @ evecs[:, evecs.shape[1] - take:])
        U, V = bases
        core = (U.T @ B[t]) * s[t] @ (A[t] @ V)
        norm2 = float((s[t] ** 2) * ((B[t].T @ B[t]) * (A[t] @ A[t].T)).sum())
        out.append(max(norm2 - float(core.pow(2).sum()), 0.0))
    return out
