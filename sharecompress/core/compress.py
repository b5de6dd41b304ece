"""One module group, end to end: bases, per-adapter cores and exact errors (no files here)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Any

import torch

from . import linalg
from .bounds import merge_parts
from .scratch import Scratch
from . import METHODS  # noqa: F401  (re-exported: merge and the CLI read it here)


@dataclass(frozen=True)
class KRule:
    """How many shared components a module gets: a fixed ``k`` or an ``energy`` share."""

    k: int | None = None
    energy: float | None = None
    k_min: tuple[int, int] = (1, 1)  # per side (U, V): an add never shrinks a module's k
    k_max: tuple[int, int] | None = None  # per side: `add --grow off` holds k where it is
    sides: tuple[int, int] | None = None  # a fixed k per side (U, V), e.g. a commit that keeps new directions

    @property
    def fixed(self) -> tuple[int, int] | None:
        """The k of each side when the rule fixes it (``k`` or ``sides``), else None."""
        return self.sides if self.sides is not None else (self.k, self.k) if self.k is not None else None


@dataclass
class AdapterCore:
    """One adapter's part of one module: E (k × p), F (p × k) as stored, and its exact error."""

    E: torch.Tensor
    F: torch.Tensor
    err2: float
    norm2: float
    parts: list[float] | None = None  # ‖R‖ on the four parts of the bases (``bounds.merge_parts``): an anchor's


@dataclass
class ModuleResult:
    U: torch.Tensor  # (n, k), storage dtype
    V: torch.Tensor  # (d, k), storage dtype
    cores: list[AdapterCore]
    energies: torch.Tensor  # leading σ² of the left stack over its total, descending (the energy curve)
    sweeps_done: int

    @property
    def k(self) -> int:
        return self.U.shape[1]

    @property
    def k_v(self) -> int:
        return self.V.shape[1]


