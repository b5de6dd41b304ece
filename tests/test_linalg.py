"""The math on factors agrees with dense float64 linear algebra."""

import pytest
import torch

from sharecompress.core import linalg
from sharecompress.core.compress import KRule, compress_module, pad_stack

from factories import dense_delta, planted_basis, random_factors


def _stack(T=6, n=30, d=22, r=4, seed=0):
    factors = [random_factors({"m": (n, d)}, r, seed=seed + t)["m"] for t in range(T)]
    scales = [0.5 + t for t in range(T)]
    return factors, scales


def _span_distance(P, Q):
    """Largest principal-angle sine between two orthonormal column spans of equal size."""
    return float(torch.linalg.matrix_norm(P - Q @ (Q.T @ P), ord=2))


def test_left_and_right_bases_span_the_dense_stack_svd():
    factors, scales = _stack()
    B, A = pad_stack(factors)
    s = torch.tensor(scales, dtype=torch.float64)
    dense = [dense_delta(b, a, sc) for (b, a), sc in zip(factors, scales)]
    k = 7
    U_ref = torch.linalg.svd(torch.cat(dense, dim=1))[0][:, :k]
    V_ref = torch.linalg.svd(torch.cat(dense, dim=0))[2][:k].T
    U = linalg.top_subspace(linalg.left_blocks(B, A, s), k).basis
    V = linalg.top_subspace(linalg.right_blocks(B, A, s), k).basis
    assert _span_distance(U, U_ref) < 1e-8
    assert _span_distance(V, V_ref) < 1e-8
    assert torch.allclose(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-12)


def test_energies_are_the_dense_singular_values_squared():
    factors, scales = _stack(T=3)
    B, A = pad_stack(factors)
    s = torch.tensor(scales, dtype=torch.float64)
    dense = torch.cat([dense_delta(b, a, sc) for (b, a), sc in zip(factors, scales)], dim=1)
    sv = torch.linalg.svdvals(dense)
    got = linalg.top_subspace(linalg.left_blocks(B, A, s), 3).energies
    assert got.numel() == 12  # the stack has Σr = 12 columns
    assert torch.allclose(got, sv[:12] ** 2, rtol=1e-9, atol=1e-12)
    assert float(sv[12:].abs().max()) < 1e-12


def test_bases_do_not_depend_on_how_B_and_A_were_split():
    factors, scales = _stack(T=4)
    gen = torch.Generator().manual_seed(9)
    regauged = []
    for b, a in factors:
        G = torch.randn(b.shape[1], b.shape[1], generator=gen, dtype=torch.float64) + 3 * torch.eye(b.shape[1])
        regauged.append((b @ G, torch.linalg.solve(G, a)))
    s = torch.tensor(scales, dtype=torch.float64)
    U1 = linalg.top_subspace(linalg.left_blocks(*pad_stack(factors), s), 5).basis
    U2 = linalg.top_subspace(linalg.left_blocks(*pad_stack(regauged), s), 5).basis
    assert _span_distance(U1, U2) < 1e-8


def test_squared_error_matches_dense_for_any_bases():
    gen = torch.Generator().manual_seed(3)
    n, d, r, k, p = 17, 13, 4, 6, 3
    B, A = (torch.randn(n, r, generator=gen, dtype=torch.float64), torch.randn(r, d, generator=gen, dtype=torch.float64))
    U, V = torch.randn(n, k, generator=gen, dtype=torch.float64), torch.randn(d, k, generator=gen, dtype=torch.float64)
    E, F = torch.randn(k, p, generator=gen, dtype=torch.float64), torch.randn(p, k, generator=gen, dtype=torch.float64)
    err2, norm2 = linalg.squared_error(B, A, 0.7, U, E, F, V)
    dense = dense_delta(B, A, 0.7)
    assert abs(err2 - float(((dense - U @ E @ F @ V.T) ** 2).sum())) <= 1e-9 * err2
    assert abs(norm2 - float((dense**2).sum())) <= 1e-12 * norm2


def test_refinement_never_loses_energy_and_beats_plain_bases():
    factors, scales = _stack(T=8, r=5)
    B, A = pad_stack(factors)
    s = torch.tensor(scales, dtype=torch.float64)
    k = 6
    U = linalg.top_subspace(linalg.left_blocks(B, A, s), k).basis
    V = linalg.top_subspace(linalg.right_blocks(B, A, s), k).basis
    before = linalg.captured_energy(U, V, B, A, s)
    previous = before
    for sweeps in range(1, 5):
        U2, V2, _ = linalg.refine(U, V, B, A, s, sweeps)
        now = linalg.captured_energy(U2, V2, B, A, s)
        assert now >= previous - 1e-12 * previous
        previous = now
    assert previous > before


