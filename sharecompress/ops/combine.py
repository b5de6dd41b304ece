"""``combine``: join the partial zoos of a sharded merge (``merge --shard I/N``) into one zoo.

Modules are independent, so the parts' bases and cores are simply gathered; the result is
the zoo an unsharded merge writes (tested byte for byte on the tensors).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Iterable

from ..errors import ZooError
from ..store.manifest import MANIFEST, manifest_bytes, replaceable_zoo
from ..store.reader import ZooReader
from ..store.spill import BASIS, Spill
from ..store.storage import staged_directory
from ..store.writer import write_zoo_files
from .anchors import anchor_here
from .entries import finish_adapter_entry, now
from .merge import check_target

_SAME = ("method", "k_rule", "sweeps", "p", "dtype", "base_model")


def combine(parts: Iterable[str | os.PathLike], zoo: str | os.PathLike, force: bool = False) -> Path:
    target = Path(zoo)
    check_target(target, force)
    opened = [ZooReader(p) for p in parts]
    if not opened:
        raise ValueError("name the partial zoos to combine")
    first = opened[0]
    for part in opened:
        if "shard" not in part.manifest:
            raise ZooError(part.path, "not a partial zoo (it was not written by merge --shard)")
    count = first.manifest["shard"]["count"]
    indices = sorted(p.manifest["shard"]["index"] for p in opened)
    if any(p.manifest["shard"]["count"] != count for p in opened) or indices != list(range(1, count + 1)):
        raise ZooError(first.path, f"the parts must be shards 1..{count} of one merge, each once; got {indices}")
    names = first.names
    for part in opened[1:]:
        if part.names != names or [a["sha256"] for a in part.adapters] != [a["sha256"] for a in first.adapters]:
            raise ZooError(part.path, f"holds other adapters than {first.path}")
        for key in _SAME:
            if part.manifest.get(key) != first.manifest.get(key):
                raise ZooError(part.path, f"was merged with another {key} than {first.path}")
    holder: dict[str, ZooReader] = {}
    for part in opened:  # shards of one merge never share a module: an overlap is a part that lies about its index
        for module in part.modules:
            if module in holder:
                raise ZooError(part.path, f"holds module {module!r}, which {holder[module].path} holds too: not shards of one merge")
            holder[module] = part

    with staged_directory(target, replaceable_zoo if force else None, lock=True) as staging, Spill(staging) as spill:
        modules = {}
        entries = {e["name"]: copy.deepcopy(e) for e in first.adapters}
        extras_from: dict[str, ZooReader] = {}
        for part in opened:  # one part's bases, then one adapter's cores at a time, held on disk (``Spill``)
            spill.put({BASIS: {f"{module}.{side}": X for module, pair in part.bases().items() for side, X in zip("UV", pair)}})
            modules.update(part.modules)
            for entry in part.adapters:
                name = entry["name"]
                own = {f"{module}.{side}": X for module, pair in part.cores(name).items() for side, X in zip("EF", pair)}
                own.update({f"{module}.{side}": X for module, pair in part.residuals(name).items() for side, X in zip(("RU", "RV"), pair)})
                spill.put({name: own})
                entries[name]["modules"].update(entry["modules"])
                if entry.get("extras_file"):
                    extras_from[name] = part
                    entries[name]["extras"], entries[name]["bytes_extras"] = entry["extras"], entry["bytes_extras"]
        modules = dict(sorted(modules.items()))
        for entry in entries.values():
            entry["modules"] = dict(sorted(entry["modules"].items()))
            for key in ("file", "file_sha256", "extras_file", "extras_sha256", "anchor"):
                entry.pop(key, None)
            finish_adapter_entry(entry)  # its modules now come from every part
        extras = {name: (lambda n=name: extras_from[n].extras(n) if n in extras_from else {}) for name in names}
        manifest = write_zoo_files(names, spill, modules, entries, extras, staging)
        for entry in manifest["adapters"]:
            anchor_here(manifest, entry, staging)  # each part's slacks hold for the same bases, now in one file
        manifest.update({key: first.manifest.get(key) for key in _SAME})
        manifest["combined_from"] = count
        manifest["created"] = manifest["updated"] = now()
        staging.write_new(MANIFEST, [manifest_bytes(manifest)])
    return target
