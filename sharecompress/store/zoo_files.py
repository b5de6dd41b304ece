"""The zoo's file naming scheme, in one place.

Only names this scheme produces are ever written, cleaned up or replaced in a zoo, and a
manifest that names any other file (``../x``, ``/etc/passwd``, ``adapters/../../y``) is
refused on open. Every data file lies at most one directory (``adapters/``) below the root.
"""

from __future__ import annotations

import re
import stat

from ..io.confined import Dir
from ..errors import ZooError

MANIFEST = "manifest.json"
LOCK = ".lock"
ADAPTERS = "adapters"
_GEN = r"(?:\.g[1-9][0-9]{0,11})?"  # generations up to schema.MAX_GENERATION
BASIS = re.compile(rf"basis{_GEN}\.safetensors")
ADAPTER_FILE = re.compile(rf"[A-Za-z0-9_-]{{1,240}}(?:\.extras)?{_GEN}\.safetensors")
MANIFEST_TMP = re.compile(r"manifest\.json\.tmp(?:-[0-9a-f]{1,32})?")


def is_data_path(relative: object) -> bool:
    """Is ``relative`` a basis or adapter file name the scheme produces?"""
    if not isinstance(relative, str):
        return False
    if relative.startswith(f"{ADAPTERS}/"):
        return bool(ADAPTER_FILE.fullmatch(relative[len(ADAPTERS) + 1 :]))
    return bool(BASIS.fullmatch(relative))


def is_scheme_file(directory: str, name: str) -> bool:
    """A regular file the tool writes in the root (``directory == ""``) or in ``adapters/``."""
    if directory == ADAPTERS:
        return bool(ADAPTER_FILE.fullmatch(name))
    return name in (MANIFEST, LOCK) or bool(BASIS.fullmatch(name) or MANIFEST_TMP.fullmatch(name))


def foreign_entries(root: Dir) -> list[str]:
    """Entries of a zoo directory the tool did not write (links included): what replacing it would destroy."""
    foreign = []
    for name in root.names():
        info = root.lstat(name)
        if info is None:
            continue
        if name == ADAPTERS and stat.S_ISDIR(info.st_mode):
            with root.sub(ADAPTERS) as sub:
                for child in sub.names():
                    child_info = sub.lstat(child)
                    if child_info is not None and not (stat.S_ISREG(child_info.st_mode) and is_scheme_file(ADAPTERS, child)):
                        foreign.append(f"{ADAPTERS}/{child}")
        elif not (stat.S_ISREG(info.st_mode) and is_scheme_file("", name)) or (name == LOCK and info.st_size):
            foreign.append(name)  # (the tool's lock file is always empty)
    return foreign


def scheme_leftovers(root: Dir, keep: set[str]) -> list[str]:
    """Scheme-named regular files the manifest does not name (a killed writer's, or superseded ones).

    A scheme-named entry that is not a regular file (a planted link) is refused, never removed.
    """
    found = []
    for directory in ("", ADAPTERS):
        if directory:
            info = root.lstat(directory)
            if info is None:
                continue
            if stat.S_ISLNK(info.st_mode):
                raise ZooError(root.path / directory, "is a symbolic link: a zoo never follows links; remove it")
            if not stat.S_ISDIR(info.st_mode):
                raise ZooError(root.path / directory, "is not a directory; remove it")
            here = root.sub(directory)
        else:
            here = root
        try:
            for name in here.names():
                if name in (MANIFEST, LOCK) or not is_scheme_file(directory, name):
                    continue
                rel = f"{directory}/{name}" if directory else name
                if rel in keep:
                    continue
                info = here.lstat(name)
                if info is not None and not stat.S_ISREG(info.st_mode):
                    kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
                    raise ZooError(root.path / rel, f"is {kind}: a zoo never follows links; refused (remove it)")
                found.append(rel)
        finally:
            if here is not root:
                here.close()
    return found
