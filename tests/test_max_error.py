"""--max-error: private residuals bring every adapter to ≤ X, checked against dense references."""

import itertools
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import sharecompress
from sharecompress.cli import app
from sharecompress.core.residual import Candidate, choose_ranks, factored_norm2, factored_svd, first_target, fit_residuals

from factories import PREFIX, TinyNet, dense_delta, tiny_zoo
from test_add import adapters

runner = CliRunner()
SAMPLES = __import__('pathlib').Path(__file__).resolve().parents[1] / "sample_adapters"


def stored(zoo, name: str) -> dict:
    """{module: the adapter's dense reconstruction, U·E·F·Vᵀ + RU·RVᵀ}."""
    bases, cores, own = zoo.bases(), zoo.cores(name), zoo.residuals(name)
    out = {}
    for m, (E, F) in cores.items():
        U, V = (t.double() for t in bases[m])
        W = U @ E.double() @ F.double() @ V.T
        if m in own:
            W = W + own[m][0].double() @ own[m][1].double().T
        out[m] = W
    return out


def dense_error(zoo, name: str, truth: dict) -> float:
    factors, scale = truth[name]
    rec = stored(zoo, name)
    err2 = sum(float(((dense_delta(b, a, scale) - rec[PREFIX + m]) ** 2).sum()) for m, (b, a) in factors.items())
    norm2 = sum(float((dense_delta(b, a, scale) ** 2).sum()) for b, a in factors.values())
    return math.sqrt(err2 / norm2)


def test_factored_svd_and_norm_match_dense():
    gen = torch.Generator().manual_seed(0)
    L, R = torch.randn(9, 4, generator=gen, dtype=torch.float64), torch.randn(4, 7, generator=gen, dtype=torch.float64)
    M = L @ R
    spec = factored_svd(L, R)
    assert torch.allclose(spec.sigma, torch.linalg.svdvals(M)[:4], rtol=1e-10)
    RU, RV = spec.factors(2, torch.float64)
    assert spec.tail2(2) == pytest.approx(float(((M - RU @ RV.T) ** 2).sum()), rel=1e-9)
    assert factored_norm2(L, R) == pytest.approx(float((M**2).sum()), rel=1e-12)


def _brute(candidates, target2):
    names = list(candidates)
    best = None
    for qs in itertools.product(*[range(candidates[m].spectrum.sigma.numel() + 1) for m in names]):
        if sum(candidates[m].bound2(q) for m, q in zip(names, qs)) <= target2:
            cost = sum(candidates[m].cost * q for m, q in zip(names, qs))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_choose_ranks_reaches_the_target_and_drops_every_spare_direction(seed):
    gen = torch.Generator().manual_seed(seed)
    candidates = {}
    for i in range(3):
        n, d, c = 6 + 3 * i, 5 + i, 4
        spec = factored_svd(torch.randn(n, c, generator=gen, dtype=torch.float64), torch.randn(c, d, generator=gen, dtype=torch.float64))
        candidates[f"m{i}"] = Candidate(spec, floor=0.3 * seed * float(torch.rand(1, generator=gen)), cost=n + d)
    top = sum(c.bound2(0) for c in candidates.values())
    low = sum(c.bound2(c.spectrum.sigma.numel()) for c in candidates.values())
    target2 = low + 0.3 * (top - low)
    q = choose_ranks(candidates, target2)
    assert q is not None
    assert sum(candidates[m].bound2(q[m]) for m in q) <= target2
    for m in q:  # no single direction can go
        if q[m]:
            assert sum(candidates[x].bound2(q[x] - (x == m)) for x in q) > target2
    cost = sum(candidates[m].cost * q[m] for m in q)
    assert cost <= 1.5 * _brute(candidates, target2)
    assert choose_ranks(candidates, low * 0.5 - 1e-9) is None or low == 0.0


