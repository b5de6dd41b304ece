"""report's diagnostics: adapters that share their lora_A initialisation are named as such."""

import json

import pytest
import torch
from typer.testing import CliRunner

import sharecompress
from sharecompress.cli import app
from sharecompress.core.diagnostics import nearest_twin

from factories import write_peft_adapter

MODULES = {"layers.0.q_proj": (24, 300), "layers.1.v_proj": (24, 300)}


def adapters(tmp_path, shared: bool, count: int = 4):
    gen = torch.Generator().manual_seed(0)
    start = {m: torch.randn(4, d, generator=gen) for m, (n, d) in MODULES.items()}
    paths = []
    for i in range(count):
        factors = {}
        for m, (n, d) in MODULES.items():
            A = (start[m] if shared else torch.randn(4, d, generator=gen)) + 0.1 * torch.randn(4, d, generator=gen)
            factors[m] = (torch.randn(n, 4, generator=gen), A)  # training moved lora_A a little, lora_B a lot
        paths.append(str(write_peft_adapter(tmp_path / ("s" if shared else "i") / f"a{i}", factors)))
    return paths


def test_nearest_twin_is_the_largest_cosine_with_another_adapter_of_the_same_shape():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = nearest_twin([a, a * 3, -a, torch.ones(1, 2)])
    assert got[0] == got[1] == 1.0 and abs(got[2] + 1.0) < 1e-6 and got[3] is None


def test_nearest_twin_sketch_of_a_stack_equals_that_of_its_list():
    """Above 256 coordinates the cosines go through the count sketch: one (T, r, d) tensor gives what
    the list of its slices gives, a near copy is found, and independent draws stay far below it."""
    gen = torch.Generator().manual_seed(4)
    As = torch.randn(6, 4, 300, generator=gen)
    As[3] = As[1] + 0.01 * torch.randn(4, 300, generator=gen)
    from_tensor, from_list = nearest_twin(As), nearest_twin(list(As))
    assert from_tensor == pytest.approx(from_list, abs=1e-6)
    assert from_tensor[1] > 0.99 and from_tensor[3] > 0.99
    assert max(from_tensor[t] for t in (0, 2, 4, 5)) < 0.4


def test_a_shared_initialisation_is_reported_and_independent_ones_are_not(tmp_path):
    runner = CliRunner()
    for shared in (True, False):
        zoo = sharecompress.merge(adapters(tmp_path, shared), tmp_path / f"zoo{shared}", k=4)
        similarity = [a["init_similarity"] for a in zoo.report()["adapters"]]
        out = runner.invoke(app, ["report", "--zoo", str(tmp_path / f"zoo{shared}")]).output
        if shared:
            assert min(similarity) > 0.95 and "share an initialisation" in out
        else:
            assert max(similarity) < 0.3 and "share an initialisation" not in out


def test_a_manifest_with_an_impossible_cosine_is_refused(tmp_path):
    zoo = sharecompress.merge(adapters(tmp_path, True, 2), tmp_path / "zoo", k=2)
    manifest = json.loads((zoo.path / "manifest.json").read_text())
    next(iter(manifest["adapters"][0]["modules"].values()))["init_cosine"] = 2.0
    (zoo.path / "manifest.json").write_text(json.dumps(manifest))
    out = CliRunner().invoke(app, ["report", "--zoo", str(zoo.path)])
    assert out.exit_code == 2 and "init_cosine" in out.output


def test_held_out_errors_equal_a_dense_leave_one_out(tmp_path):
    from factories import dense_delta, random_factors

    from sharecompress.core.diagnostics import held_out_errors

    shapes = {"m": (12, 10)}
    factors = [random_factors(shapes, r, seed=s)["m"] for s, r in enumerate((2, 3, 2, 4))]
    scales = [1.5, 0.5, 2.0, 1.0]
    ku, kv = 3, 4
    got = held_out_errors(factors, scales, ku, kv)
    deltas = [dense_delta(b, a, s) for (b, a), s in zip(factors, scales)]
    for t, delta in enumerate(deltas):
        others = [d for i, d in enumerate(deltas) if i != t]
        U = torch.linalg.svd(torch.cat(others, dim=1))[0][:, :ku]
        V = torch.linalg.svd(torch.cat([d.T for d in others], dim=1))[0][:, :kv]
        want = float((delta - U @ U.T @ delta @ V @ V.T).pow(2).sum())
        assert abs(got[t] - want) <= 1e-9 * float(delta.pow(2).sum()), t


def test_the_report_shows_the_held_out_error_next_to_the_zoos(tmp_path):
    zoo = sharecompress.merge(adapters(tmp_path, False), tmp_path / "zoo", k=4)
    report = zoo.report()
    assert all(a["held_out_error"] >= a["relative_error"] - 1e-9 for a in report["adapters"])
    out = CliRunner().invoke(app, ["report", "--zoo", str(tmp_path / "zoo")]).output
    assert "held out (at merge, 4 adapters): median error" in out


def test_held_out_bases_never_borrow_the_adapters_own_directions():
    """k above the others' rank: the bases hold what the others have, nothing of the held-out adapter."""
    from factories import dense_delta, random_factors

    from sharecompress.core.diagnostics import held_out_errors

    factors = [random_factors({"m": (12, 12)}, 2, seed=s)["m"] for s in range(3)]
    got = held_out_errors(factors, [1.0, 1.0, 1.0], 6, 6)
    for t, (b, a) in enumerate(factors):
        delta = dense_delta(b, a, 1.0)
        others = [dense_delta(*factors[i], 1.0) for i in range(3) if i != t]
        U = torch.linalg.svd(torch.cat(others, dim=1))[0][:, :4]  # the others' whole column space (rank 4)
        V = torch.linalg.svd(torch.cat([d.T for d in others], dim=1))[0][:, :4]
        want = float((delta - U @ U.T @ delta @ V @ V.T).pow(2).sum())
        assert got[t] > 0.5 * float(delta.pow(2).sum())
        assert abs(got[t] - want) <= 1e-8 * float(delta.pow(2).sum()), t
