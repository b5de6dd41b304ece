"""The spill a merge holds its results in: files written from it are the files ``encode`` writes,
it has no name in the zoo, and a failure while holding leaves nothing behind."""

import errno
import os

import pytest
import torch
from safetensors.torch import load

import sharecompress
from sharecompress.io.confined import Dir
from sharecompress.io.safetensors_file import encode
from sharecompress.store import spill as spill_module
from sharecompress.store.spill import BASIS, Spill

from factories import random_factors, write_peft_adapter


def mixed_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(6, 8, generator=gen)
    return {
        "m.E": torch.randn(4, 3, generator=gen),
        "m.F": wide.T,  # not contiguous
        "h.bf16": torch.randn(5, 2, generator=gen).to(torch.bfloat16),
        "h.half": torch.randn(7, generator=gen).to(torch.float16),
        "h.double": torch.randn(2, 2, generator=gen, dtype=torch.float64),
        "h.ids": torch.arange(5),
        "h.scalar": torch.tensor(2.5),  # 0-dim
        "h.empty": torch.empty(0, 4),
        "h.grad": torch.randn(3, generator=gen).requires_grad_(),
    }


def file_bytes(chunks) -> bytes:
    return b"".join(bytes(memoryview(chunk).cast("B")) for chunk in chunks)


@pytest.mark.parametrize("whole", [True, False], ids=["run at a time", "tensor at a time"])
def test_a_spilled_owner_writes_the_file_encode_writes(tmp_path, monkeypatch, whole):
    if not whole:
        monkeypatch.setattr(spill_module, "READ_WHOLE", 0)
    first, second = mixed_tensors(1), mixed_tensors(2)
    second = {name.replace("m.", "n."): t for name, t in second.items() if name.startswith("m.")}
    meta = {"format": "pt", "sharecompress": "test"}
    with Dir.open(tmp_path) as where, Spill(where) as spill:
        spill.put({BASIS: {"b.U": torch.ones(3, 2)}, "a": first})
        spill.put({"a": second, "other": {"x": torch.zeros(2)}})  # a second batch of the same owner
        back = spill.tensors("a")
        got = file_bytes(spill.pop_encoded("a", meta))
        basis = file_bytes(spill.pop_encoded(BASIS, meta))
        nothing = file_bytes(spill.pop_encoded("never", meta))
    assert got == file_bytes(encode({**first, **second}, meta))
    assert basis == file_bytes(encode({"b.U": torch.ones(3, 2)}, meta))
    assert nothing == file_bytes(encode({}, meta))
    loaded = load(got)
    for name, t in {**first, **second}.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t.detach()) and torch.equal(loaded[name], t.detach())


def test_a_name_is_spilled_once_per_owner(tmp_path):
    with Dir.open(tmp_path) as where, Spill(where) as spill:
        spill.put({"a": {"m.E": torch.ones(2)}, "b": {"m.E": torch.ones(2)}})  # the same name, another owner
        spill.put({"a": {"m.E": torch.zeros(2)}})
        with pytest.raises(ValueError, match="'m.E' of a was already computed"):
            spill.settle()  # (a put is filed in the spill's thread: its error comes with the next call)


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named, then unlinked"])
def test_the_spill_has_no_name_in_its_directory(tmp_path, monkeypatch, tmpfile):
    if not tmpfile:  # a file system without O_TMPFILE
        real_open = os.open

        def no_tmpfile(path, flags, *args, **kwargs):
            if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", no_tmpfile)
    removed, real_unlink = [], os.unlink
    monkeypatch.setattr(os, "unlink", lambda name, **kw: (removed.append(name), real_unlink(name, **kw)))
    with Dir.open(tmp_path) as where, Spill(where) as spill:
        spill.put({"a": {"m.E": torch.arange(6.0)}})
        assert os.listdir(tmp_path) == []
        assert torch.equal(spill.tensors("a")["m.E"], torch.arange(6.0))
    assert os.listdir(tmp_path) == []
    assert [name.startswith(".spill-") for name in removed] == ([] if tmpfile else [True])


