"""One module group, end to end: bases, per-adapter cores and exact errors (no files here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import linalg

METHODS = ("share", "paper")


@dataclass(frozen=True)
class KRule:
    """How many shared components a module gets: a fixed ``k`` or an ``energy`` share."""

    k: int | None = None
    energy: float | None = None
    k_min: int = 1  # an add never shrinks a module's k

    def describe(self) -> str:
        return f"k={self.k}" if self.k is not None else f"energy={self.energy}"


@dataclass
class AdapterCore:
    """One adapter's part of one module: E (k × p), F (p × k) as stored, and its exact error."""

    E: torch.Tensor
    F: torch.Tensor
    err2: float
    norm2: float


@dataclass
class ModuleResult:
    U: torch.Tensor  # (n, k), storage dtype
    V: torch.Tensor  # (d, k), storage dtype
    cores: list[AdapterCore]
    energies: torch.Tensor  # σ² of the left stack, descending (the energy curve)
    sweeps_done: int

    @property
    def k(self) -> int:
        return self.U.shape[1]


def pad_stack(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (B_t, A_t) of mixed ranks by zero-padding to the largest rank; ΔW is unchanged."""
    r = max(b.shape[1] for b, _ in factors)
    n, d = factors[0][0].shape[0], factors[0][1].shape[1]
    dtype = factors[0][0].dtype
    B = torch.zeros(len(factors), n, r, dtype=dtype)
    A = torch.zeros(len(factors), r, d, dtype=dtype)
    for t, (b, a) in enumerate(factors):
        B[t, :, : b.shape[1]] = b
        A[t, : a.shape[0]] = a
    return B, A


def choose_k(rule: KRule, energies_u: torch.Tensor, energies_v: torch.Tensor, cap: int) -> int:
    if rule.k is not None:
        return max(1, min(rule.k, cap))
    k = max(linalg.smallest_k_for_energy(energies_u, rule.energy), linalg.smallest_k_for_energy(energies_v, rule.energy))
    return max(1, min(max(k, rule.k_min), cap))


def module_bases(
    B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, rule: KRule, method: str, sweeps: int, total_rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(U, V, left energy curve, sweeps done) for one module, float64.

    k is chosen on the spectra of the updates themselves, whatever the method, so that
    ``--method paper`` and ``share`` compare at equal k.
    """
    n, d = B.shape[1], A.shape[2]
    cap = min(n, d, total_rank)  # the stacks' largest possible rank: k beyond it is lossless
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    left = linalg.top_subspace(linalg.left_blocks(B, A, s), cap)
    right = linalg.top_subspace(linalg.right_blocks(B, A, s), cap)
    k = choose_k(rule, left.energies, right.energies, cap)
    if method == "paper":
        # The paper's literal recipe: stack the B's and the A's as they happen to be split.
        U = linalg.top_subspace(B, k).basis
        V = linalg.top_subspace(A.transpose(-1, -2), k).basis
        return U, V, left.energies, 0
    U, V = left.basis[:, :k], right.basis[:, :k]
    done = 0
    if sweeps > 0:
        U, V, done = linalg.refine(U, V, B, A, s, sweeps)
    return U, V, left.energies, done


def project_adapter(
    U: torch.Tensor, V: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float, p: int | None, store: torch.dtype
) -> AdapterCore:
    """Best core of one adapter on stored bases, rounded to ``store``, with its exact error."""
    U64, V64 = U.to(torch.float64), V.to(torch.float64)
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    rank = b.shape[1]
    keep = min(rank, U.shape[1], p if p is not None else rank)
    E, F = linalg.core_factors(U64, V64, b64, a64, scale, keep)
    E, F = E.to(store).contiguous(), F.to(store).contiguous()
    err2, norm2 = linalg.squared_error(b64, a64, scale, U64, E, F, V64)
    return AdapterCore(E, F, err2, norm2)


def compress_module(
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    scales: list[float],
    rule: KRule,
    method: str = "share",
    sweeps: int = 3,
    p: int | None = None,
    store: torch.dtype = torch.float32,
) -> ModuleResult:
    """Shared bases for one module and every adapter's core on them."""
    B, A = pad_stack([(b.to(torch.float64), a.to(torch.float64)) for b, a in factors])
    s = torch.tensor(scales, dtype=torch.float64)
    U, V, curve, done = module_bases(B, A, s, rule, method, sweeps, sum(b.shape[1] for b, _ in factors))
    U_st, V_st = U.to(store).contiguous(), V.to(store).contiguous()
    cores = [project_adapter(U_st, V_st, b, a, sc, p, store) for (b, a), sc in zip(factors, scales)]
    return ModuleResult(U_st, V_st, cores, curve, done)
