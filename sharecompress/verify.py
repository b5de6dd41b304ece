"""``verify``: does every file the manifest names exist, match its checksum and hold the right shapes?"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError, ZooError
from .safetensors_file import SafetensorsFile
from .storage import file_sha256
from .transaction import referenced_files
from .zoo import read_manifest, side_ks


def verify(path: str | Path) -> tuple[list[str], list[str]]:
    """(problems, notes). Problems make a zoo unusable; notes (stray files) do not."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except ZooError as exc:
        return [str(exc)], []
    problems: list[str] = []
    modules = manifest["modules"]

    def open_checked(rel: str, digest: str | None) -> SafetensorsFile | None:
        full = path / rel
        if not full.is_file():
            problems.append(f"{full}: missing (named in the manifest)")
            return None
        if digest and file_sha256(full) != digest:
            problems.append(f"{full}: checksum differs from the manifest")
            return None
        try:
            return SafetensorsFile(full)
        except InputError as exc:
            problems.append(str(exc))
            return None

    def expect(f: SafetensorsFile, key: str, shape: list[int]) -> None:
        info = f.tensors.get(key)
        if info is None:
            problems.append(f"{f.path}: tensor {key!r} missing")
        elif list(info.shape) != shape:
            problems.append(f"{f.path}: tensor {key!r} has shape {list(info.shape)}, manifest says {shape}")
        elif not bool(torch.isfinite(f.read(key)).all()):
            problems.append(f"{f.path}: tensor {key!r} contains NaN or Inf")

    basis = open_checked(manifest["basis_file"], manifest.get("basis_sha256"))
    if basis is not None:
        for name, info in modules.items():
            n, d = info["shape"]
            ku, kv = side_ks(info)
            expect(basis, f"{name}.U", [n, ku])
            expect(basis, f"{name}.V", [d, kv])
    seen: set[str] = set()
    for entry in manifest["adapters"]:
        if entry["name"] in seen:
            problems.append(f"{path}: adapter name {entry['name']!r} appears twice in the manifest")
        seen.add(entry["name"])
        cores = open_checked(entry["file"], entry.get("file_sha256"))
        if cores is not None:
            for name, mod in entry["modules"].items():
                if name not in modules:
                    problems.append(f"{cores.path}: module {name!r} is not in the manifest's modules")
                    continue
                ku, kv = side_ks(modules[name])
                expect(cores, f"{name}.E", [ku, mod["p"]])
                expect(cores, f"{name}.F", [mod["p"], kv])
        if entry.get("extras_file"):
            extras = open_checked(entry["extras_file"], entry.get("extras_sha256"))
            if extras is not None:
                for key in entry.get("extras", []):
                    if key not in extras.tensors:
                        problems.append(f"{extras.path}: extra tensor {key!r} missing")
    keep = referenced_files(manifest)
    notes = [
        f"{p}: not named in the manifest (left by an interrupted writer; the next write removes it)"
        for p in sorted([*path.glob("*.safetensors*"), *path.glob("adapters/*")])
        if p.relative_to(path).as_posix() not in keep
    ]
    return problems, notes
