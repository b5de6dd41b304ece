"""What a zoo writer has computed, held on disk until its files are written.

A merge computes the bases and cores batch by batch, but each file of the zoo can be written
only at the end: a .safetensors header names every tensor before the first byte, and an
adapter's cores file holds every module. Held in memory, those results made a merge's peak
grow with the number of modules (about 1 MB per module at 128 adapters). They wait instead in
one unnamed file inside the staging directory (``O_TMPFILE``: it has no name, so nothing is
left to clean up even after a kill, and it never leaves the zoo's own file system). Each zoo
file is written from it a run or a tensor at a time, and its share of the spill goes back to
the file system as it is read.
"""

from __future__ import annotations

import concurrent.futures
import errno
import math
import os
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import torch

from ..errors import StorageError
from ..io.confined import Dir, os_problem
from ..io.safetensors_file import byte_view, dtype_name, encode_layout, host_tensor, stored_bytes, torch_dtype
from .interrupts import held_interrupts
from .storage import punch_hole

BASIS = None  # the owner of the basis tensors; every other owner is an adapter's name
READ_WHOLE = 8 << 20  # an owner of at most this many bytes (an adapter's cores) is read back a run at a time

Owner = str | None


class Spill:
    """Tensors grouped by owner (the basis, each adapter), appended batch by batch, read back by owner.

    Each ``put`` writes, for each owner, one run of its tensors back to back: reading an adapter's
    cores back takes a read per batch, not one per tensor (a zoo of 500 × 128 has 128,000). Filing
    and writing run in a thread of their own while the next batch computes (one put in flight).
    """

    def __init__(self, where: Dir) -> None:
        self.where = where.path
        self.fd = _unnamed_file(where)
        self.end = 0
        self.runs: dict[Owner, list[tuple[int, int]]] = {}  # owner -> its runs (file offset, bytes)
        self.layout: dict[Owner, dict[str, tuple[str, tuple[int, ...], int, int]]] = {}  # name -> (dtype, shape, run, offset in it)
        self.shapes: dict[torch.Size, tuple[int, ...]] = {}
        self.popped: set[Owner] = set()
        self.writer = ThreadPoolExecutor(max_workers=1)
        self.writing: Future | None = None

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the file after any write in flight (never under it: the descriptor's number could
        be reused, and the write land in another file), in the spill's thread, so that even a
        second Ctrl-C during the wait leaves the close queued behind the write."""
        with held_interrupts():  # an interrupted join would leave the write running as the process exits
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                self.writer.submit(os.close, fd)
            self.writer.shutdown(wait=True)

    def put(self, owners: dict[Owner, dict[str, torch.Tensor]]) -> None:
        """Append each owner's tensors (one write for all of them); a name is never put twice for one owner.

        The filing and the write run in the spill's own thread while the caller goes on (the next
        batch's compute releases Python's lock); the tensors must not change after this call.
        """
        self.settle()
        with held_interrupts():  # the write is held once started (``store.interrupts``)
            self.writing = self.writer.submit(self._put, owners, self.fd)  # the descriptor now: close() may clear it first

    def settle(self) -> None:
        """Waits for the ``put`` in flight; raises its error."""
        if self.writing is not None:
            with held_interrupts():  # cleared only once the write has ended, so close() still waits for it
                concurrent.futures.wait([self.writing])
            writing, self.writing = self.writing, None
            writing.result()

    def _put(self, owners: dict[Owner, dict[str, torch.Tensor]], fd: int) -> None:
        flat: list[torch.Tensor] = []  # every tensor as a flat view, in the order written
        at = self.end
        for owner, tensors in owners.items():
            known, runs = self.layout.setdefault(owner, {}), self.runs.setdefault(owner, [])
            offset = 0
            for name, t in tensors.items():
                if name in known:
                    raise ValueError(f"{name!r} of {owner or 'the basis'} was already computed")
                t = host_tensor(name, t)
                shape = self.shapes.setdefault(t.shape, tuple(t.shape))  # one tuple per shape, not per tensor
                known[name] = (dtype_name(name, t.dtype), shape, len(runs), offset)
                if t.numel():
                    flat.append(t.view(-1))
                    offset += t.nbytes
            runs.append((at, offset))
            at += offset
        views = []  # the bytes, one view per run of tensors of one dtype (byte_view costs ~10 µs a call)
        while flat:
            same = next((i for i, t in enumerate(flat) if t.dtype != flat[0].dtype), len(flat))
            views.append(byte_view(torch.cat(flat[:same]) if same > 1 else flat[0]))
            flat = flat[same:]
        data, written = memoryview(b"".join(views)) if len(views) != 1 else views[0], 0
        try:
            while written < data.nbytes:
                written += os.pwrite(fd, data[written:], self.end + written)
        except OSError as exc:
            raise StorageError(self.where, f"holding the computed tensors: {os_problem(exc)}") from None
        self.end = at

    def tensors(self, owner: Owner) -> dict[str, torch.Tensor]:
        """All of ``owner``'s tensors, read back into memory (one adapter's cores: small)."""
        self._readable(owner)
        runs = [self._read(*run) for run in self.runs.get(owner, [])]
        out = {}
        for name, (dtype, shape, run, offset) in self.layout.get(owner, {}).items():
            count = math.prod(shape)
            kind = torch_dtype(dtype)
            out[name] = torch.frombuffer(runs[run], dtype=kind, count=count, offset=offset).reshape(shape) if count \
                else torch.empty(shape, dtype=kind)
        return out

    def pop_encoded(self, owner: Owner, metadata: dict[str, str]) -> Iterator[memoryview]:
        """``owner``'s tensors as the chunks of a .safetensors file, handed over once: read back a run
        at a time when the owner is small (``READ_WHOLE``), else one tensor at a time (the basis of a
        large model), each range's disk space given back as soon as it is read, where the file system
        can punch holes. So the spill and the zoo's files never take much more than the zoo's size."""
        self._readable(owner)
        self.popped.add(owner)
        layout, runs = self.layout.pop(owner, {}), self.runs.pop(owner, [])
        whole = sum(size for _, size in runs) <= READ_WHOLE
        held = [memoryview(self._read(*run)) for run in runs] if whole else []
        for offset, size in runs if whole else ():
            punch_hole(self.fd, offset, size)

        def data(name: str) -> memoryview:
            dtype, shape, run, offset = layout[name]
            size = stored_bytes(dtype, shape)
            if whole:
                return held[run][offset : offset + size]
            view = memoryview(self._read(runs[run][0] + offset, size))
            punch_hole(self.fd, runs[run][0] + offset, size)
            return view

        return encode_layout({name: spec[:2] for name, spec in layout.items()}, data, metadata)

    def _readable(self, owner: Owner) -> None:
        self.settle()
        if owner in self.popped:
            raise ValueError(f"the tensors of {owner or 'the basis'} were already handed over")

    def _read(self, offset: int, nbytes: int) -> bytearray:
        out = bytearray(nbytes)
        view, done = memoryview(out), 0
        try:
            while done < nbytes:
                got = os.preadv(self.fd, [view[done:]], offset + done)
                if not got:
                    raise OSError(errno.EIO, "the file holding the computed tensors ended early")
                done += got
        except OSError as exc:
            raise StorageError(self.where, f"reading back the computed tensors: {os_problem(exc)}") from None
        return out


def _unnamed_file(where: Dir) -> int:
    """A read-write file in ``where`` that has no name (``O_TMPFILE``), or, on a file system without
    it, one whose fresh random name is removed at once: either way it goes with its descriptor."""
    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
    if hasattr(os, "O_TMPFILE"):
        try:
            return os.open(".", flags | os.O_TMPFILE, 0o600, dir_fd=where.fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise StorageError(where.path, os_problem(exc)) from None
    name = f".spill-{uuid.uuid4().hex}"
    try:
        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600, dir_fd=where.fd)
    except OSError as exc:
        raise StorageError(where.path, os_problem(exc)) from None
    try:
        os.unlink(name, dir_fd=where.fd)
    except OSError as exc:
        os.close(fd)
        raise StorageError(where.path / name, os_problem(exc)) from None
    return fd