def test_equal_costs_take_the_largest_directions_first():
    gen = torch.Generator().manual_seed(3)
    candidates = {f"m{i}": Candidate(factored_svd(torch.randn(8, 3, generator=gen, dtype=torch.float64),
                                                  torch.randn(3, 8, generator=gen, dtype=torch.float64)), 0.0, 16) for i in range(3)}
    target2 = 0.2 * sum(c.bound2(0) for c in candidates.values())
    q = choose_ranks(candidates, target2)
    assert sum(q.values()) * 16 == _brute(candidates, target2)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_merge_max_error_holds_every_adapter_against_the_dense_reference(tmp_path, dtype):
    paths, truth = adapters(tmp_path, 6)
    plain = sharecompress.merge(paths, tmp_path / "plain", k=2, dtype=dtype)
    before = {a["name"]: a["relative_error"] for a in plain.report()["adapters"]}
    limit = 0.5 * max(before.values())
    assert sum(e > limit for e in before.values()) >= 3  # the guarantee has work to do
    zoo = sharecompress.merge(paths, tmp_path / "zoo", k=2, dtype=dtype, max_error=limit)
    report = zoo.report()
    for a in report["adapters"]:
        exact = dense_error(zoo, a["name"], truth)
        assert exact <= limit * (1 + 1e-9)
        assert a["relative_error"] == pytest.approx(exact, rel=1e-5, abs=1e-7)  # the figure is the dense one
        assert (a["bytes_residual"] > 0) == (before[a["name"]] > first_target(limit))  # only those above X (less its room) pay
    assert report["max_error"] == limit
    assert report["bytes_compressed"] == report["bytes_basis"] + report["bytes_coefficients"] + report["bytes_residual"]
    exact = zoo.report(against=paths)
    assert all(a["relative_error"] <= limit * (1 + 1e-9) for a in exact["adapters"])
    assert sharecompress.Zoo.open(tmp_path / "zoo").verify()[0] == []


def test_export_and_against_include_the_residual(tmp_path):
    paths, truth = adapters(tmp_path, 5)
    zoo = sharecompress.merge(paths, tmp_path / "zoo", k=2, max_error=0.05)
    name = next(a["name"] for a in zoo.report()["adapters"] if a["bytes_residual"])
    out = zoo.export(name, tmp_path / "out")
    from sharecompress.io.readers import find_adapters

    exported = find_adapters([str(out)])[0]
    rec = stored(zoo, name)
    for m in exported.modules:
        b, a = exported.factors(m)
        assert torch.allclose(exported.modules[m].scale * b @ a, rec[m], atol=1e-6)
    assert zoo.report(against=paths)["adapters"][zoo.names.index(name)]["relative_error"] == pytest.approx(
        dense_error(zoo, name, truth), rel=1e-6)


def test_add_keeps_old_residuals_and_gives_a_new_adapter_its_own(tmp_path):
    paths, truth = adapters(tmp_path, 7)
    zoo = sharecompress.merge(paths[:5], tmp_path / "zoo", k=3, max_error=0.2)
    zoo.add([paths[5]], max_error=0.2)
    new = zoo.report()["adapters"][-1]
    assert new["bytes_residual"] > 0
    assert dense_error(zoo, new["name"], truth) <= 0.2 * (1 + 1e-9)
    for a in zoo.report()["adapters"]:
        assert dense_error(zoo, a["name"], truth) <= a["relative_error"] * (1 + 1e-9) + 1e-12  # each figure a true bound
    old = {n: {m: tuple(t.clone() for t in pair) for m, pair in zoo.residuals(n).items()} for n in zoo.names}
    assert sum(bool(o) for o in old.values()) >= 2
    zoo.add([paths[6]], max_error=5.0)  # a limit no bound reaches: nothing is refit, every residual travels as it was
    for n, own in old.items():
        now = zoo.residuals(n)
        assert now.keys() == own.keys()
        assert all(torch.equal(now[m][0], own[m][0]) and torch.equal(now[m][1], own[m][1]) for m in own)
    assert zoo.manifest["max_error"] == 5.0
    assert zoo.report()["adapters"][-1]["bytes_residual"] == 0


def test_an_add_that_would_lift_an_old_bound_above_the_limit_folds_its_drift_into_the_residual(tmp_path):
    paths, truth = adapters(tmp_path, 8)
    free = sharecompress.merge(paths[:4], tmp_path / "free", k=2)
    zoo = sharecompress.merge(paths[:4], tmp_path / "zoo", k=2, max_error=0.3)
    first = {n: zoo.residuals(n) for n in zoo.names}
    for path in paths[4:]:
        free.add([path])
        zoo.add([path])  # the zoo's own limit, without the flag
    assert any(a["relative_error"] > 0.3 for a in free.report()["adapters"][:4])  # without it a bound leaves the limit
    report = zoo.report()
    assert not all(a["exact"] for a in report["adapters"][:4])  # the adds moved the old ones
    refit = [n for n in zoo.names[:4] if zoo.residuals(n).keys() != first[n].keys()
             or any(not torch.equal(zoo.residuals(n)[m][0], first[n][m][0]) for m in first[n])]
    assert refit  # and some residual took the drift
    for a in report["adapters"]:
        assert a["relative_error"] <= 0.3 * (1 + 1e-9)
        assert dense_error(zoo, a["name"], truth) <= a["relative_error"] * (1 + 1e-9) + 1e-12
    assert zoo.verify()[0] == []


