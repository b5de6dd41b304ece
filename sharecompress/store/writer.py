"""Writing a whole zoo's files into a fresh directory: the basis, each adapter's cores and extras.

File names come from ``unique_stem`` (a safe stem per adapter name, never the name itself) and
every file is created fresh through ``storage``, hashed as written; the manifest returned names
them with their checksums. The tensors come from a ``Spill``, one file's at a time.
"""

from __future__ import annotations

from typing import Iterable

from .._version import __version__
from ..io.confined import Dir
from .manifest import FORMAT, FORMAT_VERSION
from .spill import BASIS, Spill
from .storage import safe_name, save_tensors

BASIS_METADATA = {"format": "pt", "sharecompress": "basis"}
CORES_METADATA = {"format": "pt", "sharecompress": "coefficients"}
EXTRAS_METADATA = {"format": "pt", "sharecompress": "extras"}


def write_zoo_files(names, spill: Spill, modules, entries, extras, staging: Dir) -> dict:
    """Basis and per-adapter files into ``staging``, from the tensors in ``spill`` (the basis's,
    and each adapter's under its name); returns the manifest naming them.

    ``entries`` are the adapters' finished manifest entries (their file fields are filled in here);
    ``extras`` maps a name to a loader of that adapter's non-LoRA tensors (read only now, one
    adapter at a time, so heads never pile up in memory). The caller adds the timestamps.
    """
    basis_sha = staging.write_new("basis.safetensors", spill.pop_encoded(BASIS, BASIS_METADATA))
    used: set[str] = set()
    with staging.sub("adapters", create=True) as folder:
        for name in names:
            entry = entries[name]
            entry.update(write_adapter_files(folder, unique_stem(name, used), spill.pop_encoded(name, CORES_METADATA), extras[name]()))
        folder.fsync()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "generation": 1,
        "basis_file": "basis.safetensors",
        "basis_sha256": basis_sha,
        "modules": modules,
        "adapters": [entries[name] for name in names],
    }


def unique_stem(name: str, used: set[str]) -> str:
    """A file stem for ``name`` that no other adapter of the zoo has (compared case-blind)."""
    stem = safe_name(name)
    while stem.lower() in used:
        stem += "_"
    used.add(stem.lower())
    return stem


def write_adapter_files(folder: Dir, stem: str, cores_file: Iterable[memoryview], extras: dict, generation: int = 1) -> dict:
    """An adapter's cores file in ``folder`` (the zoo's ``adapters/``), its bytes given as chunks
    (``encode(cores, CORES_METADATA)``, or ``Spill.pop_encoded``), and, when it has non-LoRA tensors,
    its extras file; returns the manifest fields naming them, relative to the zoo.

    Extras (classifier heads, biases) live in a file of their own: they never change, so an
    ``add`` that re-projects every core rewrites only the small cores files.
    """
    tag = "" if generation == 1 else f".g{generation}"
    entry = {"file": f"adapters/{stem}{tag}.safetensors"}
    entry["file_sha256"] = folder.write_new(f"{stem}{tag}.safetensors", cores_file)
    if extras:
        entry["extras_file"] = f"adapters/{stem}.extras{tag}.safetensors"
        entry["extras_sha256"] = save_tensors(folder, f"{stem}.extras{tag}.safetensors", extras, EXTRAS_METADATA)
    return entry
