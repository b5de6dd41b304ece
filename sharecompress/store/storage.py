"""Durable writes, a writer lock and atomic publication of whole directories.

Every file is written fresh (``confined.Dir.write_new``: exclusive create, never through a
link, fsync'd, hashed as written) and published by a rename. A new directory is built in a
hidden sibling and swapped into place by one atomic exchange (``renameat2``), so after a kill
at any instant the target holds the old content or the new.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator


if TYPE_CHECKING:
    import torch

from ..io.confined import Dir, iter_chunks, os_problem
from ..errors import StorageError, ZooError
from ..io.safetensors_file import encode
from .interrupts import held_interrupts
from .zoo_files import LOCK

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_name(name: str) -> str:
    """A file-name stem for an adapter name: no separators, no dots (they mark generations), not empty."""
    stem = _UNSAFE.sub("_", name).strip("_-") or "adapter"
    return stem[:120]


def json_bytes(obj: object) -> bytes:
    """Compact JSON (a manifest of 1,000 adapters x 128 modules is ~60 MB this way, twice that indented)."""
    return (json.dumps(obj, separators=(",", ":"), sort_keys=False) + "\n").encode("utf-8")


def save_tensors(where: Dir, name: str, tensors: dict[str, "torch.Tensor"], metadata: dict[str, str] | None = None) -> str:
    """A new .safetensors file ``name`` in ``where``; returns its sha256 (hashed as written)."""
    return where.write_new(name, encode(tensors, metadata))


def write_json(where: Dir, name: str, obj: object) -> str:
    return where.write_new(name, iter_chunks(json_bytes(obj)))


def write_bytes_durably(path: Path, data: bytes) -> str:
    """``data`` as a new file at ``path`` (it must not exist), fsync'd; returns its sha256."""
    with Dir.open(path.parent) as where:
        return where.write_new(path.name, iter_chunks(data))


PAUSE_ENV = "SHARECOMPRESS_PAUSE_AT"


def pause_point(step: str) -> None:
    """Test hook: ``SHARECOMPRESS_PAUSE_AT=step:seconds`` sleeps here so a test can kill us."""
    spec = os.environ.get(PAUSE_ENV, "")
    for item in spec.split(","):
        name, _, seconds = item.partition(":")
        if name == step:
            sys.stderr.write(f"sharecompress: paused at {step}\n")
            sys.stderr.flush()
            time.sleep(float(seconds or 5))


# Called with one line when a writer has waited a second for another's lock (the CLI prints it).
on_wait: Callable[[str], None] | None = None