def test_truncated_core_is_the_best_rank_p_core():
    factors, scales = _stack(T=1, r=6)
    (b, a), sc = factors[0], scales[0]
    U = linalg.complete_basis(torch.zeros(30, 0, dtype=torch.float64), 30, 8, seed=1)
    V = linalg.complete_basis(torch.zeros(22, 0, dtype=torch.float64), 22, 8, seed=2)
    E, F = linalg.core_factors(U, V, b, a, sc, 2)
    core = sc * (U.T @ b) @ (a @ V)
    u, sv, vh = torch.linalg.svd(core)
    best = (u[:, :2] * sv[:2]) @ vh[:2]
    assert torch.allclose(E @ F, best, atol=1e-10)


def test_energy_rule_picks_the_smallest_sufficient_k():
    energies = torch.tensor([5.0, 3.0, 1.5, 0.5], dtype=torch.float64)
    assert linalg.smallest_k_for_energy(energies, 0.5) == 1
    assert linalg.smallest_k_for_energy(energies, 0.8) == 2
    assert linalg.smallest_k_for_energy(energies, 0.9) == 3
    assert linalg.smallest_k_for_energy(energies, 1.0) == 4


def test_planted_subspace_is_recovered_exactly():
    mods = {"m": (40, 36)}
    basis = planted_basis(mods, 5, seed=1)
    factors = [random_factors(mods, 3, seed=10 + t, basis=basis)["m"] for t in range(12)]
    result = compress_module(factors, [1.0] * 12, KRule(k=5), store=torch.float64)
    total = sum(c.norm2 for c in result.cores)
    assert sum(c.err2 for c in result.cores) <= 1e-14 * total  # the trace formula's float64 cancellation floor
    assert _span_distance(result.U, basis["m"][0]) < 1e-8