def test_no_space_while_holding_the_results_leaves_nothing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sharecompress.cli import app

    srcs = [str(write_peft_adapter(tmp_path / f"s{i}", random_factors({"layers.0.q_proj": (12, 10)}, 2, seed=i)))
            for i in range(2)]

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    result = CliRunner().invoke(app, ["merge", *srcs, "--zoo", str(tmp_path / "zoo"), "-k", "2"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(tmp_path / "zoo") in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["s0", "s1"]  # no zoo, no hidden staging directory


def test_each_batch_goes_to_the_spill_as_it_is_computed(tmp_path, monkeypatch):
    """The merge holds no batch's results past the batch: one ``put`` per batch, before the files."""
    import importlib

    merge_module = importlib.import_module("sharecompress.ops.merge")
    monkeypatch.setattr(merge_module, "BATCH_BYTES", 1)  # one module per batch
    mods = {f"layers.{i}.q_proj": (12, 10) for i in range(4)}
    srcs = [str(write_peft_adapter(tmp_path / f"s{i}", random_factors(mods, 2, seed=i))) for i in range(3)]
    puts, real_put = [], Spill.put

    def put(self, owners):
        puts.append({owner: sorted(tensors) for owner, tensors in owners.items()})
        return real_put(self, owners)

    monkeypatch.setattr(Spill, "put", put)
    zoo = sharecompress.merge(srcs, tmp_path / "zoo", k=2)
    assert len(puts) == 4
    for batch in puts:
        (module,) = {name.rsplit(".", 1)[0] for name in batch[BASIS]}
        assert all(names == [f"{module}.E", f"{module}.F"] for owner, names in batch.items() if owner is not BASIS)
    assert sorted(zoo.cores(zoo.names[0])) == sorted(zoo.modules)


@pytest.mark.parametrize("whole", [True, False], ids=["run at a time", "tensor at a time"])
def test_an_owner_handed_over_gives_its_disk_space_back(tmp_path, monkeypatch, whole):
    """So that a merge needs about the zoo's size on its disk, not twice that (a review's finding:
    a merge that fitted before failed with no space)."""
    if not whole:
        monkeypatch.setattr(spill_module, "READ_WHOLE", 0)
    basis = {f"b{i}.U": torch.randn(64, 1024) for i in range(4)}
    with Dir.open(tmp_path) as where, Spill(where) as spill:
        spill.put({BASIS: basis, "a": {"m.E": torch.randn(64, 1024)}})
        spill.settle()
        before = os.fstat(spill.fd).st_blocks
        chunks = spill.pop_encoded(BASIS, {"format": "pt"})
        next(chunks), next(chunks)  # the header, then the first tensor: read, and its space given back
        if os.fstat(spill.fd).st_blocks == before:
            pytest.skip("this file system does not punch holes")
        assert before - os.fstat(spill.fd).st_blocks >= (256 << 10 if whole else 200 << 10) // 512
        rest = list(chunks)
        assert len(rest) == 3 and os.fstat(spill.fd).st_blocks < before - (900 << 10) // 512  # the basis's 1 MiB went back
        assert spill.tensors("a")["m.E"].shape == (64, 1024)  # the other owner's tensors are still there
        with pytest.raises(ValueError, match="the basis were already handed over"):
            spill.tensors(BASIS)


def test_close_waits_for_the_write_in_flight_even_when_interrupted(tmp_path, monkeypatch):
    """A second Ctrl-C while close waits must not close the descriptor under the write (its number
    could be reused, and the write land in another file), nor leave it open."""
    import threading

    release, real_pwrite, seen = threading.Event(), os.pwrite, []

    def slow_pwrite(fd, data, offset):
        release.wait(10)
        seen.append(os.fstat(fd).st_nlink)  # the descriptor is still open here
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    where = Dir.open(tmp_path)
    spill = Spill(where)
    fd = spill.fd
    spill.put({"a": {"m.E": torch.arange(4.0)}})
    real_shutdown = spill.writer.shutdown

    def interrupted(wait=True, **kw):
        raise KeyboardInterrupt

    spill.writer.shutdown = interrupted
    with pytest.raises(KeyboardInterrupt):
        spill.close()
    release.set()
    real_shutdown(wait=True)
    where.close()
    assert seen == [0]  # the write ran on the open (unnamed) file
    with pytest.raises(OSError):
        os.fstat(fd)  # and the file was closed after it