def pad_stack(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (B_t, A_t) of mixed ranks by zero-padding to the largest rank; ΔW is unchanged."""
    r = max(b.shape[1] for b, _ in factors)
    n, d = factors[0][0].shape[0], factors[0][1].shape[1]
    dtype = functools.reduce(torch.promote_types, [t.dtype for pair in factors for t in pair])
    if all(b.shape[1] == r for b, _ in factors):
        return torch.stack([b for b, _ in factors]).to(dtype), torch.stack([a for _, a in factors]).to(dtype)
    B = torch.zeros(len(factors), n, r, dtype=dtype)
    A = torch.zeros(len(factors), r, d, dtype=dtype)
    for t, (b, a) in enumerate(factors):
        B[t, :, : b.shape[1]] = b
        A[t, : a.shape[0]] = a
    return B, A


SKETCH_EXTRA = 32  # working-subspace width beyond k when a module is sketched
POWER_ITERS = 3


def _side_k(rule: KRule, sub: linalg.Subspace, total: float, cap: int, side: int) -> int | None:
    """k for one side (0: U, 1: V), or None when the energies found do not reach the target yet.

    An energy target e is asked of each side as 1 − (1 − e)/2: the update loses
    ‖(I − UUᵀ)ΔW‖² + ‖UUᵀΔW(I − VVᵀ)‖², at most the two sides' losses together, so every
    module keeps at least e of its energy (before a core is cut below its rank by ``p``).
    """
    if rule.fixed is not None:
        k = rule.fixed[side]
    else:
        k = linalg.smallest_k_for_energy(sub.energies, 1.0 - (1.0 - rule.energy) / 2, total)
        if k is None:
            return None
        k = max(k, rule.k_min[side])
    if rule.k_max is not None:
        k = min(k, rule.k_max[side])
    return max(1, min(k, cap))


def _solve(B, A, s, rule, method, sweeps, caps, totals=None):
    """Bases on factors small enough for exact eigen-solves (or already sketched).

    U and V each get their own k: a stack of rank above n (or d) fits a full U (or V) while the
    other side still needs every direction it has, so one k for both could not be lossless.
    """
    start = rule.fixed or (32, 32)
    widths = [min(caps[0], max(start[0], rule.k_min[0])), min(caps[1], max(start[1], rule.k_min[1]))]
    while True:
        left, right = linalg.top_left(B, A, s, widths[0]), linalg.top_right(B, A, s, widths[1])
        totals = totals or (left.total, right.total)
        ks = [_side_k(rule, sub, totals[i], caps[i], i) for i, sub in enumerate((left, right))]
        if widths == list(caps):
            ks = [k if k is not None else caps[i] for i, k in enumerate(ks)]
            break
        if all(k is not None and k <= w for k, w in zip(ks, widths)):
            break
        # An exact solve knows every energy, so its k may exceed the basis it returned: widen to k.
        widths = [w if k is not None and k <= w else min(caps[i], 2 * w if k is None else k)
                  for i, (w, k) in enumerate(zip(widths, ks))]
    ku, kv = ks
    curve = left.energies / totals[0] if totals[0] > 0 else left.energies
    if method == "paper":
        # The paper's literal recipe: stack the B's and the A's as they happen to be split.
        return linalg.top_subspace(B, ku).basis, linalg.top_subspace(A.transpose(-1, -2), kv).basis, curve, 0
    U, V, done = left.basis[:, :ku], right.basis[:, :kv], 0
    if sweeps > 0:
        U, V, done = linalg.refine(U, V, B, A, s, sweeps)
    return U, V, curve, done


def sketch_width(rule: KRule) -> int:
    """Working-subspace width of a module's first sketch (grows only if an energy target needs it)."""
    want = max(rule.fixed) if rule.fixed is not None else max(32, *rule.k_min)
    return want + SKETCH_EXTRA


def needs_sketch(n: int, d: int, total_rank: int, method: str) -> bool:
    """Whether a module is too large for exact solves on its factors (see ``module_bases``)."""
    return method != "paper" and min(n, d, total_rank) > linalg.EXACT_LIMIT


def sketch(
    B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, widths: tuple[int, int],
    grams: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_U, W_V, Σ‖ΔW_t‖²): randomized working bases for one module or a batch of G.

    Takes ``B (…, T, n, r)``, ``A (…, T, r, d)``, ``s (…, T)``: a batch of same-shape modules
    is one batched call, and each module's result equals what it would get alone.
    The stacks of ``left_blocks`` and ``right_blocks`` stay factored (``linalg.range_basis``): with
    B_tᵀB_t = R_BᵀR_B and A_tA_tᵀ = R_AᵀR_A (``linalg.gram_roots`` of ``grams``, the float64
    ``linalg.factor_grams``; a float64 QR for float64 factors), the left one is [s_t·B_t·R_Aᵀ]_t
    and the right one [s_t·A_tᵀ·R_Bᵀ]_t; the total is Σ_t s_t²·⟨B_tᵀB_t, A_tA_tᵀ⟩, exact.
    """
    BtB, AAt = grams if grams is not None else linalg.factor_grams(B, A)
    if B.dtype == torch.float64:  # their Grams are rounded: a QR's R keeps their conditioning (``gram_roots``)
        RB, RA = linalg.gauge_roots(B.transpose(-1, -2)), linalg.gauge_roots(A)
    else:
        RB, RA = linalg.gram_roots(BtB), linalg.gram_roots(AAt)
    sc = s[..., None, None].double()
    total = (sc.pow(2) * BtB * AAt).sum(dim=(-3, -2, -1))  # the same for both stacks
    # The bases do not change with the stacks' scale, but float32 products of factors of 1e-30 (or
    # 1e18) leave its range: the r × r blocks are divided by max_t |s_t|·‖B_t‖·‖A_t‖ (column norms
    # from the Grams), which keeps every product of the range finder near the factors' own size.
    norms = (BtB.diagonal(dim1=-2, dim2=-1).amax(-1) * AAt.diagonal(dim1=-2, dim2=-1).amax(-1)).sqrt()
    unit = (norms * s.double().abs()).amax(-1)
    unit = torch.where(unit > 0, unit, torch.ones_like(unit))[..., None, None, None]
    return (linalg.range_basis(B.transpose(-1, -2), (sc * RA.transpose(-1, -2) / unit).to(B.dtype), widths[0], POWER_ITERS),
            linalg.range_basis(A, (sc * RB.transpose(-1, -2) / unit).to(A.dtype), widths[1], POWER_ITERS), total)


def module_bases(
    B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, rule: KRule, method: str, sweeps: int, total_rank: int,
    sketched: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(U, V, left energy curve as shares of the total, sweeps done) for one module; bases float64.

    k is chosen on the spectra of the updates themselves, whatever the method, so that
    ``--method paper`` and ``share`` compare at equal k. Large modules are first sketched:
    a randomized range finder (a few float32 passes over the stacks) gives working subspaces
    W_U, W_V of width k + 32 holding the leading directions, and the whole problem, refinement
    included, is solved exactly on the factors projected there (W_Uᵀ B_t, A_t W_V). An energy
    target that the sketch cannot reach doubles its width. The errors reported later are exact
    whatever found the bases. ``sketched`` is this module's first sketch when a batched
    ``sketch`` call already made it.
    """
    n, d = B.shape[1], A.shape[2]
    caps = (min(n, total_rank), min(d, total_rank))  # each stack's largest rank: k there is lossless
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    work = torch.float64 if B.dtype == torch.float64 else torch.float32
    B, A, s = B.to(work), A.to(work), s.to(work)
    if not needs_sketch(n, d, total_rank, method):
        return _solve(B, A, s, rule, method, sweeps, caps)
    width = sketch_width(rule)
    while True:
        widths = (min(caps[0], width), min(caps[1], width))
        WU, WV, total = sketched if sketched is not None else sketch(B, A, s, widths)
        sketched = None
        total = float(total)
        Br = (B.transpose(-1, -2) @ WU.to(work)).transpose(-1, -2)  # one GEMM where B lies as its rows
        Ar = A @ WV.to(work)
        U, V, curve, done = _solve(Br.double(), Ar.double(), s.double(), rule, method, sweeps, widths, (total, total))
        roomy = all(k <= w - SKETCH_EXTRA // 2 or w == c for k, w, c in zip((U.shape[1], V.shape[1]), widths, caps))
        if rule.fixed is not None or roomy:
            return WU @ U, WV @ V, curve, done
        width = 2 * (width - SKETCH_EXTRA) + SKETCH_EXTRA


def project_all(
    U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor,
    ranks: list[int], p: int | None, store: torch.dtype, grams: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[AdapterCore]:
    """Every adapter's best core on the stored bases, rounded to ``store``, with exact errors;
    the cores on the host whatever the device.

    Batched over adapters (ranks zero-padded); errors by ``linalg.squared_errors`` in float64
    on the stored (rounded) values. ``grams``: ``linalg.factor_grams(B, A)`` when the caller has them.
    """
    f64 = torch.float64
    U64, V64, s64 = U.to(f64), V.to(f64), s.to(f64)
    P = linalg.wide_products(B.mT, U64).mT  # (T, k, r): B's rows as they lie (``as_rows``), widened in chunks
    Q = linalg.wide_products(A, V64)  # (T, r, k)
    k = min(U.shape[1], V.shape[1])
    keeps = [min(r, k, p if p is not None else r) for r in ranks]
    E, F = linalg.split_cores(P, Q, s64, keeps, ranks)
    E, F = E.to(store).contiguous(), F.to(store).contiguous()  # one copy each: every core a contiguous view (written as it lies)
    grams = grams or linalg.factor_grams(B, A)  # shared by the errors and the parts
    err2, norm2 = linalg.squared_errors(B, A, s64, U64, E, F, V64, P, Q, grams)
    parts = merge_parts(U64, V64, P, Q, B, A, s64, E, F, grams)
    # to the host in one transfer each (a GPU merge would otherwise wait on 2·T tiny copies per module)
    E, F, err2, norm2, parts = E.cpu(), F.cpu(), err2.tolist(), norm2.tolist(), parts.tolist()
    width, Es, Fs = E.shape[2], E.unbind(0), F.unbind(0)  # T views in one call: a zoo of 500 makes 64,000 of them
    return [
        AdapterCore(Es[t] if kp == width else Es[t][:, :kp].contiguous(), Fs[t][:kp], err2[t], norm2[t], parts[t])
        for t, kp in enumerate(keeps)
    ]


def compress_module(
    factors: list[tuple[torch.Tensor, torch.Tensor]], scales: list[float], rule: KRule, **options: Any
) -> ModuleResult:
    """Shared bases for one module and every adapter's core on them: a batch of one
    (``options`` as for ``compress_batch``: method, sweeps, p, store, device)."""
    return compress_batch([(factors, scales)], rule, **options)[0]


def spectrum(factors: list[tuple[torch.Tensor, torch.Tensor]], scales: list[float], width: int | tuple[int, int] = 128) -> torch.Tensor:
    """G_t = Uᵀ·ΔW_t·V (T × k_u × k_v) on the leading ``width`` singular directions of each of the
    module's two stacks (all of them for small stacks; one width per side when a pair): what
    ``budget.allocate`` works on."""
    widths = width if isinstance(width, tuple) else (width, width)
    B, A = pad_stack(factors)
    work = torch.float64 if B.dtype == torch.float64 else torch.float32
    B, A = B.to(work), A.to(work)
    s = torch.tensor(scales, dtype=work)
    total_rank = sum(b.shape[1] for b, _ in factors)
    bases = []
    for X, size, wide in ((linalg.left_blocks(B, A, s), B.shape[1], widths[0]), (linalg.right_blocks(B, A, s), A.shape[2], widths[1])):
        bases.append(linalg.top_subspace(X, max(1, min(wide, size, total_rank))).basis.to(work))
    U, V = bases
    return ((U.T @ B) * s[:, None, None] @ (A @ V)).double()  # each update on those directions


def compress_batch(
    batch: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float]]], rule: KRule | list[KRule], **options: Any,
) -> list[ModuleResult]:
    """``compress_module`` for G modules of one shape held by the same adapters with the same ranks.

    Stacks each module's factors (``pad_stack``) and hands them to ``compress_stacked`` (``options``
    as there: method, sweeps, p, store, device, finished); a merge reads its sources straight into
    such stacks instead (``ops.merge``).
    """
    stacks = [pad_stack(factors) for factors, _ in batch]
    ranks = [[b.shape[1] for b, _ in factors] for factors, _ in batch]
    if any(B.shape != stacks[0][0].shape or A.shape != stacks[0][1].shape for B, A in stacks) or any(r != ranks[0] for r in ranks):
        raise ValueError("a batch holds modules of one shape whose adapters have the same ranks")
    B = torch.stack([B for B, _ in stacks])
    A = torch.stack([A for _, A in stacks])
    del stacks
    s = torch.tensor([scales for _, scales in batch], dtype=torch.float64)
    return compress_stacked(B, A, s, ranks[0], rule, **options)


