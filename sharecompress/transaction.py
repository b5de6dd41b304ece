"""Crash-safe updates of an existing zoo.

New content always goes to files with fresh names (tagged with the next generation), is
fsync'd, and only then does ``manifest.json`` change, by one atomic rename. Files the new
manifest no longer names are removed afterwards, and leftovers of a killed writer are removed
by the next one. A process killed at any instant leaves the old zoo or the new one.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .storage import WriterLock, fsync_dir, write_json_durably
from .zoo import MANIFEST, read_manifest, refuse_partial

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


def referenced_files(manifest: dict) -> set[str]:
    names = {MANIFEST, manifest["basis_file"]}
    for entry in manifest["adapters"]:
        names.add(entry["file"])
        if entry.get("extras_file"):
            names.add(entry["extras_file"])
    return names


def collect_garbage(zoo: Path, manifest: dict) -> list[str]:
    """Remove files that ``manifest`` does not name (a crashed writer's, or superseded ones)."""
    keep = referenced_files(manifest)
    removed = []
    for path in [*zoo.glob("*.safetensors*"), *zoo.glob("adapters/*"), *zoo.glob(f"{MANIFEST}.tmp*")]:
        rel = path.relative_to(zoo).as_posix()
        if path.is_file() and rel not in keep:
            path.unlink()
            removed.append(rel)
    return removed


class Transaction:
    """``with Transaction(zoo) as tx:`` → write files under ``tx.name(...)``, then ``tx.commit(manifest)``."""

    def __init__(self, zoo: Path, lock_timeout: float = 30.0) -> None:
        self.zoo = Path(zoo)
        refuse_partial(self.zoo, read_manifest(self.zoo))  # a clear error before anything is locked
        self._lock = WriterLock(self.zoo, lock_timeout)
        self.manifest: dict = {}
        self.committed = False

    def __enter__(self) -> "Transaction":
        self._lock.__enter__()
        try:
            self.manifest = read_manifest(self.zoo)  # re-read under the lock
            collect_garbage(self.zoo, self.manifest)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        self.generation = int(self.manifest.get("generation", 1)) + 1
        return self

    def commit(self, manifest: dict) -> None:
        """Publish ``manifest`` atomically; the files it names must already be written."""
        pause_point("before-manifest")
        (self.zoo / "adapters").mkdir(exist_ok=True)
        fsync_dir(self.zoo / "adapters")
        fsync_dir(self.zoo)
        manifest["generation"] = self.generation
        tmp = self.zoo / f"{MANIFEST}.tmp"
        write_json_durably(tmp, manifest)
        os.replace(tmp, self.zoo / MANIFEST)
        fsync_dir(self.zoo)
        self.committed = True
        pause_point("after-manifest")
        collect_garbage(self.zoo, manifest)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self.committed:
                collect_garbage(self.zoo, read_manifest(self.zoo))
        finally:
            self._lock.__exit__(exc_type, exc, tb)
