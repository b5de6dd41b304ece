"""``verify``: is every file the manifest names there, unchanged (sha256), and of the right shapes?"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io.confined import Dir
from ..errors import ShareError
from ..io.safetensors_file import SafetensorsFile
from .transaction import referenced_files
from .manifest import anchor_files, read_checked, read_manifest_digest, side_ks
from .zoo_files import foreign_entries, scheme_leftovers


def verify(path: str | Path, attempts: int = 5) -> tuple[list[str], list[str]]:
    """(problems, notes). Problems make a zoo unusable; notes (stray files) do not.

    Problems found while a writer published a new generation are not reported: the check starts
    over on the new one (a file of the old generation is gone, not broken).
    """
    path = Path(path)
    for attempt in range(attempts):
        problems, notes, digest = _verify_once(path)
        if not problems or digest is None or attempt + 1 == attempts:
            return problems, notes
        try:
            if read_manifest_digest(path)[1] == digest:  # the generation checked is still the current one
                return problems, notes
        except ShareError:
            return problems, notes
    raise AssertionError("unreachable")


def _verify_once(path: Path) -> tuple[list[str], list[str], str | None]:
    """(problems, notes, digest of the manifest checked; None when it could not be read)."""
    try:
        manifest, digest = read_manifest_digest(path)
    except ShareError as exc:
        return [str(exc)], [], None
    problems: list[str] = []
    modules = manifest["modules"]

    def open_checked(rel: str, digest: str) -> SafetensorsFile | None:
        try:
            return read_checked(path, manifest, rel, digest)
        except ShareError as exc:
            problems.append(str(exc))
            return None

    def expect(f: SafetensorsFile, key: str, shape: list[int]) -> None:
        info = f.tensors.get(key)
        if info is None:
            problems.append(f"{f.path}: tensor {key!r} missing")
        elif list(info.shape) != shape:
            problems.append(f"{f.path}: tensor {key!r} has shape {list(info.shape)}, manifest says {shape}")
        elif not info.is_float:
            problems.append(f"{f.path}: tensor {key!r} is {info.dtype}, not a float")
        elif not bool(torch.isfinite(f.read(key)).all()):
            problems.append(f"{f.path}: tensor {key!r} contains NaN or Inf")

    basis = open_checked(manifest["basis_file"], manifest["basis_sha256"])
    if basis is not None:
        for name, info in modules.items():
            n, d = info["shape"]
            ku, kv = side_ks(info)
            expect(basis, f"{name}.U", [n, ku])
            expect(basis, f"{name}.V", [d, kv])
    current = {manifest["basis_file"]} | {e["file"] for e in manifest["adapters"]}
    for rel, (digest, _) in anchor_files(manifest).items():
        if rel not in current:  # an earlier generation kept for tight bounds: checked like the rest
            open_checked(rel, digest)
    for entry in manifest["adapters"]:
        cores = open_checked(entry["file"], entry["file_sha256"])
        if cores is not None:
            for name, mod in entry["modules"].items():
                ku, kv = side_ks(modules[name])
                expect(cores, f"{name}.E", [ku, mod["p"]])
                expect(cores, f"{name}.F", [mod["p"], kv])
                if mod.get("residual"):
                    n, d = modules[name]["shape"]
                    expect(cores, f"{name}.RU", [n, mod["residual"]])
                    expect(cores, f"{name}.RV", [d, mod["residual"]])
        if entry.get("extras_file"):
            extras = open_checked(entry["extras_file"], entry["extras_sha256"])
            if extras is not None:
                for key in entry.get("extras", []):
                    if key not in extras.tensors:
                        problems.append(f"{extras.path}: extra tensor {key!r} missing")
    notes: list[str] = []
    try:
        with Dir.open(path) as root:
            keep = referenced_files(manifest)
            leftovers = scheme_leftovers(root, keep)
            notes += [f"{path / rel}: not named in the manifest (left by an interrupted writer; the next write removes it)" for rel in leftovers]
            for rel in foreign_entries(root):
                if rel in leftovers:
                    continue
                full = path / rel
                if full.is_symlink():
                    problems.append(f"{full}: a symbolic link inside the zoo (never followed; remove it)")
                else:
                    notes.append(f"{full}: not a file of this zoo (left alone; `merge --force` will not replace a zoo holding it)")
    except ShareError as exc:
        problems.append(str(exc))
    return list(dict.fromkeys(problems)), notes, digest  # one cause (a linked adapters/) can fail several files alike
