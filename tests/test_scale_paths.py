"""Streaming, sharding and the sketched path change no result (CPU only)."""


import pytest
import torch
from typer.testing import CliRunner

import sharecompress
from sharecompress import Zoo
from sharecompress.cli import app

from factories import planted_basis, random_factors, write_peft_adapter

MODULES = {f"layers.{i}.{p}": (20, 18) for i in range(3) for p in ("q_proj", "v_proj")}
runner = CliRunner()


def sources(tmp_path, count=5):
    basis = planted_basis(MODULES, 4, seed=0)
    out = []
    for i in range(count):
        extras = {"base_model.model.score.weight": torch.randn(2, 20)} if i == 0 else None
        out.append(str(write_peft_adapter(tmp_path / "src" / f"a{i}", random_factors(MODULES, 3, seed=i, basis=basis, noise=0.2), extras=extras)))
    return out


def tensors_of(zoo: Zoo) -> dict:
    out = {f"basis:{m}": tuple(t.tolist() for t in uv) for m, uv in zoo.bases().items()}
    for name in zoo.names:
        out.update({f"{name}:{m}": tuple(t.tolist() for t in ef) for m, ef in zoo.cores(name).items()})
        out.update({f"{name}:extra:{k}": v.tolist() for k, v in zoo.extras(name).items()})
    return out


@pytest.mark.parametrize("count", [2, 4])
def test_sharded_merge_then_combine_equals_the_plain_merge(tmp_path, count):
    srcs = sources(tmp_path)
    plain = sharecompress.merge(srcs, tmp_path / "plain", k=3)
    parts = []
    for index in range(1, count + 1):
        part = tmp_path / f"part{index}"
        result = runner.invoke(app, ["merge", *srcs, "--zoo", str(part), "-k", "3", "--shard", f"{index}/{count}", "-q"])
        assert result.exit_code == 0, result.output
        parts.append(str(part))
    assert runner.invoke(app, ["export", "a0", "--zoo", parts[0], "--out", str(tmp_path / "x")]).exit_code == 2
    result = runner.invoke(app, ["combine", *parts, "--zoo", str(tmp_path / "joined")])
    assert result.exit_code == 0, result.output
    joined = Zoo.open(tmp_path / "joined")
    assert tensors_of(joined) == tensors_of(plain)
    assert joined.report() == plain.report()
    assert runner.invoke(app, ["verify", "--zoo", str(tmp_path / "joined")]).exit_code == 0


def test_combine_refuses_incomplete_or_mixed_parts(tmp_path):
    srcs = sources(tmp_path)
    for i in (1, 2):
        sharecompress.merge(srcs, tmp_path / f"p{i}", k=3, shard=(i, 3))
    result = runner.invoke(app, ["combine", str(tmp_path / "p1"), str(tmp_path / "p2"), "--zoo", str(tmp_path / "j")])
    assert result.exit_code == 2 and "shards 1..3" in result.stderr
    other = sharecompress.merge(srcs, tmp_path / "other", k=4, shard=(3, 3))
    result = runner.invoke(app, ["combine", str(tmp_path / "p1"), str(tmp_path / "p2"), str(other.path), "--zoo", str(tmp_path / "j")])
    assert result.exit_code == 2 and "another k_rule" in result.stderr
    assert not (tmp_path / "j").exists()


def test_bad_shard_spec(tmp_path):
    result = runner.invoke(app, ["merge", *sources(tmp_path, 2), "--zoo", str(tmp_path / "z"), "--shard", "3/2"])
    assert result.exit_code == 2 and "I/N" in result.stderr


def test_prefetching_reader_sees_every_module_once(tmp_path, monkeypatch):
    """The reader thread loads module i+1 while i computes: each module's factors read once, in order."""
    import importlib

    merge_module = importlib.import_module("sharecompress.merge")
    seen = []
    original = merge_module._load

    def spy(holders, module):
        seen.append(module)
        return original(holders, module)

    monkeypatch.setattr(merge_module, "_load", spy)
    zoo = sharecompress.merge(sources(tmp_path), tmp_path / "z", k=3)
    assert seen == list(zoo.modules)