def test_residuals_survive_remove_and_the_runtime_serves_them(tmp_path):
    zoo_path, sources = tiny_zoo(tmp_path, count=3, k=1)
    zoo = sharecompress.merge(sources, tmp_path / "tight", k=1, max_error=0.05)
    held = [n for n in zoo.names if zoo.residuals(n)]
    assert held
    model = TinyNet()
    ids, image, x = TinyNet.inputs(rows=3)
    rt = zoo.attach(model)
    rows = list(zoo.names)
    rt.use(rows)
    with torch.no_grad():
        got = (model.embed_tokens(ids), model.conv(image), model.q_proj(x))
    rt.use(rows[0])
    with torch.no_grad():
        single = model.q_proj(x[:1])
    rt.detach()
    for row, name in enumerate(rows):
        rec = stored(zoo, name)
        emb = model.embed_tokens.weight + rec[PREFIX + "embed_tokens"].T
        conv = model.conv.weight + rec[PREFIX + "conv"].reshape(model.conv.weight.shape)
        lin = model.q_proj.weight + rec[PREFIX + "q_proj"]
        assert torch.allclose(got[0][row], nn.functional.embedding(ids[row], emb.float()), atol=1e-5)
        assert torch.allclose(got[1][row], nn.functional.conv2d(image[row : row + 1], conv.float(), model.conv.bias, padding=1)[0], atol=1e-5)
        assert torch.allclose(got[2][row], nn.functional.linear(x[row], lin.float(), model.q_proj.bias), atol=1e-5)
    assert torch.allclose(single, got[2][:1], atol=1e-5)
    keep = {n: {m: pair[0].clone() for m, pair in zoo.residuals(n).items()} for n in held}
    zoo.remove(next(n for n in zoo.names if n not in held) if len(held) < len(zoo.names) else held[-1])
    for n in zoo.names:
        if n in keep:
            assert {m: t for m, (t, _) in zoo.residuals(n).items()}.keys() == keep[n].keys()
            for m, t in zoo.residuals(n).items():
                assert torch.equal(t[0], keep[n][m])


def test_bad_limits_are_refused(tmp_path):
    paths, _ = adapters(tmp_path, 3)
    for bad in ("0", "-1", "nan"):
        result = runner.invoke(app, ["merge", *paths, "--zoo", str(tmp_path / "z"), "-k", "2", "--max-error", bad])
        assert result.exit_code == 2 and "--max-error" in result.output
        assert not (tmp_path / "z").exists()
    result = runner.invoke(app, ["merge", *paths, "--zoo", str(tmp_path / "z"), "-k", "2", "--max-error", "0.1", "--shard", "1/2"])
    assert result.exit_code == 2 and "cannot be sharded" in result.output


def test_an_old_bound_already_above_the_limit_is_refused_and_nothing_is_written(tmp_path):
    paths, _ = adapters(tmp_path, 5)
    zoo = sharecompress.merge(paths[:4], tmp_path / "zoo", k=1)
    worst = max(a["relative_error"] for a in zoo.report()["adapters"])
    manifest = (tmp_path / "zoo" / "manifest.json").read_bytes()
    result = runner.invoke(app, ["add", paths[4], "--zoo", str(tmp_path / "zoo"), "--max-error", f"{worst / 2}"])
    assert result.exit_code == 2
    assert "already above --max-error" in result.output
    assert (tmp_path / "zoo" / "manifest.json").read_bytes() == manifest


def test_fit_residuals_measures_after_rounding():
    gen = torch.Generator().manual_seed(1)
    parts = {f"m{i}": (torch.randn(20, 5, generator=gen, dtype=torch.float64), torch.randn(5, 18, generator=gen, dtype=torch.float64), 0.0)
             for i in range(2)}
    total = sum(factored_norm2(L, R) for L, R, _ in parts.values())
    fitted = fit_residuals(parts, 0.01 * total, torch.float16)
    for m, (RU, RV, tail2) in fitted.items():
        L, R, _ = parts[m]
        assert tail2 == pytest.approx(float(((L @ R - RU.double() @ RV.double().T) ** 2).sum()), rel=1e-6, abs=1e-9)
    assert sum(t for _, _, t in fitted.values()) <= 0.01 * total


