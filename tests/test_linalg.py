"""The math on factors agrees with dense float64 linear algebra."""

import torch

from sharecompress import linalg
from sharecompress.compress import KRule, compress_module, pad_stack

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
