"""``merge --budget`` / ``--ratio``: k and p per module chosen for the least error within a size."""

import itertools
import math

import pytest
import torch

import sharecompress
from sharecompress.core.budget import ModuleSpectrum, allocate, module_numbers, parse_size

from factories import planted_basis, random_factors, write_peft_adapter
from test_merge import dense_errors, make_zoo

# A module with rich structure beside two nearly rank-1 ones: uniform k wastes bytes on the latter.
MODULES = {"layers.0.q_proj": (40, 32), "layers.0.v_proj": (40, 32), "layers.1.o_proj": (32, 40)}


@pytest.mark.parametrize("text,value", [("3MB", 3_000_000), ("1.5GB", 1_500_000_000), ("512KiB", 524_288),
                                        ("2000000", 2_000_000), ("64 kb", 64_000), ("1M", 1_000_000)])
def test_sizes_read_as_people_write_them(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["3 apples", "", "-1MB", "0", "1e9", "MB"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)


def heterogeneous(tmp_path):
    """Six rank-6 adapters: q_proj unrelated across adapters; v_proj and o_proj in one shared direction (plus noise)."""
    shared = planted_basis(MODULES, 1, seed=3)
    paths = []
    for i in range(6):
        rich = random_factors({"layers.0.q_proj": MODULES["layers.0.q_proj"]}, 6, seed=10 + i)
        poor = random_factors({m: MODULES[m] for m in ("layers.0.v_proj", "layers.1.o_proj")}, 6, seed=20 + i,
                              basis={m: shared[m] for m in ("layers.0.v_proj", "layers.1.o_proj")}, noise=0.01)
        paths.append(str(write_peft_adapter(tmp_path / "src" / f"a{i}", {**rich, **poor}, alpha=12.0)))
    return paths


def stored_numbers(zoo):
    report = zoo.report()
    return report["bytes_compressed"], report["relative_error"]


def test_a_budget_beats_uniform_k_at_the_same_bytes_and_stays_within_it(tmp_path):
    paths = heterogeneous(tmp_path)
    uniform = sharecompress.merge(paths, tmp_path / "uniform", k=4)
    size, uniform_error = stored_numbers(uniform)
    budgeted = sharecompress.merge(paths, tmp_path / "budget", budget=size)
    used, error = stored_numbers(budgeted)
    assert used <= size and budgeted.manifest["k_rule"] == {"budget": size}
    assert error < 0.8 * uniform_error, (error, uniform_error)
    ks = {m.rsplit(".", 1)[-1]: (info["k_u"], info["k_v"]) for m, info in budgeted.modules.items()}
    assert ks["q_proj"][0] > 4 and ks["v_proj"][0] < 4  # the bytes went where the energy is


def test_the_byte_model_is_exact_and_every_figure_matches_the_dense_reference(tmp_path):
    specs = [(4, 16, False), (2, 8, False), (6, 12, True), (3, 3, True)]
    paths, truth = make_zoo(tmp_path, specs)
    zoo = sharecompress.merge(paths, tmp_path / "zoo", budget="6kB")
    report = zoo.report()
    assert report["bytes_compressed"] <= 6000
    numbers = 0
    for module, info in zoo.modules.items():
        n, d = info["shape"]
        numbers += n * info["k_u"] + d * info["k_v"]
        numbers += sum((info["k_u"] + info["k_v"]) * e["modules"][module]["p"] for e in zoo.adapters if module in e["modules"])
    assert report["bytes_compressed"] == 4 * numbers
    dense = dense_errors(zoo, truth)
    err = sum(e for per in dense.values() for e, _ in per.values())
    norm = sum(n for per in dense.values() for _, n in per.values())
    assert report["relative_error"] == pytest.approx(math.sqrt(err / norm), rel=1e-6)


def test_a_ratio_is_a_budget_of_that_share_of_the_originals(tmp_path):
    paths = heterogeneous(tmp_path)
    zoo = sharecompress.merge(paths, tmp_path / "zoo", ratio=4)
    report = zoo.report()
    assert report["bytes_compressed"] <= report["bytes_original"] / 4
    assert zoo.manifest["k_rule"]["budget"] == int(report["bytes_original"] / 4)


def test_the_greedy_matches_an_exhaustive_search_on_small_spectra():
    gen = torch.Generator().manual_seed(0)
    spectra = {}
    for m, (n, d) in enumerate([(6, 5), (5, 6)]):
        cores = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3, 0.1], dtype=torch.float64)[:, None]
        spectra[f"m{m}"] = ModuleSpectrum(n, d, [2, 2, 2], cores)
    budget = 110
    got = allocate(spectra, budget)
    kept = sum(spectra[m].captured(*got[m]) for m in spectra)
    assert sum(module_numbers(spectra[m], *got[m]) for m in spectra) <= budget
    options = [(m, s) for m, s in spectra.items()]
    best = 0.0
    grids = [list(itertools.product(range(1, 5), range(1, 5), range(1, 3))) for _ in options]
    for choice in itertools.product(*grids):
        if sum(module_numbers(s, *c) for (_, s), c in zip(options, choice)) <= budget:
            best = max(best, sum(s.captured(*c) for (_, s), c in zip(options, choice)))
    assert kept >= 0.97 * best  # greedy on a knapsack: within a few per cent of the optimum here


