"""``remove``: drop adapters from a zoo. The shared bases stay as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..errors import ZooError
from .entries import now, refresh_module_stats
from ..store.transaction import Transaction


def remove(zoo_path: str | Path, names: Iterable[str]) -> None:
    names = list(names)
    with Transaction(Path(zoo_path)) as tx:
        manifest = tx.manifest  # edited in place: on failure the transaction publishes nothing
        known = {e["name"] for e in manifest["adapters"]}
        missing = [n for n in names if n not in known]
        if missing:
            raise ZooError(zoo_path, f"no adapter named {missing[0]!r} in this zoo (it has: {', '.join(sorted(known))})")
        manifest["adapters"] = [e for e in manifest["adapters"] if e["name"] not in names]
        refresh_module_stats(manifest)
        manifest["updated"] = now()
        tx.commit(manifest)
