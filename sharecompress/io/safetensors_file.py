"""A strict, lazy reader for .safetensors files.

The header is parsed and checked here (absurd lengths, bad JSON, offsets past the end,
sizes that disagree with shape and dtype) so that a bad file gets one line naming it,
and tensors are read one at a time with ``os.pread``: memory follows what is asked for,
and no file descriptor stays open between reads (a zoo can hold thousands of files).
Never unpickles anything: safetensors is a plain header plus raw little-endian bytes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from typing import TYPE_CHECKING

from . import jsonio
from .confined import open_regular
from ..errors import InputError, StorageError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in getattr(os, "sysconf_names", {}) else 1024  # buffers per preadv
_IOV_MAX = 1024 if _IOV_MAX <= 0 else min(_IOV_MAX, 1024)  # (-1: no limit)

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype name (torch is imported here, when a tensor is read:
    parsing a header, and the commands that only read manifests, never import it)."""
    import torch

    return getattr(torch, {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}[name])


def stored_bytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor of safetensors dtype ``dtype`` and ``shape`` in a file."""
    return SIZES[dtype] * math.prod(shape)


FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


class HeaderProblem(ValueError):
    """A header this tool refuses; the message says why (the caller names the file)."""


# The adapters of one zoo, and a zoo's cores files, mostly share their header byte for byte (same
# modules, ranks and dtypes): each distinct header is parsed and checked once. A table is a pure
# function of the header's bytes and the file's size, and is copied out, never shared.
HEADER_CACHE_BYTES = 512 << 10  # larger headers (over ~4,000 tensors) are parsed every time, never kept
HEADER_CACHE_SIZE = 16


def parsed_header(raw: bytes, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors, metadata) of a header ``raw`` (the JSON after the 8-byte length) in a file of
    ``size`` bytes, checked as the safetensors library checks it; HeaderProblem otherwise.
    The caller copies the two dicts before keeping them."""
    if len(raw) <= HEADER_CACHE_BYTES:
        return _cached_header(raw, size)
    return _header(raw, size)


