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
    """The reader thread loads batch i+1 while i computes: each module's factors read once."""
    import importlib

    merge_module = importlib.import_module("sharecompress.ops.merge")
    seen = []
    original = merge_module.load_stacked

    def spy(holders, modules, pool=None, scratch=None):
        seen.extend(modules)
        return original(holders, modules, pool, scratch)

    monkeypatch.setattr(merge_module, "load_stacked", spy)
    zoo = sharecompress.merge(sources(tmp_path), tmp_path / "z", k=3)
    assert sorted(seen) == sorted(zoo.modules) and len(seen) == len(set(seen))


@pytest.mark.parametrize("rule", [{"k": 6}, {"energy": 0.9}])
def test_batched_modules_equal_one_by_one(monkeypatch, rule):
    """G same-shape modules sketched in one batched call give each module's own result."""
    from sharecompress.core import linalg
    from sharecompress.core.compress import KRule, compress_batch, compress_module

    from factories import planted_basis as planted, random_factors as factors_of

    monkeypatch.setattr(linalg, "EXACT_LIMIT", 40)  # sketch these small shapes
    mods = {f"m{g}": (120, 100) for g in range(3)}
    basis = planted(mods, 6, seed=1)
    jobs = []
    for g, m in enumerate(mods):
        factors = [factors_of({m: mods[m]}, 8, seed=100 * g + t, basis=basis, noise=0.05)[m] for t in range(10)]
        jobs.append((factors, [0.5 + 0.1 * t for t in range(10)]))
    batched = compress_batch(jobs, KRule(**rule), store=torch.float64)
    other_ranks = ([(b[:, :4], a[:4]) for b, a in jobs[1][0]], jobs[1][1])
    with pytest.raises(ValueError, match="same ranks"):
        compress_batch([jobs[0], other_ranks], KRule(**rule))
    for job, got in zip(jobs, batched):
        alone = compress_module(*job, KRule(**rule), store=torch.float64)
        assert (got.k, got.k_v) == (alone.k, alone.k_v)
        for mine, theirs in ((got.U, alone.U), (got.V, alone.V)):
            assert torch.linalg.matrix_norm(mine - theirs @ (theirs.T @ mine), ord=2) < 1e-6
        for a, b in zip(got.cores, alone.cores):
            assert a.err2 == pytest.approx(b.err2, rel=1e-6, abs=1e-12)
            assert a.norm2 == pytest.approx(b.norm2, rel=1e-12)


def test_batches_group_by_shape_adapters_and_rank_within_budget(tmp_path):
    import importlib

    merge_module = importlib.import_module("sharecompress.ops.merge")
    mods = {"a.q": (20, 18), "a.v": (20, 18), "b.q": (20, 18), "b.o": (18, 20), "c.q": (20, 18)}
    srcs = [write_peft_adapter(tmp_path / f"s{i}", random_factors(mods, 3, seed=i)) for i in range(2)]
    wider = {"c.q": (20, 18)}
    srcs.append(write_peft_adapter(tmp_path / "s2", random_factors(wider, 3, seed=9)))
    from sharecompress.io.readers import find_adapters

    adapters = find_adapters([str(s) for s in srcs])
    shapes = merge_module.module_shapes(adapters)
    per_module = 4 * 2 * 3 * (20 + 18)  # float32 bytes of one module held by two adapters
    batches = merge_module.plan_batches(shapes, adapters, budget=2 * per_module)
    short = sorted(sorted(m.removeprefix("base_model.model.") for m in batch) for batch in batches)
    assert short == [["a.q", "a.v"], ["b.o"], ["b.q"], ["c.q"]]
    assert merge_module.plan_batches(shapes, adapters, budget=1) == [[m] for batch in batches for m in batch]


@pytest.mark.parametrize("count", [2, 3])
def test_shards_split_along_batches_and_still_equal_the_plain_merge(tmp_path, monkeypatch, count):
    import importlib

    merge_module = importlib.import_module("sharecompress.ops.merge")
    monkeypatch.setattr(merge_module, "BATCH_BYTES", 1)  # one module per batch: six to share out
    srcs = sources(tmp_path)
    plain = sharecompress.merge(srcs, tmp_path / "plain", k=3)
    parts = [sharecompress.merge(srcs, tmp_path / f"p{i}", k=3, shard=(i, count)) for i in range(1, count + 1)]
    assert all(len(p.modules) for p in parts) and sum(len(p.modules) for p in parts) == len(plain.modules)
    from sharecompress.ops.combine import combine

    joined = Zoo.open(combine([p.path for p in parts], tmp_path / "joined"))
    assert tensors_of(joined) == tensors_of(plain)
    assert joined.report() == plain.report()