def as_rows(B: torch.Tensor, dtype: torch.dtype, scratch: Scratch | None = None, name: str = "rows",
            copy: bool = False) -> torch.Tensor:
    """B (…, n, r) in ``dtype``, held as its transpose: the view ``Bᵀ.mT`` of a contiguous Bᵀ (…, r, n).

    Every large product with B (the sketch's, Uᵀ·B_t) is then one GEMM over all adapters instead
    of a batch of r-wide ones. One copy at most (into ``scratch``'s buffer ``name`` when given),
    none when B already lies so, unless ``copy`` (B's memory is about to be reused).
    """
    rows = B.transpose(-1, -2)
    if copy or rows.dtype != dtype or not rows.is_contiguous():
        rows = _buffer(rows, dtype, scratch, name).copy_(rows)  # widened as it is moved
    return rows.transpose(-1, -2)


def widened(X: torch.Tensor, dtype: torch.dtype, scratch: Scratch | None = None, name: str = "widened",
            copy: bool = False) -> torch.Tensor:
    """X in ``dtype``: X itself when it is (and not ``copy``), else a contiguous copy (into
    ``scratch``'s buffer ``name`` when given)."""
    return X if X.dtype == dtype and not copy else _buffer(X, dtype, scratch, name).copy_(X)


def _buffer(X: torch.Tensor, dtype: torch.dtype, scratch: Scratch | None, name: str) -> torch.Tensor:
    if scratch is None:
        return torch.empty(X.shape, dtype=dtype, device=X.device)
    return scratch.take(name, tuple(X.shape), dtype, X.device)