class WriterLock:
    """One writer at a time per zoo: an exclusive flock on ``<zoo>/.lock``.

    A second writer waits up to ``timeout`` seconds (saying so once it has waited a moment),
    then fails with a clear error. flock is released by the kernel when a holder dies, so a
    killed writer never leaves the zoo locked. The lock is taken on the directory the path
    names *now*: when ``merge --force`` swapped in a new zoo while we waited, we start over on it.
    ``root`` is that directory, open, for the holder's own reads and writes.
    """

    def __init__(self, zoo: Path, timeout: float = 30.0, waiting: Callable[[str], None] | None = None,
                 follow: bool = True) -> None:
        self.zoo = Path(zoo)
        self.follow = follow  # False: a zoo path that is a symbolic link is refused, never locked through
        self.path = self.zoo / LOCK
        self.timeout = timeout
        self.waiting = waiting
        self.root: Dir | None = None
        self._fd: int | None = None

    def __enter__(self) -> "WriterLock":
        deadline = time.monotonic() + self.timeout
        said = False
        while True:
            root = Dir.open(self.zoo, follow=self.follow)
            try:
                fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=root.fd)
            except OSError as exc:
                root.close()
                if exc.errno == errno.ELOOP:
                    raise ZooError(self.path, "is a symbolic link: links are never followed here; remove it") from None
                raise StorageError(self.path, os_problem(exc)) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                root.close()
                raise ZooError(self.path, "is not a regular file: refused as a lock; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                root.close()
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    raise ZooError(self.zoo, f"another sharecompress process is writing this zoo (waited {self.timeout:g}s)") from None
                notify = self.waiting or on_wait
                if not said and notify is not None and time.monotonic() > deadline - self.timeout + 1.0:
                    notify(f"{self.zoo}: waiting for another sharecompress process to finish writing …")
                    said = True
                time.sleep(0.1)
                continue
            if root.same_as(self.zoo):
                self.root, self._fd = root, fd
                return self
            os.close(fd)  # the zoo was replaced while we waited: lock the new one
            root.close()

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self.root is not None:
            self.root.close()
            self.root = None


_STEM_CHARS = 120  # hidden names stay under the usual 255-byte limit whatever the target's length


def hidden_name(target: Path, kind: str) -> str:
    """A hidden sibling name for ``target``: ``.<name>.<kind>-<pid>-<random>``."""
    return f".{target.name[:_STEM_CHARS]}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _hidden_pattern(target: Path, kind: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name[:_STEM_CHARS])}\.{kind}-(\d+)-[0-9a-f]{{8}}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_staging(parent: Dir, target: Path) -> list[str]:
    """Hidden staging directories of ``target`` left by a killed writer (its pid is gone): removed.

    Only real directories named exactly as ``hidden_name`` names them are touched.
    """
    removed = []
    pattern = _hidden_pattern(target, "tmp")
    for name in parent.names():
        match = pattern.fullmatch(name)
        info = parent.lstat(name) if match else None
        if match and info is not None and stat.S_ISDIR(info.st_mode) and not _alive(int(match[1])):
            remove_tree(parent, name)
            removed.append(name)
    return removed


@contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """A hidden sibling path to write; on success one atomic rename puts it at ``target``.

    On any error the sibling is removed and ``target`` is untouched: nothing half-written.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(target.parent, os_problem(exc)) from None
    staging = target.parent / hidden_name(target, "tmp")
    try:
        yield staging
        os.replace(staging, target)
        with Dir.open(target.parent) as parent:
            parent.fsync()
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise StorageError(target, os_problem(exc)) from None
    except StorageError as exc:  # name the target, not the hidden name it was written under
        staging.unlink(missing_ok=True)
        raise StorageError(target, exc.problem) from None
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


# renameat2 flags (linux/fs.h): fail if the target exists / swap two entries atomically.
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _renameat2(parent: Dir, src: str, dst: str, flags: int) -> bool:
    """True when done; False when the system or file system has no such rename (use the fallback)."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    if fn(parent.fd, os.fsencode(src), parent.fd, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(parent.path / dst))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give a byte range of a file back to its file system (the file keeps its size); False where
    the system or file system cannot, or on any error: callers only save space with it."""
    fn = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
    if fn is None or length <= 0:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fn(fd, _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, offset, length) == 0


_FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE = 1, 2


def remove_tree(parent: Dir, name: str) -> None:
    """Remove directory ``name`` in ``parent`` and what it holds, never following a link out of it."""
    if sys.version_info >= (3, 11):
        shutil.rmtree(name, ignore_errors=True, dir_fd=parent.fd)
    else:  # pragma: no cover - Python 3.10: rmtree still opens each level with O_NOFOLLOW
        shutil.rmtree(parent.path / name, ignore_errors=True)


def publish_directory(parent: Dir, staged: str, target: Path, replace: Callable[[Path], None] | None, lock: bool) -> None:
    """Put directory ``staged`` (in ``parent``) at ``target``, atomically.

    When ``target`` exists, ``replace(target)`` must accept it (it raises otherwise): before the
    zoo's writer lock is taken (so that no lock file is made in a directory that is not a zoo, nor
    through a link) and again under it when ``lock``; the two directories are then exchanged in
    one step and the old one removed, once it is known to be the very directory that was checked:
    one moved into the target's place meanwhile is put back, and nothing is replaced. A target
    created meanwhile by someone else is not replaced either.
    """
    leaf = target.name
    if parent.lstat(leaf) is None:
        try:
            if not _renameat2(parent, staged, leaf, _RENAME_NOREPLACE):
                if parent.lstat(leaf) is not None:
                    raise FileExistsError(errno.EEXIST, "exists")
                os.rename(staged, leaf, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise ZooError(target, "was created by someone else while this command ran; nothing was written") from None
            raise StorageError(target, os_problem(exc)) from None
        parent.fsync()
        return
    if replace is None:
        raise ZooError(target, "already exists; pass --force to replace it")
    replace(target)
    with WriterLock(target, follow=False) if lock else nullcontext():
        checked = parent.lstat(leaf)
        replace(target)
        pause_point("before-swap")
        try:
            _exchange(parent, staged, leaf)
        except OSError as exc:
            raise StorageError(target, os_problem(exc)) from None
        gone = parent.lstat(staged)
        if checked is None or gone is None or (gone.st_dev, gone.st_ino) != (checked.st_dev, checked.st_ino):
            _put_back(parent, staged, leaf, target)  # not what was checked: it goes back where it was
            raise ZooError(target, "was replaced by another directory while this command ran; nothing was replaced")
        parent.fsync()
        pause_point("after-swap")
    remove_tree(parent, staged)  # now the old content


class KeepStaging(StorageError):
    """The staging name holds a directory that is not ours: whoever cleans up must leave it."""


def _put_back(parent: Dir, staged: str, leaf: str, target: Path) -> None:
    """Swap a directory that was moved into ``target``'s place back there; should that fail, move it
    out of the staging name (which a cleanup would remove) and say where it is."""
    try:
        _exchange(parent, staged, leaf)
        return
    except OSError as exc:
        problem = os_problem(exc)
    rescued = hidden_name(target, "moved")
    try:
        os.rename(staged, rescued, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
        where = parent.path / rescued
    except OSError:
        where = parent.path / staged
    raise KeepStaging(target, f"was replaced by another directory while this command ran, which could not be put "
                              f"back ({problem}): it is at {where}, the new zoo at {target}; nothing was deleted")


def _exchange(parent: Dir, a: str, b: str) -> None:
    """Swap two names in ``parent``: atomically where the kernel can, else by three renames."""
    if not _renameat2(parent, a, b, _RENAME_EXCHANGE):
        _swap_by_renames(parent, a, b)


def _swap_by_renames(parent: Dir, staged: str, leaf: str) -> None:
    """Without an atomic exchange: old aside, new in place. A kill between the two renames
    leaves ``.<leaf>.old-…`` beside a missing target; ``restore_interrupted_swap`` puts it back."""
    aside = hidden_name(parent.path / leaf, "old")
    os.rename(leaf, aside, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
    os.rename(staged, leaf, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
    os.rename(aside, staged, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)


def restore_interrupted_swap(target: Path) -> bool:
    """Where a swap by renames was killed half way, put the old directory back; True if it did."""
    parent_path = target.parent
    if os.path.lexists(target) or not parent_path.is_dir():
        return False
    pattern = _hidden_pattern(target, "old")
    with Dir.open(parent_path) as parent:
        aside = [n for n in parent.names() if pattern.fullmatch(n)]
        if len(aside) != 1:
            return False
        try:
            os.rename(aside[0], target.name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
        except OSError:
            return False
        parent.fsync()
    return True


@contextmanager
def staged_directory(
    target: Path, replace: Callable[[Path], None] | None = None, lock: bool = False
) -> Iterator[Dir]:
    """Build a new directory in a hidden sibling of ``target``; on success it takes ``target``'s place.

    On any error the sibling is removed and ``target`` is untouched: nothing half-written.
    ``replace`` decides whether an existing ``target`` may be replaced (see ``publish_directory``).
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(target.parent, os_problem(exc)) from None
    with Dir.open(target.parent) as parent:
        remove_stale_staging(parent, target)
        name = hidden_name(target, "tmp")
        try:
            staging = parent.sub(name, create=True)
        except StorageError as exc:
            raise StorageError(target, exc.problem) from None
        try:
            yield staging
            staging.fsync()
            staging.close()
            publish_directory(parent, name, target, replace, lock)
        except StorageError as exc:
            staging.close()
            if not isinstance(exc, KeepStaging):
                with held_interrupts():  # a second Ctrl-C must not leave half of it behind
                    remove_tree(parent, name)
            if exc.path.startswith(str(parent.path / name)):  # name the target, not the hidden staging name
                raise StorageError(target, exc.problem) from None
            raise
        except BaseException:
            staging.close()
            with held_interrupts():
                remove_tree(parent, name)
            raise