def test_each_shard_says_what_it_holds_and_report_marks_a_partial_zoo(tmp_path):
    from typer.testing import CliRunner

    from sharecompress.cli import app

    src = str(write_peft_adapter(tmp_path / "a", random_factors({"layers.0.q_proj": (8, 6)}, 2, seed=0)))
    runner = CliRunner()
    first = runner.invoke(app, ["merge", src, "--zoo", str(tmp_path / "p1"), "-k", "2", "--shard", "1/2", "-q"])
    assert first.exit_code == 0 and "wrote part 1/2" in first.output and "1 module of the adapters' 1 module" in first.output
    empty = runner.invoke(app, ["merge", src, "--zoo", str(tmp_path / "p2"), "-k", "2", "--shard", "2/2"])
    assert empty.exit_code == 0 and "0 modules" in empty.output and "holds no module" in empty.output
    shown = runner.invoke(app, ["report", "--zoo", str(tmp_path / "p2")])
    assert "a partial zoo: part 2/2" in shown.output
    joined = runner.invoke(app, ["combine", str(tmp_path / "p1"), str(tmp_path / "p2"), "--zoo", str(tmp_path / "zoo")])
    assert joined.exit_code == 0
    assert "partial" not in runner.invoke(app, ["report", "--zoo", str(tmp_path / "zoo")]).output


def test_buffers_reused_across_batches_change_nothing(tmp_path, monkeypatch):
    """One module per batch (the reader's two sets of buffers and the float64 copies reused dozens of
    times, across shapes, ranks that differ between modules and zero padding) gives the zoo that one
    batch per shape gives, sketched modules included."""
    import importlib

    from sharecompress.core import linalg

    merge_module = importlib.import_module("sharecompress.ops.merge")
    monkeypatch.setattr(linalg, "EXACT_LIMIT", 6)  # every module is sketched
    gen = torch.Generator().manual_seed(11)
    shapes = {f"layers.{i}.{p}": ((24, 20) if p == "q_proj" else (16, 30)) for i in range(3) for p in ("q_proj", "v_proj", "o_proj")}
    srcs = []
    for t in range(5):
        factors, pattern = {}, {}
        for j, (m, (n, d)) in enumerate(shapes.items()):
            r = 4 if (t + j) % 3 else 2  # ranks differ between adapters in some modules, not in others
            factors[m] = (torch.randn(n, r, generator=gen), torch.randn(r, d, generator=gen))
            pattern[m] = r
        srcs.append(str(write_peft_adapter(tmp_path / "src" / f"a{t}", factors, dtype=torch.float16,
                                           config={"r": 4, "rank_pattern": pattern})))
    whole = sharecompress.merge(srcs, tmp_path / "whole", k=3)
    monkeypatch.setattr(merge_module, "BATCH_BYTES", 1)  # one module per batch
    single = sharecompress.merge(srcs, tmp_path / "single", k=3)
    assert tensors_of(single) == tensors_of(whole)
    assert single.report()["adapters"] == whole.report()["adapters"]


def test_combine_refuses_parts_that_share_a_module_naming_the_part(tmp_path, monkeypatch):
    """A part whose manifest claims another index (manifests are not signed) holds modules of the
    first: refused by name, rather than joined into a zoo that lacks modules."""
    import importlib
    import json
    import shutil

    from sharecompress.errors import ZooError
    from sharecompress.ops.combine import combine

    merge_module = importlib.import_module("sharecompress.ops.merge")
    monkeypatch.setattr(merge_module, "BATCH_BYTES", 1)
    srcs = sources(tmp_path)
    first = sharecompress.merge(srcs, tmp_path / "p1", k=3, shard=(1, 2))
    shutil.copytree(first.path, tmp_path / "fake")
    manifest = json.loads((tmp_path / "fake" / "manifest.json").read_text())
    manifest["shard"]["index"] = 2
    (tmp_path / "fake" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ZooError, match="which .*p1 holds too: not shards of one merge") as caught:
        combine([first.path, tmp_path / "fake"], tmp_path / "joined")
    assert "fake" in str(caught.value)
    assert not (tmp_path / "joined").exists()


def _workers(monkeypatch, count):
    import importlib

    merge_module = importlib.import_module("sharecompress.ops.merge")
    monkeypatch.setattr(merge_module, "compute_workers", lambda device: count)
    return merge_module