def compress_stacked(
    B: torch.Tensor,
    A: torch.Tensor,
    s: torch.Tensor,
    ranks: list[int],
    rule: KRule | list[KRule],
    method: str = "share",
    sweeps: int = 3,
    p: int | None | list[int | None] = None,
    store: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    finished: Callable[[int], None] | None = None,
    not_finite: Callable[[], None] | None = None,
) -> list[ModuleResult]:
    """Bases and cores for G modules of one shape: B (G, T, n, r), A (G, T, r, d) zero-padded to the
    largest of ``ranks`` (adapter t's own rank), s (G, T) the scales.

    The factors may be in the sources' own dtype (float16, say): they travel to ``device`` as they
    are and are widened there. The sketches — the passes over the full-size factors, which hold
    nearly all the arithmetic — run as one batched call; what follows works on small projected
    factors and goes module by module. Results equal G separate ``compress_module`` calls.
    ``rule`` and ``p`` are one for all, or one per module (a budget gives each its own k and p).
    The stacks are checked for NaN or Inf once, on the device, through their float64 Grams (a
    diagonal entry, a sum of squares, is not finite when any element of its factor is not);
    ``not_finite`` is called then, to name the file (it raises), else ValueError.
    """
    G = B.shape[0]
    rules = rule if isinstance(rule, list) else [rule] * G
    ps = p if isinstance(p, list) else [p] * G
    n, d, total_rank = B.shape[2], A.shape[3], sum(ranks)
    B, A = B.to(device, non_blocking=True), A.to(device, non_blocking=True)
    s = s.to(device=device, dtype=torch.float64)
    work = torch.float64 if B.dtype == torch.float64 else torch.float32
    B, A = as_rows(B, work), widened(A, work)  # widened once, on the device
    grams = linalg.factor_grams(B, A)  # float64, widened a chunk at a time (``linalg.wide_products``)
    # a NaN or Inf anywhere in a factor makes its Gram's diagonal (Σ of squares) NaN or Inf
    if not all(bool(torch.isfinite(X.diagonal(dim1=-2, dim2=-1).sum())) for X in grams):
        if not_finite is not None:
            not_finite()
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):  # float64 squares can overflow alone
            raise ValueError("the factors hold NaN or Inf")
    sketched = None
    if needs_sketch(n, d, total_rank, method):
        width = max(sketch_width(r) for r in rules)
        sketched = sketch(B, A, s.to(work), (min(n, total_rank, width), min(d, total_rank, width)), grams)
    results = []
    for g in range(G):
        mine = None if sketched is None else tuple(t[g] for t in sketched)
        U, V, curve, done = module_bases(B[g], A[g], s[g], rules[g], method, sweeps, total_rank, mine)
        U_st, V_st = U.to(store).contiguous(), V.to(store).contiguous()
        cores = project_all(U_st, V_st, B[g], A[g], s[g], ranks, ps[g], store, (grams[0][g], grams[1][g]))
        results.append(ModuleResult(U_st.cpu(), V_st.cpu(), cores, curve.cpu(), done))
        if finished:
            finished(g)  # a progress bar advances per module, not per batch
    return results