def test_zero_adapters_give_a_full_orthonormal_basis():
    factors = [(torch.zeros(10, 2, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)) for _ in range(2)]
    result = compress_module(factors, [2.0, 2.0], KRule(k=3), store=torch.float64)
    assert result.k == 3
    assert torch.allclose(result.U.T @ result.U, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert all(c.err2 == 0.0 and c.norm2 == 0.0 for c in result.cores)


def _module_problem(T=10, n=120, d=100, r=8, k0=6, noise=0.05, seed=4):
    mods = {"m": (n, d)}
    basis = planted_basis(mods, k0, seed=seed)
    factors = [random_factors(mods, r, seed=seed + 10 + t, basis=basis, noise=noise)["m"] for t in range(T)]
    return factors, [0.5 + 0.1 * t for t in range(T)], basis["m"]


def test_sketched_path_matches_the_exact_path(monkeypatch):
    """Large modules are sketched (range finder + exact solve); on a gapped problem the result is the same."""
    factors, scales, (P, Q) = _module_problem()
    exact = compress_module(factors, scales, KRule(k=6), store=torch.float64)
    monkeypatch.setattr(linalg, "EXACT_LIMIT", 40)  # force the sketch on these shapes
    sketched = compress_module(factors, scales, KRule(k=6), store=torch.float64)
    assert _span_distance(sketched.U, exact.U) < 1e-6
    assert _span_distance(sketched.V, exact.V) < 1e-6
    for a, b in zip(sketched.cores, exact.cores):
        assert a.err2 == pytest.approx(b.err2, rel=1e-6, abs=1e-12)
    # and its reported errors are still the dense ones
    for core, (b, a), sc in zip(sketched.cores, factors, scales):
        dense = dense_delta(b, a, sc)
        rec = sketched.U @ core.E @ core.F @ sketched.V.T
        assert core.err2 == pytest.approx(float(((dense - rec) ** 2).sum()), rel=1e-6)


def test_sketched_energy_rule_widens_until_reached(monkeypatch):
    factors, scales, _ = _module_problem(noise=0.6)
    monkeypatch.setattr(linalg, "EXACT_LIMIT", 40)
    result = compress_module(factors, scales, KRule(energy=0.97), store=torch.float64)
    kept = 1 - sum(c.err2 for c in result.cores) / sum(c.norm2 for c in result.cores)
    assert kept >= 0.97 - 1e-9
    assert result.k > 6  # the noise needs more than the planted directions


def test_iterative_top_subspace_matches_exact(monkeypatch):
    factors, scales, _ = _module_problem(T=12, n=150, d=140)
    B, A = pad_stack(factors)
    s = torch.tensor(scales, dtype=torch.float64)
    exact = linalg.top_subspace(linalg.left_blocks(B, A, s), 6)
    monkeypatch.setattr(linalg, "EXACT_LIMIT", 10)
    iterated = linalg.top_subspace(linalg.left_blocks(B, A, s), 6)
    assert _span_distance(iterated.basis, exact.basis) < 1e-5
    assert iterated.total == pytest.approx(exact.total, rel=1e-12)
    assert torch.allclose(iterated.energies[:6], exact.energies[:6], rtol=1e-6)


@pytest.mark.parametrize("T, n, ranks", [(6, 30, [4] * 6), (3, 30, [4, 2, 3]), (20, 18, [3] * 19 + [1])])
def test_top_left_and_top_right_are_the_dense_stacks_subspaces(T, n, ranks):
    """The Gram path (a small side below a wide stack) and the blocks path agree with the dense SVD,
    zero-padded mixed ranks included."""
    gen = torch.Generator().manual_seed(T)
    d = n - 5
    factors = [(torch.randn(n, r, generator=gen, dtype=torch.float64), torch.randn(r, d, generator=gen, dtype=torch.float64))
               for r in ranks]
    scales = [0.3 + 0.2 * t for t in range(T)]
    B, A = pad_stack(factors)
    s = torch.tensor(scales, dtype=torch.float64)
    dense = [dense_delta(b, a, sc) for (b, a), sc in zip(factors, scales)]
    k = 5
    U_ref, S_ref, Vh_ref = torch.linalg.svd(torch.cat(dense, dim=1))
    V_ref = torch.linalg.svd(torch.cat(dense, dim=0))[2][:k].T
    left, right = linalg.top_left(B, A, s, k), linalg.top_right(B, A, s, k)
    assert _span_distance(left.basis, U_ref[:, :k]) < 1e-8
    assert _span_distance(right.basis, V_ref) < 1e-8
    assert torch.allclose(left.energies[:k], S_ref[:k] ** 2, rtol=1e-10)
    assert left.total == pytest.approx(float((S_ref**2).sum()), rel=1e-12)
    assert right.total == pytest.approx(left.total, rel=1e-12)


def test_range_basis_on_factors_is_the_range_basis_of_the_formed_stack():
    """The factored stack (rows and r × r blocks) is the stack ``left_blocks`` forms: fed either way,
    with the same root, the range finder returns the same basis."""
    factors, scales = _stack(T=8, n=40, d=36, r=5)
    B, A = pad_stack(factors)
    s = torch.tensor(scales, dtype=torch.float64)
    R = linalg.gram_roots(A @ A.mT)  # RᵀR = AAᵀ
    assert torch.allclose(R.mT @ R, A @ A.mT, rtol=1e-10, atol=1e-10)
    X = s[:, None, None] * (B @ R.mT)  # the formed blocks s_t·B_t·R_tᵀ
    eye = torch.eye(X.shape[-1], dtype=X.dtype).expand(X.shape[0], -1, -1)
    formed = linalg.range_basis(X.mT.contiguous(), eye, 12, power=3)
    factored = linalg.range_basis(B.mT.contiguous(), s[:, None, None] * R.mT, 12, power=3)
    assert _span_distance(factored, formed) < 1e-4
    assert torch.allclose(factored.T @ factored, torch.eye(12, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("half", [None, torch.bfloat16], ids=["float32", "bfloat16 then float32"])
def test_sketch_holds_the_leading_subspaces_and_the_exact_total(monkeypatch, half):
    """On a gapped stack the sketch's working bases hold the dense top directions of both sides,
    mixed ranks and a singular Gram (zero padding) included, and its total is Σ‖ΔW_t‖²; the same
    where bfloat16 is there for the early power iterations (``linalg.fast_half``): a gap this steep
    keeps them in float32 (in bfloat16 throughout, the bases were 2·10⁻³ off)."""
    from sharecompress.core.compress import sketch

    monkeypatch.setattr(linalg, "fast_half", lambda device: half)

    n, d, k = 60, 50, 4
    gen = torch.Generator().manual_seed(5)
    Ub = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    Vb = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]
    factors = []
    for t, r in enumerate([5, 5, 3, 5, 4, 5, 5, 2]):
        core = torch.randn(k, r, generator=gen, dtype=torch.float64) * 10
        B = Ub @ core + 1e-3 * torch.randn(n, r, generator=gen, dtype=torch.float64)
        A = torch.randn(r, k, generator=gen, dtype=torch.float64) @ Vb.T + 1e-3 * torch.randn(r, d, generator=gen, dtype=torch.float64)
        factors.append((B, A))
    scales = [0.5 + 0.1 * t for t in range(len(factors))]
    B, A = pad_stack(factors)
    s = torch.tensor(scales, dtype=torch.float64)
    WU, WV, total = sketch(B.float(), A.float(), s.float(), (12, 12))
    dense = [dense_delta(b, a, sc) for (b, a), sc in zip(factors, scales)]
    U_ref = torch.linalg.svd(torch.cat(dense, dim=1))[0][:, :k]
    V_ref = torch.linalg.svd(torch.cat(dense, dim=0))[2][:k].T
    held = lambda W, Ref: float(torch.linalg.matrix_norm(Ref - W @ (W.T @ Ref), ord=2))  # noqa: E731
    assert held(WU.double(), U_ref) < 1e-6 and held(WV.double(), V_ref) < 1e-6
    assert float(total) == pytest.approx(sum(float(x.pow(2).sum()) for x in dense), rel=1e-6)


def test_fast_half_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    """bfloat16 on a CPU that says it has AVX512-BF16 (or AMX), nothing elsewhere: GPUs and CPUs
    without them keep float32 products, and a changed private probe falls back to float32."""
    assert linalg.fast_half(torch.device("cuda")) is None
    assert linalg.fast_half(torch.device("meta")) is None
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert linalg.fast_half(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert linalg.fast_half(torch.device("cpu")) is torch.bfloat16
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert linalg.fast_half(torch.device("cpu")) is None

    def broken() -> bool:
        raise OSError("probe changed")

    for changed in (broken, True):  # a probe that raises, or one that is no longer a function (review finding)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", changed, raising=False)
        assert linalg.fast_half(torch.device("cpu")) is None


def _flat_rows(T=24, c=4, n=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(T, c, n, generator=gen)
    return rows, torch.eye(c).expand(T, c, c).contiguous()


def test_a_steep_spectrum_keeps_the_sketch_in_float32(monkeypatch):
    """bfloat16 keeps 8 bits: with one adapter 1000× louder than the rest its rounding wiped out the
    others' directions, and their errors rose 3 % (review finding). Where a random start's singular
    values spread beyond ``HALF_SPREAD``, the range finder stays in float32 and returns exactly the
    float32 basis; on a flat stack it takes the bfloat16 passes, to the same subspace."""
    rows, D = _flat_rows()
    loud = rows.clone()
    loud[0] *= 1000.0
    got = {}
    for half in (None, torch.bfloat16):
        monkeypatch.setattr(linalg, "fast_half", lambda device, half=half: half)
        got[half] = (linalg.range_basis(loud, D, 16, power=3), linalg.range_basis(rows, D, 16, power=3))
    assert torch.equal(got[None][0], got[torch.bfloat16][0])  # the steep stack: float32 throughout
    flat32, flat16 = got[None][1], got[torch.bfloat16][1]
    assert not torch.equal(flat32, flat16)  # the flat stack took the bfloat16 passes
    assert _span_distance(flat16[:, :8], flat32) < 0.05  # and found the same leading directions


def test_bfloat16_passes_find_the_leading_directions_as_float32_does(monkeypatch):
    """A stack whose leading directions stand 3–4× above 52 others of 0.5–1 (within ``HALF_SPREAD``):
    the range finder takes the bfloat16 passes, and its working basis holds the leading 8 directions
    as closely as the float32 one (about 10⁻⁴ after three iterations, for both)."""
    gen = torch.Generator().manual_seed(0)
    T, c, n, width, k = 40, 4, 300, 24, 8
    P = torch.linalg.qr(torch.randn(n, 60, generator=gen, dtype=torch.float64))[0]
    scales = torch.cat([torch.linspace(3, 4, k, dtype=torch.float64), torch.linspace(0.5, 1, 52, dtype=torch.float64)])
    rows = torch.stack([(torch.randn(c, 60, generator=gen, dtype=torch.float64) * scales) @ P.T for _ in range(T)]).float()
    D = torch.eye(c).expand(T, c, c).contiguous()
    leading = torch.linalg.svd(rows.double().reshape(T * c, n).T, full_matrices=False)[0][:, :k]
    held = lambda W: float(torch.linalg.matrix_norm(leading - W @ (W.T @ leading), ord=2))  # noqa: E731
    got = {}
    for half in (None, torch.bfloat16):
        monkeypatch.setattr(linalg, "fast_half", lambda device, half=half: half)
        got[half] = linalg.range_basis(rows, D, width, power=3)
    assert not torch.equal(got[None], got[torch.bfloat16])  # the bfloat16 passes ran
    assert held(got[torch.bfloat16]) <= 1.2 * held(got[None]) + 1e-6
    assert held(got[None]) < 1e-3


def test_wide_products_of_zero_size_factors():
    """No chunks to widen: the same empty products as a whole float64 copy (review finding: a reshape failed)."""
    for shape in ((5, 0, 10), (5, 3, 0), (0, 3, 10)):
        rows = torch.randn(shape)
        assert linalg.wide_products(rows).shape == (shape[0], shape[1], shape[1])
        assert torch.equal(linalg.wide_products(rows, torch.ones(shape[2], 2)), torch.zeros(shape[0], shape[1], 2, dtype=torch.float64))


def test_gram_roots_of_singular_and_ill_conditioned_grams():
    """A Cholesky root where the Gram allows, the symmetric root where it is singular: RᵀR = G either way."""
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(3, 5, 40, generator=gen, dtype=torch.float64)
    A[1, 3:] = 0.0  # a lower rank, zero-padded
    A[2] = torch.logspace(0, -6, 5, dtype=torch.float64)[:, None] * A[2]  # a split of condition number 10⁶
    G = A @ A.mT
    R = linalg.gram_roots(G)
    assert torch.allclose(R.mT @ R, G, rtol=1e-9, atol=1e-12 * float(G.abs().max()))
    assert torch.equal(R[0], torch.triu(R[0]))  # Cholesky where it can


@pytest.mark.parametrize("sketched", [False, True])
def test_float64_factors_split_with_condition_1e6_give_the_same_bases(monkeypatch, sketched):
    """The same updates as (B·G, G⁻¹·A), G non-diagonal with condition number 10⁶, and as a
    well-conditioned split: the bases agree to 1e-6 on both paths (the sketch once rounded
    float64 factors and their roots to float32 apart, and lost it to 3e-3: review finding)."""
    import math

    gen = torch.Generator().manual_seed(0)
    n, d, r, k0 = 48, 40, 8, 4
    P = torch.linalg.qr(torch.randn(n, k0, generator=gen, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(d, k0, generator=gen, dtype=torch.float64))[0]
    ill, well = [], []
    for _ in range(4):
        B = P @ torch.randn(k0, r, generator=gen, dtype=torch.float64) + 0.05 * torch.randn(n, r, generator=gen, dtype=torch.float64)
        A = torch.randn(r, k0, generator=gen, dtype=torch.float64) @ Q.T + 0.05 * torch.randn(r, d, generator=gen, dtype=torch.float64)
        Q1, Q2 = (torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))[0] for _ in range(2))
        sv = torch.logspace(0, -6, r, dtype=torch.float64)
        Bi, Ai = B @ (Q1 @ torch.diag(sv) @ Q2), (Q2.T @ torch.diag(1 / sv) @ Q1.T) @ A
        ill.append((Bi, Ai))
        u, s_, vh = torch.linalg.svd(Bi @ Ai, full_matrices=False)
        well.append((u[:, :r] * s_[:r].sqrt(), s_[:r].sqrt()[:, None] * vh[:r]))
    if sketched:
        monkeypatch.setattr(linalg, "EXACT_LIMIT", 6)
    a, b = (compress_module(f, [1.0] * 4, KRule(k=4), store=torch.float64) for f in (ill, well))
    sines = torch.linalg.svdvals(a.U.T @ b.U)
    assert math.sqrt(max(0.0, 1 - float(sines.min()) ** 2)) < 1e-6
