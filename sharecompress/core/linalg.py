"""The math of a shared basis, on factors only (DESIGN.md §2–§3). Pure functions on tensors.

Shapes for one module with T adapters, ranks zero-padded to r (zero columns of B / rows of A
change no ΔW): ``B (T, n, r)``, ``A (T, r, d)``, ``s (T,)``. No n × d matrix is ever formed.
``left_blocks``, ``right_blocks``, ``flatten_blocks`` and ``range_basis`` also take a leading
batch of G modules of one shape (``B (G, T, n, r)``, ``s (G, T)``): one batched call for all.
B may be the transposed view of its rows (``B = Bᵀ.mT`` with Bᵀ (…, T, r, n) in memory): a merge
keeps it so, which makes Uᵀ·B_t and the stack's products single GEMMs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

# Eigenvalues of a float64 Gram below this share of the largest are rounding noise.
_NOISE_FLOOR = 1e-13


def left_blocks(B: torch.Tensor, A: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """X (T, n, c) with Σ_t X_t X_tᵀ = Σ_t ΔW_t ΔW_tᵀ, ΔW_t = s_t B_t A_t.

    Thin QR of A_tᵀ = Q_t R_t gives A_t A_tᵀ = R_tᵀ R_t, so X_t = s_t B_t R_tᵀ: the left
    singular subspace no longer depends on how B·A was split (gauge invariance). A Cholesky of the
    r × r Gram in the factors' own float32 squares A's condition number: measured, it let a badly
    conditioned split (B·D⁻¹, D·A) change the bases, so the QR stays here (the sketch takes the
    Cholesky of float64 Grams instead, ``gram_roots``).
    """
    return s[..., None, None] * (B @ gauge_roots(A).transpose(-1, -2))


def gauge_roots(rows: torch.Tensor) -> torch.Tensor:
    """R (…, r, r) with rows·rowsᵀ = RᵀR for rows (…, r, n): the R of a thin QR of rowsᵀ."""
    return torch.linalg.qr(rows.transpose(-1, -2), mode="r")[1]


def factor_grams(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(BᵀB, AAᵀ) per adapter in float64, batched: the exact errors, the bound parts, the gauge roots
    and a merge's finiteness check all read them."""
    return wide_products(B.transpose(-1, -2)), wide_products(A)


# bytes of float64 rows widened at a time: a chunk stays in the cache from its widening to its products
WIDE_CHUNK = 2 << 20