@pytest.mark.parametrize("sketched", [False, True])
def test_two_batches_at_once_write_what_one_at_a_time_writes(tmp_path, monkeypatch, sketched):
    """Two workers, each on half of torch's threads, file every batch's results where one worker
    files them: the same tensors and figures, to the rounding a different thread count may give."""
    from sharecompress.core import linalg

    if sketched:
        monkeypatch.setattr(linalg, "EXACT_LIMIT", 6)
    srcs = sources(tmp_path)
    merge_module = _workers(monkeypatch, 1)
    monkeypatch.setattr(merge_module, "BATCH_BYTES", 1)  # one module per batch: six batches, two at a time
    one = sharecompress.merge(srcs, tmp_path / "one", k=3)
    merge_module = _workers(monkeypatch, 2)
    threads = torch.get_num_threads()
    two = sharecompress.merge(srcs, tmp_path / "two", k=3)
    assert torch.get_num_threads() == threads  # given back
    a, b = tensors_of(one), tensors_of(two)
    assert list(a) == list(b)
    for key in a:
        for x, y in zip(a[key], b[key]) if isinstance(a[key], tuple) else [(a[key], b[key])]:
            torch.testing.assert_close(torch.tensor(y), torch.tensor(x), rtol=1e-5, atol=1e-7, msg=key)
    for x, y in zip(one.report()["adapters"], two.report()["adapters"]):
        assert x["name"] == y["name"] and x["relative_error"] == pytest.approx(y["relative_error"], rel=1e-9)


def test_two_workers_tell_progress_in_order(tmp_path, monkeypatch):
    merge_module = _workers(monkeypatch, 2)
    monkeypatch.setattr(merge_module, "BATCH_BYTES", 1)
    seen = []
    sharecompress.merge(sources(tmp_path), tmp_path / "zoo", k=3, progress=lambda done, total, module: seen.append((done, total, module)))
    assert [done for done, _, _ in seen] == list(range(1, len(MODULES) + 1))
    assert sorted(module[module.index("layers."):] for _, _, module in seen) == sorted(MODULES)  # each once, the prefix aside
    assert {total for _, total, _ in seen} == {len(MODULES)}


def test_a_bad_batch_among_two_workers_names_its_file_and_leaves_nothing(tmp_path, monkeypatch):
    """A NaN in the last module's batch, found by one worker while the other computes: one error
    naming the file, no zoo, no staging directory, and torch's threads given back."""
    from sharecompress.errors import InputError

    merge_module = _workers(monkeypatch, 2)
    monkeypatch.setattr(merge_module, "BATCH_BYTES", 1)
    srcs = sources(tmp_path)
    factors = random_factors(MODULES, 3, seed=9)
    factors[sorted(MODULES)[-1]][1][0, 2] = float("nan")
    bad = write_peft_adapter(tmp_path / "src" / "bad", factors)
    threads = torch.get_num_threads()
    with pytest.raises(InputError, match="NaN or Inf") as caught:
        sharecompress.merge([*srcs, str(bad)], tmp_path / "out" / "zoo", k=3)
    assert str(bad / "adapter_model.safetensors") in str(caught.value)
    assert torch.get_num_threads() == threads
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_process_held_to_one_thread_computes_one_batch_at_a_time():
    """Two workers only where torch has two threads to share (OMP_NUM_THREADS=1 is a user's limit);
    a GPU always one."""
    import importlib

    merge_module = importlib.import_module("sharecompress.ops.merge")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert merge_module.compute_workers(torch.device("cpu")) == 1
        torch.set_num_threads(2)
        assert merge_module.compute_workers(torch.device("cpu")) == 2
        assert merge_module.compute_workers(torch.device("cuda")) == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("ends", ["first in, first out", "last in, first out"])
def test_overlapping_merges_give_torch_its_thread_count_back(ends):
    """Two merges that share out torch's threads at once in one process (the count is the
    process's): whichever ends last restores the count from before the first (review finding:
    the second restored the first's share)."""
    import importlib

    merge_module = importlib.import_module("sharecompress.ops.merge")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        first, second = merge_module.compute_threads(2), merge_module.compute_threads(2)
        first.__enter__()
        assert torch.get_num_threads() == 2
        second.__enter__()
        assert torch.get_num_threads() == 2
        for ending in ((first, second) if ends == "first in, first out" else (second, first)):
            ending.__exit__(None, None, None)
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


def test_a_lone_batch_keeps_every_thread(tmp_path, monkeypatch):
    import importlib

    merge_module = importlib.import_module("sharecompress.ops.merge")
    monkeypatch.setattr(merge_module, "compute_workers", lambda device: 2)
    seen = []
    real = merge_module.compute_threads
    monkeypatch.setattr(merge_module, "compute_threads", lambda workers: (seen.append(workers), real(workers))[1])
    one = {"layers.0.q_proj": (20, 18)}
    srcs = [str(write_peft_adapter(tmp_path / f"a{i}", random_factors(one, 3, seed=i))) for i in range(3)]
    sharecompress.merge(srcs, tmp_path / "zoo", k=2)
    assert seen == [1]