def test_budget_flags_are_exclusive_and_a_budget_too_small_says_what_it_needs(tmp_path):
    paths = heterogeneous(tmp_path)
    with pytest.raises(ValueError, match="one of -k"):
        sharecompress.merge(paths, tmp_path / "z", k=2, budget="1MB")
    with pytest.raises(ValueError, match="100 bytes, but the smallest zoo"):
        sharecompress.merge(paths, tmp_path / "z", budget="100B")
    with pytest.raises(ValueError, match="sharded"):
        sharecompress.merge(paths, tmp_path / "z", budget="1MB", shard=(1, 2))
    assert not (tmp_path / "z").exists()


def test_add_keeps_a_budgeted_zoo_within_its_budget_unless_grow_auto(tmp_path):
    from typer.testing import CliRunner

    from sharecompress.cli import app
    from test_max_error import stored

    paths = heterogeneous(tmp_path)
    free = sharecompress.merge(paths[:5], tmp_path / "free", budget="5kB")
    ks = {m: (i["k_u"], i["k_v"]) for m, i in free.modules.items()}
    free.add([paths[5]], grow="auto")  # holds every k; the new cores take the zoo past its budget
    assert {m: (i["k_u"], i["k_v"]) for m, i in free.modules.items()} == ks
    report = free.report()
    assert report["bytes_basis"] + report["bytes_coefficients"] > 5000

    zoo = sharecompress.merge(paths[:5], tmp_path / "zoo", budget="5kB")
    before = {n: stored(zoo, n) for n in zoo.names}
    out = CliRunner().invoke(app, ["add", paths[5], "--zoo", str(tmp_path / "zoo")])
    assert out.exit_code == 0, out.output
    assert "size budget 5.0 kB: within it" in out.output and "reallocated" in out.output
    zoo.reload()
    report = zoo.report()
    assert report["bytes_basis"] + report["bytes_coefficients"] <= 5000
    assert {m: (i["k_u"], i["k_v"], i.get("p")) for m, i in zoo.modules.items()} != {m: (*k, None) for m, k in ks.items()}
    for a in report["adapters"][:5]:  # every drift the reallocation caused is exact, and the bound true
        after = stored(zoo, a["name"])
        moved2 = sum(float(((after[m] - before[a["name"]][m]) ** 2).sum()) for m in after)
        norm2 = zoo.adapter(a["name"])["norm2"]
        assert a["drift"] == pytest.approx((moved2 / norm2) ** 0.5, rel=1e-5, abs=1e-9)
    exact = {a["name"]: a["relative_error"] for a in zoo.report(against=paths)["adapters"]}
    assert all(exact[a["name"]] <= a["relative_error"] * (1 + 1e-7) + 1e-9 for a in report["adapters"])
    out = CliRunner().invoke(app, ["report", "--zoo", str(tmp_path / "zoo")])
    assert "size budget 5.0 kB (merge --budget or --ratio; bases and cores): within it" in out.output


def test_a_budgets_core_ranks_hold_through_add_and_commit(tmp_path):
    from factories import TinyNet, tiny_zoo

    _, sources = tiny_zoo(tmp_path / "tiny")
    tiny = sharecompress.merge(sources, tmp_path / "tiny_zoo", budget="1kB")
    rt = tiny.attach(TinyNet())
    with torch.no_grad():
        for p in rt.new_adapter("new", verbose=False):
            p.normal_()
    assert rt.commit("new")["path"] == "in-span"
    tiny.reload()
    assert all(tiny.adapter("new")["modules"][m]["p"] <= info["p"] for m, info in tiny.modules.items())

    paths = heterogeneous(tmp_path)
    zoo = sharecompress.merge(paths[:5], tmp_path / "zoo", budget="9kB")
    chosen = {m: info["p"] for m, info in zoo.modules.items()}
    assert all(q >= 1 for q in chosen.values())
    zoo.add([paths[5]], grow="auto")  # k and p held (the default, off, may reallocate them)
    for module, q in chosen.items():
        assert zoo.modules[module]["p"] == q
        assert zoo.adapter("a5")["modules"][module]["p"] <= q  # the new adapter's cores keep the budget's rank


def test_a_budget_never_buys_directions_no_core_can_use(tmp_path):
    paths = heterogeneous(tmp_path)[:4]
    zoo = sharecompress.merge(paths, tmp_path / "zoo", budget="40kB", p=1)
    for module, info in zoo.modules.items():
        usable = sum(min(1, e["rank"]) for e in zoo.adapters if module in e["modules"])
        assert max(info["k_u"], info["k_v"]) <= usable
    before = {m: (i["k_u"], i["k_v"]) for m, i in zoo.modules.items()}
    zoo.add([heterogeneous(tmp_path / "more")[4]], grow="auto")
    assert {m: (i["k_u"], i["k_v"]) for m, i in zoo.modules.items()} == before


@pytest.mark.parametrize("text", ["1.9", "0.5B"])
def test_a_fraction_of_a_byte_is_refused(text):
    with pytest.raises(ValueError, match="whole number"):
        parse_size(text)


def test_units_are_read_case_blind():
    assert parse_size("2KI") == parse_size("2ki") == 2048


@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_never_passes_the_budget(seed):
    gen = torch.Generator().manual_seed(seed)
    spectra = {f"m{i}": ModuleSpectrum(int(n), int(d), [2, 3, 1], torch.randn(3, 6, 6, generator=gen, dtype=torch.float64))
               for i, (n, d) in enumerate(torch.randint(8, 40, (5, 2), generator=gen).tolist())}
    for budget in (300, 700, 1500):
        if budget < sum(module_numbers(s, 1, 1, 1) for s in spectra.values()):
            continue
        got = allocate(spectra, budget)
        assert sum(module_numbers(spectra[m], *got[m]) for m in spectra) <= budget