def wide_products(rows: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
    """rows·rowsᵀ (``right`` None) or rows·right, in float64, for rows (…, r, n) of any float dtype.

    The exact figures need these products in float64. A float64 copy of a batch's factors, made
    whole, is twice their float32 size, and writing it to memory and reading it back cost more than
    the products: on the 2-core machine the float64 copies, Grams and projections of a batch of 128
    rank-16 adapters of 1024 × 1024 took 11.0 ms per module whole, 8.2 ms with the rows widened
    2 MiB at a time, each chunk multiplied while it is in the cache. Float64 rows, and a GPU's, are
    multiplied as they are (a GPU's memory makes the copy cheap; a loop of small launches is not).
    """
    f64 = torch.float64
    R = None if right is None else right.to(f64)
    if rows.dtype == f64 or rows.device.type != "cpu" or rows.numel() == 0:
        X = rows.to(f64)
        return X @ (X.transpose(-1, -2) if R is None else R)
    *lead, r, n = rows.shape
    flat = rows.reshape(-1, r, n)
    count = flat.shape[0]
    out = torch.empty(count, r, r if R is None else R.shape[-1], dtype=f64)
    step = max(1, min(count, WIDE_CHUNK // max(1, r * n * 8)))
    buf = torch.empty(step, r, n, dtype=f64)
    for i in range(0, count, step):
        X = buf[: min(step, count - i)].copy_(flat[i : i + step])
        torch.matmul(X, X.transpose(-1, -2) if R is None else R, out=out[i : i + step])
    return out.reshape(*lead, r, out.shape[-1])


def gram_roots(G: torch.Tensor) -> torch.Tensor:
    """R (…, r, r) with RᵀR = G for float64 Grams G (…, r, r) of float32 (or narrower) factors.

    Such a Gram is exact to float64 rounding (each product of two float32 numbers is exact), so
    its Cholesky factor is as good a gauge root as a float32 QR's R for any split whose condition
    number is below ~10⁸ (the Cholesky's error grows with its square, ε₆₄·κ², the QR's with ε₃₂·κ):
    a tenth of the QR's time on a LoRA's r ≪ n. Not for float64 factors, whose Grams are rounded:
    there a float64 QR (``gauge_roots``) keeps ε₆₄·κ. A singular Gram (a rank below r, or the zero
    rows that pad a lower rank) takes the symmetric root √Λ·Wᵀ of its eigen-decomposition instead.
    """
    L, info = torch.linalg.cholesky_ex(G)
    R = L.transpose(-1, -2)
    failed = info > 0
    if bool(failed.any()):
        w, W = eigh(G[failed])
        R[failed] = w.clamp_min(0.0).sqrt()[..., :, None] * W.transpose(-1, -2)
    return R


def right_blocks(B: torch.Tensor, A: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Y with Σ Y_t Y_tᵀ = Σ ΔW_tᵀ ΔW_t (the row space of the updates)."""
    return left_blocks(A.transpose(-1, -2), B.transpose(-1, -2), s)


# At or below this size (the smaller side of the stack) a dense float64 eigh is cheap and exact;
# above it, a few passes of subspace iteration find the top-k for a fraction of the cost.
EXACT_LIMIT = 384
OVERSAMPLE = 16
WARM_ITERS = 3  # per HOOI half-step: the sweeps themselves keep iterating


@dataclass
class Subspace:
    """Top-k orthonormal basis of a stack, its leading eigen-energies (σ², descending), and ‖X‖²."""

    basis: torch.Tensor  # (n, k), float64
    energies: torch.Tensor  # leading σ_i² of the stack, float64 (all of them on the exact path)
    total: float  # Σ σ_i² = ‖X‖²_F, exact whatever the path

    @property
    def captured(self) -> float:
        return float(self.energies[: self.basis.shape[1]].sum())


@contextmanager
def one_thread() -> Iterator[None]:
    """Run small LAPACK calls (thin QR, small eigh) on one thread.

    Their OpenMP fan-out costs more than it saves, and on a busy machine it collapses
    (measured here on 2 cores: thin QR of 1024 × 48 took 90 ms on 2 threads, 0.6 ms on 1).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def flatten_blocks(X: torch.Tensor) -> torch.Tensor:
    """(…, T, n, c) blocks → the (…, n, T·c) stack [X_1 | … | X_T]."""
    *lead, T, n, c = X.shape
    return X.transpose(-3, -2).reshape(*lead, n, T * c)


def top_subspace(
    X: torch.Tensor, k: int, warm: torch.Tensor | None = None, seed: int = 0, tol: float = 1e-7, max_iter: int = 30
) -> Subspace:
    """Top-k left singular subspace of [X_1 | … | X_T].

    Small stacks: exact, through the smaller float64 Gram. Large ones: subspace iteration
    (float32 products, float64 Rayleigh–Ritz) from ``warm`` or a random start, until the
    captured energy stops growing (relative ``tol``). Directions the stack does not have are
    completed with arbitrary orthonormal ones, so the basis always has k columns.
    """
    flat = flatten_blocks(X)
    n, m = flat.shape
    total = float(flat.double().pow(2).sum())
    if min(n, m) <= max(EXACT_LIMIT, 2 * (k + OVERSAMPLE)):
        return _exact(flat.double(), k, total, seed)
    return _iterate(flat.float(), k, total, warm, seed, tol, max_iter)


def fast_half(device: torch.device) -> torch.dtype | None:
    """bfloat16 where this device multiplies it natively (a CPU with AVX512-BF16 or AMX), else None.

    There a bfloat16 GEMM of the sketch's shape runs 3–4× faster than float32 (2048 × 1024 by
    1024 × 64 on the 2-core machine: 0.30 ms against 1.36 ms); elsewhere it is emulated and slower, so
    the range finder stays in float32. Decided by the CPU's flags, not by timing, so that one
    machine always takes the same path. GPUs stay in float32: not yet measured there.
    """
    if device.type != "cpu":
        return None
    flags = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    try:
        return torch.bfloat16 if any(flag is not None and flag() is True for flag in flags) else None
    except Exception:  # a private probe that changed (or is no longer a function): float32 is always right
        return None


# The bfloat16 passes keep 8 bits: only where a random start's singular values lie within this
# factor of each other (so every working direction keeps 4 bits in them) do they run
HALF_SPREAD = 1 / 16


def range_basis(rows: torch.Tensor, D: torch.Tensor, width: int, power: int = 2, seed: int = 0) -> torch.Tensor:
    """Orthonormal n × width basis holding the leading left singular directions of the stack
    M = [rows_1ᵀ·D_1 | … | rows_Tᵀ·D_T], never formed: rows (…, T, c, n), D (…, T, c, c).

    With rows_t = A_t and D_t = s_t·R_tᵀ this is ``right_blocks``' stack, with rows_t = B_tᵀ
    ``left_blocks``'. Each product with M is one GEMM with the rows as they lie in memory (a (T·c) × n
    matrix) and a batch of c-sized products with D: no n × T·c copy is made. M·X is taken as the
    transpose of Xᵀ·(rows): the faster orientation of that GEMM (2.8 ms against 3.4 ms for
    2 × 1024 × 2048 by 64 on the 2-core machine).
    A randomized range finder with ``power`` power iterations, products in float32 (float64 for
    float64 factors). A batch of stacks shares one random start, so each gets the basis it would
    get alone.

    Where the device multiplies bfloat16 natively (``fast_half``), every product but the last
    iteration's runs on a bfloat16 copy of the rows. A power iteration only has to point the
    subspace the right way: its rounding (2⁻⁸) is what the next iteration shrinks, and the last
    one, in float32, shrinks it by (σ_{width+1}/σ_j)² for each leading direction j, as it does any
    other start. That holds only while every working direction keeps a few of bfloat16's 8 bits
    beside the loudest: where the random start's singular values spread beyond ``HALF_SPREAD``
    (one adapter 1000× louder than the rest, a strong shared direction, a near-lossless zoo), the
    start is taken again in float32 and everything stays there (a review found the other adapters'
    errors 3 % higher with one loud adapter). On the benchmark's 128 adapters (spread 0.094 and 0.43
    on the two sides of a batch) the zoo's error is the all-float32 one to six digits (0.869261),
    in 0.82 of the time of a batch's compute; gapped stacks keep their leading subspaces to float32
    rounding (``tests/test_linalg.py``).

    Measured and not kept: a randomized block Krylov space of twice the width from half-width
    blocks, cut back by Rayleigh–Ritz, cost 26 ms against 28 ms here and erred less on the benchmark's
    128 adapters, but its float32 Ritz step left the bases 2·10⁻⁵ from the exact ones on a small gapped
    problem where these iterations come within 10⁻⁶.
    """
    *lead, T, c, n = rows.shape
    # float64 factors stay float64: rounded apart, rows and D would each carry ε₃₂ times the split's
    # condition number, which the product of a badly conditioned split does not have (review finding)
    work = torch.float64 if rows.dtype == torch.float64 else torch.float32
    F = rows.to(work).reshape(*lead, T * c, n)
    D = D.to(work)
    m = T * c
    width = min(width, n, m)
    half = fast_half(F.device) if work == torch.float32 and power > 0 else None

    def times(X: torch.Tensor, F: torch.Tensor) -> torch.Tensor:  # M·X (…, n, b), as the transpose of a product that keeps F's rows
        return ((D @ X.unflatten(-2, (T, c))).flatten(-3, -2).transpose(-1, -2).to(F.dtype) @ F).transpose(-1, -2).to(work)

    def times_t(Y: torch.Tensor, F: torch.Tensor) -> torch.Tensor:  # Mᵀ·Y (…, T·c, b)
        return (D.transpose(-1, -2) @ (F @ Y.to(F.dtype)).to(work).unflatten(-2, (T, c))).flatten(-3, -2)

    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(m, width, generator=gen).to(F.device, work)
    Y, steps, orthonormal = None, [F] * power, False
    if half is not None:
        rough = F.to(half)
        with one_thread():
            Q, R = torch.linalg.qr(times(start, rough))
        spread = torch.linalg.svdvals(R)  # M·Ω's singular values: the stack's leading ones, as a random start sees them
        if bool((spread[..., -1] >= HALF_SPREAD * spread[..., 0]).all()):
            Y, steps, orthonormal = Q, [rough] * (power - 1) + [F], True
    if Y is None:  # float32 throughout: no bfloat16 here, or a spectrum too steep for it
        Y = times(start, F)
    for step in steps:
        if not orthonormal:
            with one_thread():
                Y = torch.linalg.qr(Y)[0]
        orthonormal = False
        Y = times(times_t(Y, step), step)
    with one_thread():
        return torch.linalg.qr(Y.double())[0]


def top_left(
    B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, k: int, warm: torch.Tensor | None = None, max_iter: int = 30
) -> Subspace:
    """``top_subspace(left_blocks(B, A, s), k, warm)`` for one module's factors (T, n, r), (T, r, d).

    Where the exact solve would take the n × n Gram (a small n below a wide stack: the sketched
    problems, the refinement's steps) that Gram is Σ_t B_t·(s_t²·A_tA_tᵀ)·B_tᵀ, from r × r products,
    with no QR of any factor: the same matrix, rounded in float64 instead of through R_t.
    """
    T, n, r = B.shape
    if not (n < T * r and n <= max(EXACT_LIMIT, 2 * (k + OVERSAMPLE))):  # blocks in float64: B·Rᵀ of tiny
        return top_subspace(left_blocks(B.double(), A.double(), s.double()), k, warm=warm, max_iter=max_iter)  # factors underflows float32
    B64, A64 = B.double(), A.double()
    H = s.double().pow(2)[:, None, None] * (A64 @ A64.mT)  # (T, r, r)
    gram = torch.einsum("tnr,tmr->nm", B64 @ H, B64)
    return _from_gram(gram, k, float(gram.diagonal().sum()))


def top_right(
    B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, k: int, warm: torch.Tensor | None = None, max_iter: int = 30
) -> Subspace:
    """``top_subspace(right_blocks(B, A, s), k, warm)``, as ``top_left`` (the row space of the updates)."""
    return top_left(A.transpose(-1, -2), B.transpose(-1, -2), s, k, warm=warm, max_iter=max_iter)


# A GPU's eigh of a small matrix is a few solver launches and a synchronisation, which cost more
# than the host's whole solve: at most this order, the matrix goes to the host and back.
HOST_EIGH = 512


def eigh(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` on one thread, on the host for a small matrix held on a GPU (the
    results come back to X's device)."""
    if X.device.type != "cpu" and X.shape[-1] <= HOST_EIGH:
        with one_thread():
            w, V = torch.linalg.eigh(X.cpu())
        return w.to(X.device), V.to(X.device)
    with one_thread():
        return torch.linalg.eigh(X)


def _eigen(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A Gram's eigenvalues and vectors, largest first, and how many of the top k are not rounding noise."""
    evals, evecs = eigh(gram)
    evals = evals.flip(0).clamp_min(0.0)
    evecs = evecs.flip(1)
    top = float(evals[0]) if evals.numel() else 0.0
    return evals, evecs, int((evals[:k] > _NOISE_FLOOR * top).sum()) if top > 0 else 0


def _from_gram(gram: torch.Tensor, k: int, total: float, seed: int = 0) -> Subspace:
    """The top-k eigenvectors of a stack's n × n Gram, as ``_exact`` takes them when n is the smaller side."""
    evals, evecs, valid = _eigen(gram, k)
    return Subspace(complete_basis(evecs[:, :valid], gram.shape[0], k, seed), evals, total)


def _exact(flat: torch.Tensor, k: int, total: float, seed: int) -> Subspace:
    n, m = flat.shape
    if m > n:
        return _from_gram(flat @ flat.T, k, total, seed)
    evals, evecs, valid = _eigen(flat.T @ flat, k)
    basis = flat @ (evecs[:, :valid] / evals[:valid].sqrt())
    if valid:
        basis = torch.linalg.qr(basis)[0]
    return Subspace(complete_basis(basis, n, k, seed), evals, total)


def _iterate(flat: torch.Tensor, k: int, total: float, warm, seed: int, tol: float, max_iter: int) -> Subspace:
    n, m = flat.shape
    width = min(k + OVERSAMPLE, n, m)
    gen = torch.Generator().manual_seed(seed)
    if warm is not None and warm.shape[1] > 0:
        start = warm[:, :width].to(flat.dtype)
        if start.shape[1] < width:
            start = torch.cat([start, torch.randn(n, width - start.shape[1], generator=gen).to(flat.device, flat.dtype)], dim=1)
    else:
        start = flat @ torch.randn(m, width, generator=gen).to(flat.device, flat.dtype)
    with one_thread():
        Y = torch.linalg.qr(start)[0]
    previous = -1.0
    for _ in range(max_iter):
        Z = flat.T @ Y  # m × width
        evals, evecs = eigh((Z.T @ Z).double())
        captured = float(evals.flip(0)[:k].sum())
        if captured - previous <= tol * max(captured, 1e-300):
            break
        previous = captured
        Y = flat @ Z
        with one_thread():
            Y = torch.linalg.qr(Y)[0]
    evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
    with one_thread():
        basis = torch.linalg.qr(Y.double() @ evecs[:, :k])[0]
    top = float(evals[0]) if evals.numel() else 0.0
    valid = int((evals[:k] > _NOISE_FLOOR * top).sum()) if top > 0 else 0
    return Subspace(complete_basis(basis[:, :valid], n, k, seed), evals, total)


def complete_basis(basis: torch.Tensor, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Append orthonormal columns to ``basis`` (n × j, orthonormal) until it has k."""
    j = basis.shape[1]
    if j >= k:
        return basis[:, :k]
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randn(n, k - j, generator=gen, dtype=torch.float64).to(basis.device)
    for _ in range(2):  # twice is enough for orthogonality to float64 precision
        extra = extra - basis @ (basis.T @ extra)
    extra = torch.linalg.qr(extra)[0]
    return torch.cat([basis, extra], dim=1)


def smallest_k_for_energy(energies: torch.Tensor, target: float, total: float | None = None) -> int | None:
    """Smallest k whose share of the total Σσ² reaches ``target`` (at least 1).

    ``energies`` may be only the leading σ²: None means the target lies beyond them.
    """
    total = float(energies.sum()) if total is None else total
    if total <= 0:
        return 1
    cumulative = torch.cumsum(energies, 0) / total
    reached = torch.nonzero(cumulative >= target - 1e-12)
    if reached.numel():
        return int(reached[0]) + 1
    return None if energies.numel() else 1


def captured_energy(U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor) -> float:
    """Σ_t ‖Uᵀ ΔW_t V‖²: what orthonormal bases keep with full cores (HOOI's objective)."""
    U, V, B, A = (t.to(torch.float64) for t in (U, V, B, A))
    core = s.to(torch.float64)[:, None, None] * ((U.T @ B) @ (A @ V))
    return float((core**2).sum())


def refine(
    U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, sweeps: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Alternating (HOOI) sweeps: best U for fixed V, then best V for fixed U.

    Each half-step is a top-k (warm-started from the current basis), so the captured energy
    Σ_t ‖Uᵀ ΔW_t V‖² — read off the V step's eigen-energies — never falls; a sweep that
    would lower it is discarded, and sweeps stop once one gains less than 1e-9.
    """
    ku, kv = U.shape[1], V.shape[1]
    best = -1.0
    done = 0
    for _ in range(sweeps):
        U_new = top_left(B, A @ V.to(A.dtype), s.to(A.dtype), ku, warm=U, max_iter=WARM_ITERS).basis
        right = top_right(U_new.T.to(B.dtype) @ B, A, s.to(A.dtype), kv, warm=V, max_iter=WARM_ITERS)
        gain = right.captured
        if gain < best:  # rounding only; keep the better pair
            break
        U, V, done = U_new, right.basis, done + 1
        if gain - best <= 1e-9 * max(gain, 1e-300):
            break
        best = gain
    return U, V, done


def core_factors(
    U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float, p: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """E (k × p), F (p × k) with E·F the best rank-p core for one adapter on these bases."""
    keep = min(p, B.shape[1])
    E, F = split_cores((U.T @ B)[None], (A @ V)[None], torch.tensor([scale], dtype=B.dtype), [keep], [B.shape[1]])
    return E[0, :, :keep], F[0, :keep]


def split_cores(
    P: torch.Tensor, Q: torch.Tensor, s: torch.Tensor, keeps: list[int], ranks: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (E, F) of each core C_t = s_t·P_t·Q_t, batched (P (T, k, r) = UᵀB, Q (T, r, k) = A·V).

    Where ``keeps[t]`` reaches the adapter's rank ``ranks[t]`` the core is kept exactly, split
    evenly as (±√|s| P, √|s| Q); below it the core is cut to its best rank-``keeps[t]`` part by
    SVD. Both come back zero-padded to r columns of E (rows of F): E·F is unchanged.
    """
    root = s.abs().sqrt()[:, None, None]
    E = torch.where(s[:, None, None] >= 0, root, -root) * P
    F = root * Q
    cut = [t for t, (keep, rank) in enumerate(zip(keeps, ranks)) if keep < rank]
    if cut:
        u, sv, vh = torch.linalg.svd(s[cut, None, None] * (P[cut] @ Q[cut]))
        for i, t in enumerate(cut):
            keep, rt = keeps[t], sv[i, : keeps[t]].sqrt()
            E[t].zero_()
            F[t].zero_()
            E[t, :, :keep] = u[i, :, :keep] * rt
            F[t, :keep] = rt[:, None] * vh[i, :keep]
    return E, F


def difference_norm2(
    G11: torch.Tensor, G12: torch.Tensor, G22: torch.Tensor, H11: torch.Tensor, H12: torch.Tensor, H22: torch.Tensor
) -> torch.Tensor:
    """‖X₁Y₁ − X₂Y₂‖²_F from Grams only, batched over leading dimensions.

    With G11 = X₁ᵀX₁, G12 = X₁ᵀX₂, G22 = X₂ᵀX₂, H11 = Y₁Y₁ᵀ, H12 = Y₁Y₂ᵀ, H22 = Y₂Y₂ᵀ it is
    ⟨G11, H11⟩ − 2⟨G12, H12⟩ + ⟨G22, H22⟩: (r + p)-sized products, never an n × d matrix.
    """
    inner = lambda G, H: (G * H).sum(dim=(-2, -1))  # noqa: E731
    return (inner(G11, H11) - 2 * inner(G12, H12) + inner(G22, H22)).clamp_min(0.0)


def squared_errors(
    B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, U: torch.Tensor, E: torch.Tensor, F: torch.Tensor, V: torch.Tensor,
    P: torch.Tensor | None = None, Q: torch.Tensor | None = None, grams: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖ΔW_t − U E_t F_t Vᵀ‖², ‖ΔW_t‖²) for every t exactly, in float64, batched over adapters.

    X₁ = s B, Y₁ = A against X₂ = U E, Y₂ = F Vᵀ (``difference_norm2``). Holds for any U, V,
    orthonormal or not, so it measures what is stored (rounded to the storage dtype).
    ``P`` = UᵀB and ``Q`` = A V, and ``grams`` = (BᵀB, AAᵀ), when the caller has them, are not computed again.
    """
    f64 = torch.float64
    s, U, E, F, V = (t.to(f64) for t in (s, U, E, F, V))  # B and A only where P, Q or the Grams are missing
    P = wide_products(B.transpose(-1, -2), U).transpose(-1, -2) if P is None else P.to(f64)
    Q = wide_products(A, V) if Q is None else Q.to(f64)
    s1 = s[:, None, None]
    BtB, AAt = grams if grams is not None else factor_grams(B, A)
    G11 = s1 * s1 * BtB
    H11 = AAt
    err2 = difference_norm2(G11, s1 * (P.mT @ E), E.mT @ (U.T @ U) @ E, H11, Q @ F.mT, F @ (V.T @ V) @ F.mT)
    return err2, (G11 * H11).sum(dim=(-2, -1)).clamp_min(0.0)


def squared_error(
    B: torch.Tensor, A: torch.Tensor, scale: float, U: torch.Tensor, E: torch.Tensor, F: torch.Tensor, V: torch.Tensor
) -> tuple[float, float]:
    """``squared_errors`` for one adapter, as floats."""
    err2, norm2 = squared_errors(B[None], A[None], torch.tensor([scale], dtype=torch.float64), U, E[None], F[None], V)
    return float(err2[0]), float(norm2[0])
