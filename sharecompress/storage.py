"""Durable file primitives: fsync'd writes, atomic renames, a writer lock, safe names."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from .errors import ZooError

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_name(name: str) -> str:
    """A file-name stem for an adapter name: no separators, no dots (they mark generations), not empty."""
    stem = _UNSAFE.sub("_", name).strip("_-") or "adapter"
    return stem[:120]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write to ``path`` (a fresh temporary name) and fsync it."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_json_durably(path: Path, obj: object) -> None:
    write_bytes_durably(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8"))


def save_tensors_durably(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class WriterLock:
    """One writer at a time per zoo: an exclusive flock on ``<zoo>/.lock``.

    A second writer waits up to ``timeout`` seconds, then fails with a clear error. flock is
    released by the kernel when a holder dies, so a killed writer never leaves the zoo locked.
    """

    def __init__(self, zoo: Path, timeout: float = 30.0) -> None:
        self.path = zoo / ".lock"
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> "WriterLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    os.close(fd)
                    raise ZooError(self.path.parent, f"another sharecompress process is writing this zoo (waited {self.timeout:g}s)") from None
                time.sleep(0.1)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """A hidden sibling path to write; on success one atomic rename puts it at ``target``.

    On any error the sibling is removed and ``target`` is untouched: nothing half-written.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield staging
        os.replace(staging, target)
        fsync_dir(target.parent)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Build a new directory in a hidden sibling; on success it replaces ``target`` whole.

    On any error the sibling is removed and ``target`` is untouched: nothing half-written.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        fsync_dir(staging)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(staging, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
