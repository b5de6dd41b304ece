"""Crash-safe updates of an existing zoo.

New content always goes to files with fresh names (tagged with the next generation), is
fsync'd, and only then does ``manifest.json`` change, by one atomic rename. Files the new
manifest no longer names are removed afterwards, and leftovers of a killed writer are removed
by the next one. A process killed at any instant leaves the old zoo or the new one.

All of it happens through the directory the writer lock was taken on (``tx.root``), never by
path: a zoo swapped or linked away mid-update cannot redirect a write or a deletion, and
only regular files of the zoo's own naming scheme are ever deleted (``zoo_files``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from ..errors import StorageError, ZooError
from ..io.confined import Dir, open_relative
from .manifest import MANIFEST, anchor_files, file_digests, manifest_bytes, read_checked, read_manifest, read_manifest_digest, refuse_partial
from .schema import MAX_GENERATION
from .storage import WriterLock, pause_point
from .zoo_files import ADAPTERS, scheme_leftovers

_MANIFEST_TMP = f"{MANIFEST}.tmp"
_TAG = re.compile(r"\.g([0-9]+)\.safetensors$")


def referenced_files(manifest: dict) -> set[str]:
    names = {MANIFEST, manifest["basis_file"], *anchor_files(manifest)}
    for entry in manifest["adapters"]:
        names.add(entry["file"])
        if entry.get("extras_file"):
            names.add(entry["extras_file"])
    return names


def collect_garbage(root: Dir, manifest: dict) -> list[str]:
    """Remove the zoo-scheme files ``manifest`` does not name (a crashed writer's, or superseded ones)."""
    removed = []
    for rel in scheme_leftovers(root, referenced_files(manifest)):
        where, leaf = open_relative(root, rel)
        try:
            where.unlink(leaf, missing_ok=True)
        finally:
            if where is not root:
                where.close()
        removed.append(rel)
    return removed


class Transaction:
    """``with Transaction(zoo) as tx:`` → write files in ``tx.root`` / ``tx.adapters``, then ``tx.commit(manifest)``."""

    def __init__(self, zoo: Path, lock_timeout: float = 30.0, waiting: Callable[[str], None] | None = None) -> None:
        self.zoo = Path(zoo)
        refuse_partial(self.zoo, read_manifest(self.zoo))  # a clear error before anything is locked
        self._lock = WriterLock(self.zoo, lock_timeout, waiting)
        self.manifest: dict = {}
        self.committed = False

    def __enter__(self) -> "Transaction":
        self._lock.__enter__()
        try:
            self.root = self._lock.root
            self.manifest, self.digest = read_manifest_digest(self.zoo, self.root)  # re-read under the lock
            refuse_partial(self.zoo, self.manifest)
            collect_garbage(self.root, self.manifest)
            self.adapters = self.root.sub(ADAPTERS, create=True)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        self.carried = file_digests(self.manifest)  # the files of the generation as it was
        tags = [int(m[1]) for rel in self.carried if (m := _TAG.search(rel))]
        self.generation = max([int(self.manifest["generation"]), *tags]) + 1  # never a name already taken
        if self.generation > MAX_GENERATION:
            self.__exit__(None, None, None)
            raise ZooError(self.zoo, f"generation {self.generation - 1} is the last a zoo can have: merge it anew")
        return self

    def commit(self, manifest: dict) -> None:
        """Publish ``manifest`` atomically; the files it names must already be written.

        Files carried over from the previous generation (unchanged heads, the basis ``remove``
        keeps) are read and checked against their checksums first: corrupt or swapped data is
        refused here rather than handed on to a new generation.
        """
        pause_point("before-manifest")
        manifest["generation"] = self.generation
        data = manifest_bytes(manifest)
        for rel, digest in file_digests(manifest).items():
            if rel in self.carried:
                read_checked(self.zoo, manifest, rel, digest, root=self.root)
        self.adapters.fsync()
        self.root.fsync()
        self.root.unlink(_MANIFEST_TMP, missing_ok=True)
        try:
            self.root.write_new(_MANIFEST_TMP, [data])
        except StorageError as exc:  # name the manifest, not its temporary name
            raise StorageError(self.zoo / MANIFEST, exc.problem) from None
        self.root.replace(_MANIFEST_TMP, MANIFEST)
        self.root.fsync()
        self.committed = True
        pause_point("after-manifest")
        collect_garbage(self.root, manifest)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.adapters.close()
            if not self.committed:
                collect_garbage(self.root, read_manifest(self.zoo, self.root))
        except Exception:
            if exc_type is None:
                raise  # a failed clean-up after a failure is left to the next writer
        finally:
            self._lock.__exit__(exc_type, exc, tb)
