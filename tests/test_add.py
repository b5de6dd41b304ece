"""add / export / remove / verify: continual updates without the originals, checked densely."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import sharecompress
from sharecompress import Zoo
from sharecompress.cli import app

from factories import PREFIX, dense_delta, dense_reconstruction, planted_basis, random_factors, scale_of, write_peft_adapter

MODULES = {"layers.0.q_proj": (28, 24), "layers.0.v_proj": (28, 24)}
runner = CliRunner()


def adapters(tmp_path, count, basis=None, noise=0.3, first_seed=0):
    paths, truth = [], {}
    for i in range(first_seed, first_seed + count):
        rank, alpha, rslora = 2 + i % 3, 4.0 * (1 + i % 2), i % 4 == 3
        factors = random_factors(MODULES, rank, seed=500 + i, basis=basis, noise=noise)
        name = f"task{i}"
        paths.append(str(write_peft_adapter(tmp_path / "src" / name, factors, alpha=alpha, rslora=rslora)))
        truth[name] = ({m: (b.float().double(), a.float().double()) for m, (b, a) in factors.items()}, scale_of(alpha, rank, rslora))
    return paths, truth


def reconstructions(zoo: Zoo) -> dict:
    bases = zoo.bases()
    out = {}
    for name in zoo.names:
        cores = zoo.cores(name)
        out[name] = {m: dense_reconstruction(bases[m][0], *cores[m], bases[m][1]) for m in cores}
    return out


def span_distance(P, Q):
    P, Q = torch.linalg.qr(P.double())[0], torch.linalg.qr(Q.double())[0]
    return float(torch.linalg.matrix_norm(P - Q @ (Q.T @ P), ord=2))


def test_incremental_adds_end_close_to_a_full_merge(tmp_path):
    basis = planted_basis(MODULES, 6, seed=3)
    paths, _ = adapters(tmp_path, 10, basis=basis)
    full = sharecompress.merge(paths, tmp_path / "full", k=6).report()["relative_error"]
    zoo = sharecompress.merge(paths[:5], tmp_path / "inc", k=6)
    for path in paths[5:]:
        zoo.add([path])
    assert len(zoo.names) == 10
    incremental = zoo.report(against=paths)["relative_error"]
    assert incremental <= 1.05 * full
    assert full > 0.05  # lossy: the comparison means something


def test_add_equals_a_full_merge_of_the_reconstructions(tmp_path):
    paths, truth = adapters(tmp_path, 6, noise=0.0)
    zoo = sharecompress.merge(paths[:5], tmp_path / "zoo", k=5)
    for name in zoo.names:
        zoo.export(name, tmp_path / "rec" / name)
    remerged = sharecompress.merge([str(tmp_path / "rec" / n) for n in zoo.names] + [paths[5]], tmp_path / "ref", k=5)
    zoo.add([paths[5]])
    got, want = reconstructions(zoo), reconstructions(remerged)
    ref_bases, our_bases = remerged.bases(), zoo.bases()
    for module in ref_bases:
        assert span_distance(our_bases[module][0], ref_bases[module][0]) < 1e-5
        assert span_distance(our_bases[module][1], ref_bases[module][1]) < 1e-5
    for name in zoo.names:
        for module in got[name]:
            diff = float((got[name][module] - want[name][module]).norm() / want[name][module].norm())
            assert diff < 1e-5, (name, module, diff)
    new_err = zoo.report()["adapters"][-1]["relative_error"]
    factors, scale = truth["task5"]
    err2 = norm2 = 0.0
    for module, (b, a) in factors.items():
        delta = dense_delta(b, a, scale)
        err2 += float(((delta - got["task5"][PREFIX + module]) ** 2).sum())
        norm2 += float((delta**2).sum())
    assert new_err == pytest.approx(math.sqrt(err2 / norm2), rel=1e-6)


@pytest.mark.parametrize("p", [None, 2])
def test_drift_is_exact_and_the_bound_holds(tmp_path, p):
    """Old cores move in one batched step (mixed p; with p = 2 most are cut by an SVD)."""
    paths, truth = adapters(tmp_path, 5)
    zoo = sharecompress.merge(paths[:4], tmp_path / "zoo", k=4, p=p)
    before = reconstructions(zoo)
    drift = zoo.add([paths[4]])
    after = reconstructions(zoo)
    report = zoo.report()
    exact = zoo.report(against=paths)
    for entry, measured in zip(report["adapters"][:4], exact["adapters"][:4]):
        name = entry["name"]
        factors, scale = truth[name]
        moved2 = sum(float(((after[name][m] - before[name][m]) ** 2).sum()) for m in before[name])
        norm2 = sum(float((dense_delta(b, a, scale) ** 2).sum()) for b, a in factors.values())
        assert drift[name] == pytest.approx(math.sqrt(moved2 / norm2), rel=1e-5, abs=1e-9)
        assert entry["drift"] == pytest.approx(math.sqrt(moved2 / norm2), rel=1e-5, abs=1e-9)
        assert not entry["exact"] or entry["drift"] == 0.0
        assert measured["exact"]
        assert measured["relative_error"] <= entry["relative_error"] + 1e-9  # the bound is an upper bound
        err2 = sum(float(((dense_delta(b, a, scale) - after[name][PREFIX + m]) ** 2).sum()) for m, (b, a) in factors.items())
        assert measured["relative_error"] == pytest.approx(math.sqrt(err2 / norm2), rel=1e-6)


def test_fixed_k_is_kept_and_energy_zoos_grow(tmp_path):
    basis = planted_basis(MODULES, 3, seed=1)
    paths, _ = adapters(tmp_path, 4, basis=basis, noise=0.0)
    stranger, _ = adapters(tmp_path, 1, first_seed=40)  # energy outside the planted span
    fixed = sharecompress.merge(paths, tmp_path / "fixed", k=3)
    fixed.add(stranger)
    assert all(m["k"] == 3 for m in fixed.modules.values())
    grown = sharecompress.merge(paths, tmp_path / "grown", energy=0.999)
    assert all(m["k"] == 3 for m in grown.modules.values())
    grown.add(stranger)
    assert all(m["k"] > 3 for m in grown.modules.values())
    assert grown.report(against=paths + stranger)["relative_error"] < 0.05
    kept = sharecompress.merge(paths, tmp_path / "kept", energy=0.999)
    kept.add(stranger, grow="off")
    assert all(m["k"] == 3 for m in kept.modules.values())


def test_export_rebuilds_the_stored_update(tmp_path):
    paths, truth = adapters(tmp_path, 3)
    zoo = sharecompress.merge(paths, tmp_path / "zoo", k=3)
    out = zoo.export("task1", tmp_path / "exported")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and not config["use_rslora"]
    assert config["base_model_name_or_path"] == "test/tiny-model"
    back = sharecompress.merge([str(out)], tmp_path / "back", k=64)
    rec = reconstructions(zoo)["task1"]
    factors, scale = truth["task1"]
    report = zoo.report()["adapters"][1]
    err2 = norm2 = 0.0
    for module, (b, a) in factors.items():
        mod = back.adapter("exported")["modules"][PREFIX + module]
        assert mod["scale"] == 1.0
        from safetensors.torch import load_file

        t = load_file(str(out / "adapter_model.safetensors"))
        exported = t[PREFIX + module + ".lora_B.weight"].double() @ t[PREFIX + module + ".lora_A.weight"].double()
        assert torch.allclose(exported, rec[PREFIX + module], atol=1e-6)
        delta = dense_delta(b, a, scale)
        err2 += float(((delta - exported) ** 2).sum())
        norm2 += float((delta**2).sum())
    assert report["relative_error"] == pytest.approx(math.sqrt(err2 / norm2), rel=1e-5)


def test_add_refuses_duplicates_and_mismatches(tmp_path):
    paths, _ = adapters(tmp_path, 3)
    zoo_dir = tmp_path / "zoo"
    sharecompress.merge(paths[:2], zoo_dir, k=3)
    before = (zoo_dir / "manifest.json").read_bytes()

    def refused(*args, needle):
        result = runner.invoke(app, ["add", *map(str, args), "--zoo", str(zoo_dir)])
        assert result.exit_code == 2, result.output
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert (zoo_dir / "manifest.json").read_bytes() == before

    refused(paths[0], needle="already in the zoo")
    copy_dir = tmp_path / "renamed"
    import shutil

    shutil.copytree(paths[1], copy_dir)
    refused(copy_dir, needle="already in the zoo as 'task1'")
    wide = write_peft_adapter(tmp_path / "wide", random_factors({"layers.0.q_proj": (28, 25)}, 2, seed=1))
    refused(wide, needle="has shape 28x25 here but 28x24 in the zoo")
    other = write_peft_adapter(tmp_path / "other", random_factors(MODULES, 2, seed=9), base_model="someone/else")
    refused(other, needle="differs from the zoo's")
    assert runner.invoke(app, ["verify", "--zoo", str(zoo_dir)]).exit_code == 0


@pytest.mark.parametrize("command", [["add", "SRC"], ["export", "task0", "--out", "OUT"], ["remove", "task0"], ["report"], ["list"]])
@pytest.mark.parametrize("damage", ["not-a-zoo", "corrupt", "newer"])
def test_bad_zoos_are_refused(tmp_path, command, damage):
    paths, _ = adapters(tmp_path, 2)
    zoo_dir = tmp_path / "zoo"
    if damage == "not-a-zoo":
        zoo_dir.mkdir()
    else:
        sharecompress.merge(paths[:1], zoo_dir, k=2)
        manifest = zoo_dir / "manifest.json"
        if damage == "corrupt":
            manifest.write_text(manifest.read_text()[:100])
        else:
            data = json.loads(manifest.read_text())
            data["format_version"] = 99
            manifest.write_text(json.dumps(data))
    args = [a.replace("SRC", paths[1]).replace("OUT", str(tmp_path / "out")) for a in command]
    result = runner.invoke(app, [*args, "--zoo", str(zoo_dir)])
    assert result.exit_code == 2, result.output
    needle = {"not-a-zoo": "not a zoo", "corrupt": "corrupt manifest", "newer": "newer than this sharecompress"}[damage]
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_names_are_refused(tmp_path):
    paths, _ = adapters(tmp_path, 2)
    zoo_dir = tmp_path / "zoo"
    sharecompress.merge(paths, zoo_dir, k=2)
    for args in (["export", "nobody", "--out", str(tmp_path / "o")], ["remove", "nobody"]):
        result = runner.invoke(app, [*args, "--zoo", str(zoo_dir)])
        assert result.exit_code == 2 and "no adapter named 'nobody'" in result.stderr
    assert not (tmp_path / "o").exists()


def test_remove_list_and_verify(tmp_path):
    paths, _ = adapters(tmp_path, 3)
    zoo_dir = tmp_path / "zoo"
    zoo = sharecompress.merge(paths, zoo_dir, k=3)
    removed_file = zoo_dir / zoo.adapter("task1")["file"]
    assert runner.invoke(app, ["remove", "task1", "--zoo", str(zoo_dir)]).exit_code == 0
    assert not removed_file.exists()
    listing = json.loads(runner.invoke(app, ["list", "--zoo", str(zoo_dir), "--json"]).stdout)
    assert [r["name"] for r in listing] == ["task0", "task2"]
    assert runner.invoke(app, ["verify", "--zoo", str(zoo_dir)]).exit_code == 0
    target = zoo_dir / Zoo.open(zoo_dir).adapter("task2")["file"]
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", "--zoo", str(zoo_dir)])
    assert result.exit_code == 1 and "checksum" in result.stderr and str(target) in result.stderr


def test_conv_and_embedding_lora_round_trip(tmp_path):
    """Conv2d LoRA (A [r, in, kh, kw], B [out, r, 1, 1]) and embedding LoRA, flattened and restored."""
    from safetensors.torch import load_file, save_file

    srcs = []
    for i in range(2):
        gen = torch.Generator().manual_seed(i)
        tensors = {
            "base_model.model.conv.lora_A.weight": torch.randn(3, 4, 3, 3, generator=gen),
            "base_model.model.conv.lora_B.weight": torch.randn(5, 3, 1, 1, generator=gen),
            "base_model.model.embed.lora_embedding_A": torch.randn(3, 11, generator=gen),
            "base_model.model.embed.lora_embedding_B": torch.randn(6, 3, generator=gen),
        }
        d = tmp_path / f"c{i}"
        d.mkdir()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 6}))
        srcs.append((str(d), tensors))
    zoo = sharecompress.merge([s for s, _ in srcs], tmp_path / "zoo", k=100)
    assert zoo.modules["base_model.model.conv"]["shape"] == [5, 36]
    out = load_file(str(zoo.export("c1", tmp_path / "out") / "adapter_model.safetensors"))
    original = srcs[1][1]
    for a_key, b_key in (("conv.lora_A.weight", "conv.lora_B.weight"), ("embed.lora_embedding_A", "embed.lora_embedding_B")):
        a_key, b_key = "base_model.model." + a_key, "base_model.model." + b_key
        assert out[a_key].shape[1:] == original[a_key].shape[1:] and out[b_key].shape[2:] == original[b_key].shape[2:]
        want = 2.0 * original[b_key].flatten(1).double() @ original[a_key].flatten(1).double()
        got = out[b_key].flatten(1).double() @ out[a_key].flatten(1).double()
        assert torch.allclose(got, want, atol=1e-5)


def test_bounds_after_an_add_are_marked_and_max_error_says_so(tmp_path):
    from typer.testing import CliRunner

    from factories import random_factors, write_peft_adapter
    from sharecompress.cli import app

    modules = {"layers.0.q_proj": (24, 20), "layers.1.v_proj": (24, 20)}
    paths = [str(write_peft_adapter(tmp_path / f"a{i}", random_factors(modules, 4, seed=i))) for i in range(3)]
    runner = CliRunner()
    zoo = str(tmp_path / "zoo")
    assert runner.invoke(app, ["merge", *paths[:2], "--zoo", zoo, "-k", "3", "-q"]).exit_code == 0
    exact = runner.invoke(app, ["report", "--zoo", zoo])
    assert "≤" not in exact.output
    assert runner.invoke(app, ["add", paths[2], "--zoo", zoo, "-q"]).exit_code == 0
    shown = runner.invoke(app, ["report", "--zoo", zoo, "--max-error", "0.01"])
    assert shown.exit_code == 1
    rows = {line.split("│")[1].strip(): line for line in shown.output.splitlines() if line.count("│") > 3}
    assert "≤ " in rows["a0"] and "≤ " in rows["a1"] and "≤" not in rows["a2"]  # a2 came in exact
    assert "report --against the original adapters gives exact errors" in shown.output
    assert "2 of them by an upper bound" in shown.output
    listed = runner.invoke(app, ["list", "--zoo", zoo])
    assert "≤ " in listed.output and "upper bound" in listed.output
    against = runner.invoke(app, ["report", "--zoo", zoo, "--against", *paths])
    assert "≤" not in against.output


def test_remove_shrinks_a_fixed_k_zoo_to_what_stays_without_moving_it(tmp_path):
    paths, _ = adapters(tmp_path, 4)  # ranks 2, 3, 4, 2
    zoo = sharecompress.merge(paths, tmp_path / "zoo", k=8)
    before = reconstructions(zoo)
    size = zoo.report()["bytes_compressed"]
    drift = zoo.remove("task1", "task2")  # what stays: ranks 2 + 2 = 4 < k
    assert all(info["k_u"] <= 4 and info["k_v"] <= 4 for info in zoo.modules.values())
    assert zoo.report()["bytes_compressed"] < size
    after = reconstructions(zoo)
    for name in ("task0", "task3"):
        for module, want in before[name].items():
            assert float((after[name][module] - want).norm() / want.norm()) < 1e-5
    assert all(v < 1e-5 for v in drift.values())
    assert runner.invoke(app, ["verify", "--zoo", str(tmp_path / "zoo")]).exit_code == 0


def test_remove_refits_an_energy_zoo_and_its_drift_is_exact(tmp_path):
    paths, _ = adapters(tmp_path, 5)
    zoo = sharecompress.merge(paths, tmp_path / "zoo", energy=0.9)
    before = reconstructions(zoo)
    ks = {m: (i["k_u"], i["k_v"]) for m, i in zoo.modules.items()}
    drift = zoo.remove("task0", "task1", "task2")
    assert drift and max(drift.values()) > 1e-3  # the refit dropped directions: this test measures something
    assert all(zoo.modules[m]["k_u"] <= ks[m][0] and zoo.modules[m]["k_v"] <= ks[m][1] for m in ks)
    after = reconstructions(zoo)
    for name in ("task3", "task4"):
        moved2 = sum(float((after[name][m] - before[name][m]).pow(2).sum()) for m in before[name])
        norm2 = zoo.adapter(name)["norm2"]
        assert drift.get(name, 0.0) == pytest.approx((moved2 / norm2) ** 0.5, rel=1e-4, abs=1e-6)
        for module, mod in zoo.adapter(name)["modules"].items():
            assert mod["drift"] == pytest.approx(float((after[name][module] - before[name][module]).norm()), rel=1e-4, abs=1e-6)


def test_a_module_nobody_holds_any_more_is_dropped(tmp_path):
    only = str(write_peft_adapter(tmp_path / "only", random_factors({"layers.9.extra": (6, 5)}, 2, seed=1)))
    paths, _ = adapters(tmp_path, 2)
    zoo = sharecompress.merge([*paths, only], tmp_path / "zoo", k=2)
    assert PREFIX + "layers.9.extra" in zoo.modules
    zoo.remove("only")
    assert PREFIX + "layers.9.extra" not in zoo.modules and PREFIX + "layers.9.extra" not in zoo.bases()
