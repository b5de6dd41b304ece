"""Reading factors in bulk and writing files in gathered chunks: the same bytes as one tensor at a
time, in far fewer system calls (each a point where a reading thread waits for Python's lock)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from factories import random_factors, write_peft_adapter
from sharecompress.errors import InputError
from sharecompress.io import jsonio, safetensors_file
from sharecompress.io.confined import Dir
from sharecompress.io.readers import find_adapters
from sharecompress.io.safetensors_file import SafetensorsFile, byte_view
from sharecompress.ops.merge import load_stacked


def mixed_file(tmp_path):
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.float32),
        "b": torch.randn(7, dtype=torch.float16),
        "c": torch.randn(2, 9, dtype=torch.bfloat16),
        "d": torch.randn(4, 4, dtype=torch.float64),
        "e": torch.randn(6, dtype=torch.float32),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def spans_for(file: SafetensorsFile, names):
    outs = {name: torch.empty(file.tensors[name].shape, dtype=safetensors_file.torch_dtype(file.tensors[name].dtype))
            for name in names}
    return outs, [(name, byte_view(outs[name])) for name in names]


def counting_preadv(monkeypatch, most: int | None = None):
    """os.preadv as the reader calls it, counted; ``most`` caps the bytes each call returns (short reads)."""
    calls = []
    real = os.preadv

    def preadv(fd, buffers, offset):
        calls.append(len(buffers))
        if most is None:
            return real(fd, buffers, offset)
        return real(fd, [memoryview(buffers[0])[:most]], offset)

    monkeypatch.setattr(safetensors_file.os, "preadv", preadv)
    return calls


def test_spans_in_any_order_read_what_the_library_reads_in_one_call_per_run(tmp_path, monkeypatch):
    path, _ = mixed_file(tmp_path)
    file = SafetensorsFile(path)
    names = sorted(file.tensors)
    random.Random(0).shuffle(names)
    calls = counting_preadv(monkeypatch)
    outs, spans = spans_for(file, names)
    file.read_spans(spans)
    with safe_open(str(path), "pt") as fh:
        for name in names:
            assert torch.equal(outs[name], fh.get_tensor(name)), name
    assert calls == [5]  # the five tensors tile the data: one read
    calls.clear()
    stored = sorted(file.tensors, key=lambda name: file.tensors[name].start)  # the library's order, not by name
    apart = stored[::2]  # the second and fourth between them are not asked for
    outs, spans = spans_for(file, apart[::-1])
    file.read_spans(spans)
    assert calls == [1, 1, 1]
    with safe_open(str(path), "pt") as fh:
        assert all(torch.equal(outs[name], fh.get_tensor(name)) for name in apart)


def test_short_reads_are_carried_on_across_buffers(tmp_path, monkeypatch):
    path, _ = mixed_file(tmp_path)
    file = SafetensorsFile(path)
    counting_preadv(monkeypatch, most=7)  # every call returns at most 7 bytes, splitting tensors anywhere
    outs, spans = spans_for(file, sorted(file.tensors))
    file.read_spans(spans)
    with safe_open(str(path), "pt") as fh:
        assert all(torch.equal(outs[name], fh.get_tensor(name)) for name in outs)


def test_a_file_cut_short_after_its_header_was_read_is_refused_by_name(tmp_path):
    """Cut after its header was read, it is a file that changed (said before any byte is read);
    were that unseen, the read that comes up short names the tensor."""
    path, _ = mixed_file(tmp_path)
    file = SafetensorsFile(path)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 10)
    _, spans = spans_for(file, sorted(file.tensors))
    with pytest.raises(InputError, match="changed while it was being read") as err:
        file.read_spans(spans)
    assert str(path) in str(err.value)
    file.identity = None  # as if its stat had not changed
    with pytest.raises(InputError, match="truncated file while reading tensor '") as err:
        file.read_spans(spans)
    assert str(path) in str(err.value)


def test_a_path_pointed_at_another_file_while_it_is_read_is_refused(tmp_path):
    """Every read opens the path again: pointed at another file meanwhile (and back before the end,
    where a check of the path alone would pass), the reads refuse it (a review's finding)."""
    path, _ = mixed_file(tmp_path)
    other = tmp_path / "other.safetensors"
    other.write_bytes(path.read_bytes())
    link = tmp_path / "current.safetensors"
    link.symlink_to(path)
    file = SafetensorsFile(link)
    link.unlink()
    link.symlink_to(other)
    _, spans = spans_for(file, sorted(file.tensors))
    with pytest.raises(InputError, match="changed while it was being read"):
        file.read_spans(spans)
    with pytest.raises(InputError, match="changed while it was being read"):
        file.sha256()
    link.unlink()
    link.symlink_to(path)
    file.read_spans(spans)  # back to the file whose header was read
    file.check_unchanged()


def test_a_view_of_the_wrong_size_is_refused(tmp_path):
    path, _ = mixed_file(tmp_path)
    file = SafetensorsFile(path)
    with pytest.raises(ValueError, match="bytes given"):
        file.read_spans([("a", byte_view(torch.empty(3, 4)))])


def test_a_file_held_in_memory_reads_the_same(tmp_path):
    path, _ = mixed_file(tmp_path)
    on_disk, in_memory = SafetensorsFile(path), SafetensorsFile.from_bytes(path, path.read_bytes())
    outs_disk, spans_disk = spans_for(on_disk, sorted(on_disk.tensors))
    outs_mem, spans_mem = spans_for(in_memory, sorted(on_disk.tensors))
    on_disk.read_spans(spans_disk)
    in_memory.read_spans(spans_mem)
    assert all(torch.equal(outs_disk[n], outs_mem[n]) for n in outs_disk)


def test_a_batch_is_one_read_per_adapter(tmp_path, monkeypatch):
    """Modules whose factors lie back to back in each file (PEFT writes keys sorted) are read with
    one preadv per adapter and batch, into stacks equal to the factors."""
    modules = {f"layers.{i}.q": (12, 10) for i in range(4)}
    paths = [write_peft_adapter(tmp_path / f"a{t}", random_factors(modules, 3, seed=t), dtype=torch.float16)
             for t in range(3)]
    adapters = find_adapters([str(p) for p in paths])
    names = sorted(adapters[0].modules)
    calls = counting_preadv(monkeypatch)
    B, A, ranks = load_stacked(adapters, names)
    assert len(calls) == 3 and ranks == [3, 3, 3]
    for t, adapter in enumerate(adapters):
        for g, module in enumerate(names):
            b, a = adapter.factors(module, torch.float16)
            assert torch.equal(B[g, t], b) and torch.equal(A[g, t], a)


def test_gathered_small_chunks_write_the_same_bytes_and_digest(tmp_path, monkeypatch):
    rng = random.Random(1)
    chunks = [os.urandom(rng.choice([0, 1, 100, 5000, 70_000, 1 << 20, (1 << 20) + 3])) for _ in range(60)]
    writes = []
    real = os.write
    monkeypatch.setattr("sharecompress.io.confined.os.write", lambda fd, data: writes.append(len(data)) or real(fd, data))
    with Dir.open(tmp_path) as root:
        digest = root.write_new("out.bin", [memoryview(c) for c in chunks])
    whole = b"".join(chunks)
    assert (tmp_path / "out.bin").read_bytes() == whole
    assert digest == hashlib.sha256(whole).hexdigest()
    small = [len(c) < 64 << 10 for c in chunks]
    runs = sum(1 for i, x in enumerate(small) if x and (i == 0 or not small[i - 1]))  # runs of small chunks
    assert len(writes) <= small.count(False) + runs + sum(map(len, chunks)) // (1 << 20)
    assert len(writes) < len([c for c in chunks if c])  # one write per chunk was the old way


@pytest.mark.parametrize("text, value", [
    ("999999999999999999", 999999999999999999),  # 18 digits: the fast path
    ("-99999999999999999", -99999999999999999),
    ("9223372036854775807", 2**63 - 1),
    ("-9223372036854775808", -(2**63)),
])
def test_integers_within_64_bits_parse(text, value):
    assert jsonio.loads(f"[{text}]") == [value]


@pytest.mark.parametrize("text", ["9223372036854775808", "-9223372036854775809", "1" + "0" * 30])
def test_integers_beyond_64_bits_are_refused(text):
    with pytest.raises(jsonio.JSONProblem, match="beyond 64 bits"):
        jsonio.loads(f"[{text}]")


def test_only_keys_of_ordinary_length_are_remembered():
    """The header parser remembers the keys it has parsed (every adapter of a zoo repeats them),
    but not a hostile file's huge ones (a review kept 240 MB alive through four refused files)."""
    from sharecompress.io import formats, readers

    caches = (formats.parse_key.cache, formats.layouts_of.cache, readers._not_low_rank.cache)
    before = [cache.cache_info().currsize for cache in caches]
    huge = "x" * 100_000 + ".lora_A.weight"
    assert formats.parse_key(huge, "peft").module == "x" * 100_000 and formats.layouts_of(huge)
    readers._refuse_not_low_rank(SafetensorsFile.from_bytes("huge.safetensors", _file_bytes({huge: (2, 4)})))
    with pytest.raises(InputError, match="LoHa"):
        readers._refuse_not_low_rank(SafetensorsFile.from_bytes("loha.safetensors", _file_bytes({"hada_" + huge: (2, 4)})))
    assert [cache.cache_info().currsize for cache in caches] == before
    assert formats.parse_key("m.lora_B.weight", "peft") == formats.parse_key("m.lora_B.weight", "peft")


def test_buffers_asked_to_be_page_locked_fall_back_to_pageable_memory():
    """A GPU merge asks for page-locked read buffers; where they are refused (no accelerator here,
    or the system's limit), or too large to lock, ordinary memory does the same job."""
    from sharecompress.core import scratch as scratch_module

    buffers = scratch_module.Scratch(pinned=True)
    small = buffers.take("small", (3, 4), torch.float16, torch.device("cpu"))
    small.fill_(1)
    assert float(small.sum()) == 12.0
    assert small.is_pinned() == torch.cuda.is_available()
    large = buffers.take("large", (scratch_module.PIN_LIMIT // 2 + 1,), torch.float16, torch.device("cpu"))
    assert not large.is_pinned()


def test_one_header_shared_by_many_files_is_parsed_once_and_never_shared(tmp_path, monkeypatch):
    """Files whose headers are the same bytes (a zoo's adapters, its cores files) are parsed and
    checked once; each file still gets its own tables, and its own identity."""
    safetensors_file._cached_header.cache_clear()
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(2, 2)}
    paths = [tmp_path / f"f{i}.safetensors" for i in range(3)]
    for path in paths:
        save_file({name: t * (1 + paths.index(path)) for name, t in tensors.items()}, str(path))
    parses = []
    real = jsonio.loads
    monkeypatch.setattr(jsonio, "loads", lambda *a, **k: parses.append(1) or real(*a, **k))
    files = [SafetensorsFile(path) for path in paths]
    assert len(parses) == 1
    assert files[0].tensors == files[1].tensors and files[0].tensors is not files[1].tensors
    files[0].tensors.pop("a")
    assert "a" in files[1].tensors and "a" in SafetensorsFile(paths[2]).tensors
    assert len({f.identity for f in files}) == 3
    for i, f in enumerate(files[1:], start=1):
        assert torch.equal(f.read("b"), tensors["b"] * (1 + i))


def test_a_known_header_on_a_file_of_another_size_is_checked_again(tmp_path):
    """The table depends on the file's size too: a file cut short behind a header seen before is refused."""
    safetensors_file._cached_header.cache_clear()
    good, cut = tmp_path / "good.safetensors", tmp_path / "cut.safetensors"
    save_file({"a": torch.randn(8, 8)}, str(good))
    SafetensorsFile(good)
    cut.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(InputError, match="runs past the end") as refused:
        SafetensorsFile(cut)
    assert str(cut) in str(refused.value)
    SafetensorsFile(good)  # the good one still parses


def _file_bytes(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """A float32 safetensors file of zeros, as bytes: one entry per name, back to back."""
    header, at = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + bytes(at)


def test_a_large_header_is_parsed_but_not_kept():
    """Headers above HEADER_CACHE_BYTES (a hostile file's, say) are parsed each time and never kept alive."""
    safetensors_file._cached_header.cache_clear()
    wide = _file_bytes({f"t{i:06d}" + "x" * 100: (1,) for i in range(6000)})
    assert len(wide) > safetensors_file.HEADER_CACHE_BYTES
    assert len(SafetensorsFile.from_bytes("wide.safetensors", wide).tensors) == 6000
    assert safetensors_file._cached_header.cache_info().currsize == 0
    SafetensorsFile.from_bytes("small.safetensors", _file_bytes({"a": (2, 2)}))
    assert safetensors_file._cached_header.cache_info().currsize == 1


def test_a_refused_header_is_refused_every_time(tmp_path):
    safetensors_file._cached_header.cache_clear()
    text = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    for i in range(2):
        path = tmp_path / f"dup{i}.safetensors"
        path.write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 8)
        with pytest.raises(InputError, match="twice"):
            SafetensorsFile(path)