# -- regressions found by review -------------------------------------------------------------

def _zoo_of(tmp_path, count, modules, seed, drop=None, noise=0.6, rank=4):
    """``count`` adapters of ``modules`` on a planted basis (``drop``: {i: modules it lacks}); returns paths and truth."""
    from factories import planted_basis, random_factors, write_peft_adapter

    basis = planted_basis(modules, 5, seed=seed)
    paths, truth = [], {}
    for i in range(count):
        mods = {m: s for m, s in modules.items() if m not in (drop or {}).get(i, [])}
        r = rank + i % 3
        factors = random_factors(mods, r, seed=seed * 1000 + i, basis={m: basis[m] for m in mods}, noise=noise)
        name = f"a{i}"
        paths.append(str(write_peft_adapter(tmp_path / "src" / name, factors, alpha=8.0)))
        truth[name] = ({m: (b.float().double(), a.float().double()) for m, (b, a) in factors.items()}, 8.0 / r)
    return paths, truth


@pytest.mark.parametrize("seed", range(3))
def test_remove_holds_the_zoos_max_error(tmp_path, seed):
    modules = {"l0.q_proj": (24, 20), "l1.q_proj": (16, 28)}
    paths, truth = _zoo_of(tmp_path, 6, modules, seed)
    zoo = sharecompress.merge(paths, tmp_path / "zoo", energy=0.8, max_error=0.25)
    zoo.remove("a2")
    for a in zoo.report()["adapters"]:
        assert dense_error(zoo, a["name"], truth) <= 0.25 * (1 + 1e-9)
        assert a["relative_error"] <= 0.25 * (1 + 1e-9)
    assert zoo.verify()[0] == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("seed", range(3))
def test_half_precision_zoos_hold_max_error_through_adds(tmp_path, dtype, seed):
    """A first fit aims a little under X in half precision, so later adds can fold their moves in."""
    modules = {"l0.q_proj": (24, 20), "l1.q_proj": (16, 28)}
    paths, truth = _zoo_of(tmp_path, 7, modules, seed)
    zoo = sharecompress.merge(paths[:4], tmp_path / "zoo", k=3, dtype=dtype, max_error=0.3)
    for path in paths[4:]:
        zoo.add([path])
    for a in zoo.report()["adapters"]:
        assert dense_error(zoo, a["name"], truth) <= a["relative_error"] * (1 + 1e-6) + 1e-9 <= 0.3 * (1 + 1e-6) + 1e-9


def test_remove_on_a_fresh_energy_zoo_reads_its_anchor_at_its_own_size(tmp_path):
    """remove shrinks k while the anchor is still the current basis file: the read is capped by the
    anchor's recorded size, not by the k being written."""
    result = runner.invoke(app, ["merge", *[str(p) for p in SAMPLES.iterdir() if p.is_dir()], "--zoo", str(tmp_path / "z"), "-q"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["remove", "topic4", "--zoo", str(tmp_path / "z")])
    assert result.exit_code == 0, result.output
    assert sharecompress.Zoo.open(tmp_path / "z").verify()[0] == []


def test_a_budgeted_add_with_uneven_module_sets_publishes_a_readable_zoo(tmp_path):
    modules = {"l0.q_proj": (24, 20), "l0.v_proj": (24, 20), "l1.q_proj": (16, 28), "l2.o_proj": (12, 30)}
    drop = {0: ["l2.o_proj"], 1: ["l2.o_proj"], 2: ["l2.o_proj"], 4: ["l2.o_proj"], 6: ["l0.q_proj"], 7: ["l2.o_proj", "l1.q_proj"]}
    for noise in (0.3, 0.8):
        paths, truth = _zoo_of(tmp_path / str(noise), 8, modules, 825, drop=drop, noise=noise)
        zoo = sharecompress.merge(paths[:3], tmp_path / f"zoo{noise}", budget=5000)
        zoo.add(paths[3:6], anchors=0)
        zoo.add(paths[6:8], anchors=0)
        assert zoo.verify()[0] == []
        report = zoo.report()
        assert report["bytes_basis"] + report["bytes_coefficients"] <= 5000
        for a in report["adapters"]:
            assert dense_error(zoo, a["name"], truth) <= a["relative_error"] * (1 + 1e-6) + 1e-9
