"""``remove``: drop adapters from a zoo. The shared bases stay as they are."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

from .errors import ZooError
from .merge import module_bound2, now
from .transaction import Transaction


def remove(zoo_path: str | Path, names: Iterable[str]) -> None:
    names = list(names)
    with Transaction(Path(zoo_path)) as tx:
        manifest = copy.deepcopy(tx.manifest)
        known = {e["name"] for e in manifest["adapters"]}
        missing = [n for n in names if n not in known]
        if missing:
            raise ZooError(zoo_path, f"no adapter named {missing[0]!r} in this zoo (it has: {', '.join(sorted(known))})")
        manifest["adapters"] = [e for e in manifest["adapters"] if e["name"] not in names]
        for module, info in manifest["modules"].items():
            holders = [e["modules"][module] for e in manifest["adapters"] if module in e["modules"]]
            total = sum(m["norm2"] for m in holders)
            info["adapters"] = len(holders)
            info["energy_kept"] = 1.0 - sum(module_bound2(m) for m in holders) / total if total > 0 else 1.0
        manifest["updated"] = now()
        tx.commit(manifest)