@functools.lru_cache(maxsize=HEADER_CACHE_SIZE)
def _cached_header(raw: bytes, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    return _header(raw, size)  # a refusal raises, and is not kept


def _header(raw: bytes, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    if not raw.startswith(b"{"):
        raise HeaderProblem("not a safetensors file: header is not a JSON object")
    try:
        header = jsonio.loads(raw, max_depth=4)
    except jsonio.JSONProblem as exc:
        raise HeaderProblem(f"not a safetensors file: header is {exc}") from None
    if not isinstance(header, dict):
        raise HeaderProblem("not a safetensors file: header is not a JSON object")
    data_start = 8 + len(raw)
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
                raise HeaderProblem("invalid safetensors header: __metadata__ must map str to str")
            metadata = dict(entry)
            continue
        tensors[name] = _entry(name, entry, data_start, data_len)
    _check_layout(tensors, data_start, data_len)
    return tensors, metadata


def _check_layout(tensors: dict[str, TensorInfo], data_start: int, data_len: int) -> None:
    """As the safetensors library: tensors tile the data exactly (no overlap, gap or trailing bytes)."""
    at = 0
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        begin = info.start - data_start
        if begin < at:
            raise HeaderProblem(f"invalid safetensors file: tensor {info.name!r} overlaps another")
        if begin > at:
            raise HeaderProblem(f"invalid safetensors file: {begin - at} unused bytes before tensor {info.name!r}")
        at = info.end - data_start
    if at != data_len:
        raise HeaderProblem(f"invalid safetensors file: {data_len - at} bytes after the last tensor")


def _entry(name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderProblem(f"invalid safetensors header entry for tensor {name!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SIZES:
        raise HeaderProblem(f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise HeaderProblem(f"tensor {name!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise HeaderProblem(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    if offsets[1] - offsets[0] != stored_bytes(dtype, shape):
        raise HeaderProblem(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes stored for shape {shape} {dtype}")
    if offsets[1] > data_len:
        raise HeaderProblem(f"truncated file: tensor {name!r} runs past the end of the file")
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


class SafetensorsFile:
    """Validated header of one .safetensors file; tensors are read on demand.

    A file on disk is re-opened for each read (regular files only: a FIFO or device is
    refused without blocking); ``from_bytes`` wraps contents already read and checked
    against a checksum (zoo files), so what is parsed is exactly what was verified.
    """

    def __init__(self, path: str | os.PathLike, data: bytes | None = None) -> None:
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._data = memoryview(data) if data is not None else None
        self.identity: tuple | None = None  # the file as its header was read (``check_unchanged``)
        self._parse()

    @classmethod
    def from_bytes(cls, path: str | os.PathLike, data: bytes) -> "SafetensorsFile":
        return cls(path, data)

    def _fail(self, problem: str) -> InputError:
        return InputError(self.path, problem)

    def _head(self) -> tuple[int, bytes, int]:
        """(file size, header bytes, header length) from memory or from the file."""
        if self._data is not None:
            size, head = len(self._data), bytes(self._data[:8])
        else:
            try:
                fd = open_regular(self.path)
            except StorageError as exc:
                raise self._fail(exc.problem) from None
            try:
                info = os.fstat(fd)
                size, self.identity = info.st_size, _identity(info)
                head = os.pread(fd, 8, 0)
            except OSError as exc:
                os.close(fd)
                raise self._fail(f"cannot read file: {exc.strerror or exc}") from None
        try:
            if len(head) < 8:
                raise self._fail("empty or truncated file: not a safetensors file (no 8-byte header length)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen == 0 or hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise self._fail(f"not a safetensors file: header claims {hlen} bytes, file has {size}")
            if self._data is not None:
                return size, bytes(self._data[8 : 8 + hlen]), hlen
            raw = os.pread(fd, hlen, 8)
            if len(raw) != hlen:
                raise self._fail("truncated file while reading the header")
            return size, raw, hlen
        except OSError as exc:
            raise self._fail(f"cannot read file: {exc.strerror or exc}") from None
        finally:
            if self._data is None:
                os.close(fd)

    def _parse(self) -> None:
        size, raw, hlen = self._head()
        try:
            tensors, metadata = parsed_header(raw, size)
        except HeaderProblem as exc:
            raise self._fail(str(exc)) from None
        self.tensors, self.metadata = dict(tensors), dict(metadata)

    def check_unchanged(self) -> None:
        """Refuse a file that is no longer the one whose header was read (another file in its place,
        or the same one resized or rewritten since): what was read of it, and its digest, may then
        describe two different files. A check of its stat, so a rewrite that keeps its size and
        mtime goes unseen."""
        if self.identity is None:
            return
        try:
            now = _identity(os.stat(self.path))
        except OSError as exc:
            raise self._fail(f"changed while it was being read: {exc.strerror or exc}") from None
        self._same(now)

    def _same(self, now: tuple) -> None:
        if self.identity is not None and now != self.identity:
            raise self._fail("changed while it was being read (its size, time or identity differ from when its "
                             "header was read); try again once nothing is writing it")

    def _open(self) -> int:
        """A descriptor on the file, which must still be the one whose header was read: each read
        opens the path again, and a path pointed elsewhere for a while and back would otherwise mix
        two files (a review did it with a symbolic link)."""
        return self._checked(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))

    def _checked(self, fd: int) -> int:
        """``fd`` when it is on the file whose header was read; else it is closed and refused."""
        try:
            self._same(_identity(os.fstat(fd)))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (its own dtype), in fresh writable memory."""
        info = self.tensors[name]
        import torch

        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        self.read_into(name, out)
        return out

    @contextlib.contextmanager
    def opened(self):
        """One descriptor for many ``read_into`` calls (None when the file is held in memory)."""
        if self._data is not None:
            yield None
            return
        try:
            fd = self._open()
        except OSError as exc:
            raise self._fail(f"cannot open: {exc.strerror or exc}") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def read_into(self, name: str, out: "torch.Tensor", fd: int | None = None) -> None:
        """The tensor's bytes straight into ``out`` (contiguous, its dtype and size): no buffer between.
        ``fd``: a descriptor from ``opened``, else the file is opened for this read."""
        info = self.tensors[name]
        if not out.is_contiguous() or out.numel() * out.element_size() != info.nbytes or out.dtype != torch_dtype(info.dtype):
            raise ValueError(f"read_into({name!r}): the target does not match the stored tensor")
        if info.nbytes:
            self.read_spans([(name, byte_view(out))], fd)

    def read_spans(self, spans: list[tuple[str, memoryview]], fd: int | None = None) -> None:
        """Several tensors' bytes into byte views (each its tensor's size), in one ``preadv`` per run
        of tensors that lie back to back in the file: a merge's batch of one adapter is one read, not
        one per tensor. Each read is a point where a thread waits to take back Python's lock, and
        with a busy main thread that wait, not the copy, is what reading costs (docs/speed.md).
        ``fd``: a descriptor from ``opened``, else the file is opened for these reads."""
        order = []
        for name, view in spans:
            info = self.tensors[name]
            if view.nbytes != info.nbytes:
                raise ValueError(f"read_spans({name!r}): {view.nbytes} bytes given for {info.nbytes}")
            if info.nbytes:
                order.append((info.start, info.end, view, name))
        order.sort(key=lambda item: item[0])
        if self._data is not None:
            for start, end, view, _ in order:
                view[:] = self._data[start:end]
            return
        runs: list[list] = []  # [start, end, views, names]
        for start, end, view, name in order:
            if runs and runs[-1][1] == start and len(runs[-1][2]) < _IOV_MAX:
                runs[-1][1] = end
                runs[-1][2].append(view)
                runs[-1][3].append(name)
            else:
                runs.append([start, end, [view], [name]])
        with contextlib.ExitStack() as stack:
            if fd is None:
                fd = stack.enter_context(self.opened())
            for start, _, views, names in runs:
                self._preadv_all(fd, views, start, names)

    def _preadv_all(self, fd: int, views: list[memoryview], start: int, names: list[str]) -> None:
        """Fill ``views`` (the tensors ``names``) from ``start`` on, through short reads; a file that
        ends early is refused, naming the tensor it ended in."""
        views, i = list(views), 0
        try:
            while i < len(views):
                got = os.preadv(fd, views[i:] if i else views, start)
                if got <= 0:
                    self.check_unchanged()  # a file being written says so, rather than look corrupt
                    raise self._fail(f"truncated file while reading tensor {names[i]!r}")
                start += got
                while i < len(views) and got >= views[i].nbytes:
                    got -= views[i].nbytes
                    i += 1
                if got:
                    views[i] = views[i][got:]
        except OSError as exc:
            raise self._fail(f"cannot read tensor {names[min(i, len(names) - 1)]!r}: {exc.strerror or exc}") from None

    def sha256(self) -> str:
        """Digest of the whole file: identifies an adapter whatever it is called."""
        if self._data is not None:
            return hashlib.sha256(self._data).hexdigest()
        digest = hashlib.sha256()
        try:
            fd = open_regular(self.path)
        except StorageError as exc:
            raise self._fail(exc.problem) from None
        with os.fdopen(self._checked(fd), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


def byte_view(x: "torch.Tensor") -> memoryview:
    """The bytes of a contiguous tensor on the host, writable in place (any dtype, bfloat16 too)."""
    import torch

    return memoryview(x.view(-1).view(torch.uint8).numpy()).cast("B")


def _identity(info: os.stat_result) -> tuple:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Iterator[memoryview]:
    """A .safetensors file as chunks (header, then each tensor's bytes): no copy of the whole file.

    The layout is the library's (8-byte length, JSON header padded to 8 bytes, tensors tiling
    the data in order), and ``tests/test_safety.py`` reads the result back with the library.
    """
    flat = {name: host_tensor(name, t) for name, t in tensors.items()}
    return encode_layout({name: (dtype_name(name, t.dtype), tuple(t.shape)) for name, t in flat.items()},
                         lambda name: byte_view(flat[name]), metadata)


def encode_layout(layout: dict[str, tuple[str, tuple[int, ...]]], data: Callable[[str], memoryview],
                  metadata: dict[str, str] | None = None) -> Iterator[memoryview]:
    """The chunks of a .safetensors file whose tensors are named, typed and shaped by ``layout``
    (safetensors dtype names) and whose bytes ``data(name)`` gives, asked for one tensor at a time
    in the order they are written (names sorted): a file can be written from disk, never whole in memory."""
    if sys.byteorder != "little":  # safetensors is little-endian; the raw views below are native
        raise RuntimeError("writing safetensors files needs a little-endian machine")
    names = sorted(layout)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    sizes = []
    for name in names:
        dtype, shape = layout[name]
        nbytes = stored_bytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        sizes.append(nbytes)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    yield memoryview(struct.pack("<Q", len(text)) + text)
    for name, nbytes in zip(names, sizes):
        if nbytes:
            view = data(name)
            if view.nbytes != nbytes:
                raise ValueError(f"tensor {name!r}: {view.nbytes} bytes given for {nbytes}")
            yield view


def host_tensor(name: str, t: "torch.Tensor") -> "torch.Tensor":
    """``t`` as a file takes it: on the host, contiguous, outside autograd (a zoo's 64,000 cores mostly are already)."""
    if t.requires_grad or t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().to("cpu").contiguous()
    return t


def dtype_name(name: str, dtype: "torch.dtype") -> str:
    """The safetensors name of a tensor's dtype; refuses one a file cannot hold."""
    if not _DTYPE_NAMES:
        _DTYPE_NAMES.update({torch_dtype(n): n for n in SIZES})
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored")
    return _DTYPE_NAMES[dtype]


_DTYPE_NAMES: dict = {}  # torch dtype -> safetensors name, filled on first use (torch is imported late)
