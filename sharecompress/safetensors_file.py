"""A strict, lazy reader for .safetensors files.

The header is parsed and checked here (absurd lengths, bad JSON, offsets past the end,
sizes that disagree with shape and dtype) so that a bad file gets one line naming it,
and tensors are read one at a time with ``os.pread``: memory follows what is asked for,
and no file descriptor stays open between reads (a zoo can hold thousands of files).
Never unpickles anything: safetensors is a plain header plus raw little-endian bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
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


class SafetensorsFile:
    """Validated header of one .safetensors file; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._parse()

    def _fail(self, problem: str) -> InputError:
        return InputError(self.path, problem)

    def _parse(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise self._fail(
                        "empty or truncated file: not a safetensors file (no 8-byte header length)"
                    )
                (hlen,) = struct.unpack("<Q", head)
                if hlen == 0 or hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                    raise self._fail(
                        f"not a safetensors file: header claims {hlen} bytes, file has {size}"
                    )
                raw = fh.read(hlen)
        except OSError as exc:
            raise self._fail(f"cannot read file: {exc.strerror or exc}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._fail("not a safetensors file: header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._fail("not a safetensors file: header is not a JSON object")
        data_start = 8 + hlen
        data_len = size - data_start
        for name, entry in header.items():
            if name == "__metadata__":
                if not isinstance(entry, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
                ):
                    raise self._fail("invalid safetensors header: __metadata__ must map str to str")
                self.metadata = dict(entry)
                continue
            self.tensors[name] = self._check_entry(name, entry, data_start, data_len)

    def _check_entry(self, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail(f"invalid safetensors header entry for tensor {name!r}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise self._fail(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise self._fail(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise self._fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        numel = 1
        for s in shape:
            numel *= s
        if offsets[1] - offsets[0] != numel * DTYPES[dtype][1]:
            raise self._fail(
                f"tensor {name!r}: {offsets[1] - offsets[0]} bytes stored for shape {shape} {dtype}"
            )
        if offsets[1] > data_len:
            raise self._fail(f"truncated file: tensor {name!r} runs past the end of the file")
        return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (its own dtype), in fresh writable memory."""
        info = self.tensors[name]
        torch_dtype = DTYPES[info.dtype][0]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=torch_dtype)
        buf = bytearray(info.nbytes)
        view = memoryview(buf)
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                done = 0
                while done < info.nbytes:
                    got = os.preadv(fd, [view[done:]], info.start + done)
                    if got <= 0:
                        raise self._fail(f"truncated file while reading tensor {name!r}")
                    done += got
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._fail(f"cannot read tensor {name!r}: {exc.strerror or exc}") from None
        return torch.frombuffer(buf, dtype=torch_dtype).reshape(info.shape)

    def sha256(self) -> str:
        """Digest of the whole file: identifies an adapter whatever it is called."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
