"""File access confined to one directory: no link is ever followed, no file is ever reused.

A zoo (and an export target) is a trust boundary. Every file the tool touches inside one is
reached from an open directory descriptor, one component at a time, with ``O_NOFOLLOW``:
a symbolic link planted anywhere (``adapters/``, a weights file, the lock, a temporary name)
is refused, never followed, so nothing outside can be read, written or deleted through it,
and a directory renamed away under us cannot redirect our writes. New files are created
with ``O_EXCL`` (never truncating what is there) and mode 0666 less the umask, like any file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import StorageError, ZooError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_SMALL = 64 << 10  # a chunk below this is gathered with its neighbours into one write


def os_problem(exc: OSError) -> str:
    """The operating system's words for ``exc`` (``No space left on device``, …)."""
    return exc.strerror or str(exc)


class Dir:
    """An open directory; names given to its methods are single components inside it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike, follow: bool = True) -> "Dir":
        """Open ``path`` itself; ``follow=False`` refuses it when it is a symbolic link."""
        path = Path(path)
        try:
            fd = os.open(path, _DIR_FLAGS if not follow else _DIR_FLAGS & ~os.O_NOFOLLOW)
        except OSError as exc:
            raise _refusal(path, exc) from None
        return cls(fd, path)

    def __enter__(self) -> "Dir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:  # a Dir dropped on an error path still gives its descriptor back
        try:
            self.close()
        except OSError:
            pass

    def sub(self, name: str, create: bool = False) -> "Dir":
        """The directory ``name`` inside this one (made when ``create``); a link is refused."""
        if create:
            try:
                os.mkdir(name, 0o777, dir_fd=self.fd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _refusal(self.path / name, exc) from None
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            raise _refusal(self.path / name, exc) from None
        return Dir(fd, self.path / name)

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry itself (a link is not followed), or None when there is none."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _refusal(self.path / name, exc) from None

    def names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.fd))
        except OSError as exc:
            raise _refusal(self.path, exc) from None

    def read(self, name: str, limit: int) -> bytes:
        """All of regular file ``name``, refused when it is a link, not a regular file, or over ``limit`` bytes."""
        where = self.path / name
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            raise _refusal(where, exc) from None
        try:
            return read_fd(fd, where, limit)
        finally:
            os.close(fd)

    def write_new(self, name: str, chunks: Iterable[bytes | memoryview]) -> str:
        """Create ``name`` (it must not exist), write ``chunks``, fsync; returns the sha256 of what was written.

        On any error the partial file is removed: nothing half-written stays behind.
        """
        where = self.path / name
        try:
            fd = os.open(name, _NEW_FLAGS, 0o666, dir_fd=self.fd)
        except OSError as exc:
            raise _refusal(where, exc) from None
        digest = hashlib.sha256()

        def put(view: memoryview) -> None:
            digest.update(view)
            while view:
                view = view[os.write(fd, view):]

        small = bytearray()  # small chunks (a cores file is hundreds of tiny tensors) go out together

        def flush() -> None:
            if small:
                put(memoryview(small))  # released when put returns, so the buffer can be emptied
                small.clear()

        try:
            try:
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    if view.nbytes >= _SMALL:
                        flush()
                        put(view)
                    else:
                        small += view
                        if len(small) >= _CHUNK:
                            flush()
                flush()
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            self.unlink(name, missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageError(where, os_problem(exc)) from None
            raise
        return digest.hexdigest()

    def replace(self, src: str, dst: str) -> None:
        try:
            os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as exc:
            raise StorageError(self.path / dst, os_problem(exc)) from None

    def unlink(self, name: str, missing_ok: bool = False) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise StorageError(self.path / name, "no such file") from None
        except OSError as exc:
            raise StorageError(self.path / name, os_problem(exc)) from None

    def fsync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EROFS):  # some file systems cannot fsync a directory
                raise StorageError(self.path, os_problem(exc)) from None

    def same_as(self, path: str | os.PathLike) -> bool:
        """Does ``path`` still name this very directory (not one renamed into its place)?"""
        try:
            here, there = os.fstat(self.fd), os.stat(path)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def open_relative(root: Dir, relative: str) -> tuple[Dir, str]:
    """(directory, leaf) for ``a/b`` under ``root``, each component opened without following links."""
    *dirs, leaf = relative.split("/")
    here = root
    for part in dirs:
        nxt = here.sub(part)
        if here is not root:
            here.close()
        here = nxt
    return here, leaf


def read_fd(fd: int, where: Path, limit: int) -> bytes:
    """Everything in an open regular file, at most ``limit`` bytes (refused beyond)."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ZooError(where, f"not a regular file ({_kind(info.st_mode)}): refused")
        if info.st_size > limit:
            raise ZooError(where, f"is {info.st_size} bytes, more than the {limit} expected: refused")
        parts, total = [], 0
        while True:
            block = os.read(fd, min(_CHUNK, limit + 1 - total))
            if not block:
                break
            parts.append(block)
            total += len(block)
            if total > limit:
                raise ZooError(where, f"grew past the {limit} bytes expected while being read: refused")
        return b"".join(parts)
    except OSError as exc:
        raise StorageError(where, os_problem(exc)) from None


def open_regular(path: str | os.PathLike) -> int:
    """A descriptor on ``path`` (links followed: sources may live in a Hub cache) that is a regular file.

    A FIFO or device is refused without blocking on it (``O_NONBLOCK``).
    """
    where = Path(path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(where, os_problem(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise StorageError(where, os_problem(exc)) from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise StorageError(where, f"not a regular file ({_kind(mode)}): refused")
    return fd


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """All of regular file ``path`` (links followed), at most ``limit`` bytes."""
    fd = open_regular(path)
    try:
        return read_fd(fd, Path(path), limit)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, label in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                        (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return label
    return "not a regular file"


def _refusal(path: Path, exc: OSError) -> Exception:
    """ELOOP from O_NOFOLLOW is a link we refuse; the rest are the system's own words."""
    if exc.errno == errno.ELOOP:
        return ZooError(path, "is a symbolic link: links are never followed here (replace it with the real file or directory)")
    if exc.errno == errno.ENOTDIR:
        return ZooError(path, "is not a directory (or is a symbolic link): refused")
    if exc.errno == errno.ENOENT:
        return StorageError(path, "no such file or directory")
    return StorageError(path, os_problem(exc))


def iter_chunks(data: bytes, size: int = _CHUNK) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield view[start : start + size]
