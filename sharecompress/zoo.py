"""The on-disk zoo (DESIGN.md §6): a manifest, one basis file, one coefficient file per adapter.

Reading side only; writers go through ``publish`` (a new zoo) or ``transaction`` (updates).
Every file a manifest names carries its sha256 there, so ``verify`` can check the lot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import ZooError
from .safetensors_file import SafetensorsFile
from .errors import InputError

FORMAT = "sharecompress-zoo"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_ZOO = "share_zoo"


def side_ks(module: dict) -> tuple[int, int]:
    """(k of U, k of V) of a manifest module entry (equal unless the module is rectangular)."""
    return module.get("k_u", module["k"]), module.get("k_v", module["k"])


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the zoo at ``path``, checked for format and version."""
    if not path.exists():
        raise ZooError(path, "no such zoo directory")
    if not path.is_dir():
        raise ZooError(path, "not a zoo: not a directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ZooError(path, f"not a zoo: no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZooError(mpath, f"corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ZooError(mpath, "not a sharecompress manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ZooError(mpath, "corrupt manifest: no format_version")
    if version > FORMAT_VERSION:
        raise ZooError(
            mpath, f"zoo format version {version} is newer than this sharecompress reads ({FORMAT_VERSION}): upgrade"
        )
    for key, kind in (("modules", dict), ("adapters", list), ("basis_file", str)):
        if not isinstance(manifest.get(key), kind):
            raise ZooError(mpath, f"corrupt manifest: {key!r} missing or of the wrong type")
    return manifest


def refuse_partial(path: Path, manifest: dict) -> None:
    """Writers and export need a whole zoo, not one part of a sharded merge."""
    shard = manifest.get("shard")
    if shard:
        raise ZooError(path, f"a partial zoo (shard {shard['index']}/{shard['count']}): join the parts with `sharecompress combine` first")


class Zoo:
    """An open zoo: its manifest, and lazy access to bases and coefficients."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._bases: tuple[tuple, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None

    @classmethod
    def open(cls, path: str | Path = DEFAULT_ZOO) -> "Zoo":
        return cls(path)

    @property
    def modules(self) -> dict[str, dict]:
        return self.manifest["modules"]

    @property
    def adapters(self) -> list[dict]:
        return self.manifest["adapters"]

    @property
    def names(self) -> list[str]:
        return [a["name"] for a in self.adapters]

    def adapter(self, name: str) -> dict:
        for entry in self.adapters:
            if entry["name"] == name:
                return entry
        raise ZooError(self.path, f"no adapter named {name!r} in this zoo (it has: {', '.join(self.names) or 'none'})")

    def _file(self, relative: str) -> SafetensorsFile:
        try:
            return SafetensorsFile(self.path / relative)
        except InputError as exc:
            raise ZooError(exc.path, exc.problem) from None

    def bases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (U, V)} as stored; read once per basis generation (``export --all`` asks per adapter)."""
        key = (self.manifest["basis_file"], self.manifest.get("basis_sha256"))
        if self._bases is None or self._bases[0] != key:
            f = self._file(self.manifest["basis_file"])
            self._bases = (key, {m: (f.read(f"{m}.U"), f.read(f"{m}.V")) for m in self.modules})
        return dict(self._bases[1])

    def cores(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (E, F)} of one adapter as stored."""
        entry = self.adapter(name)
        f = self._file(entry["file"])
        return {m: (f.read(f"{m}.E"), f.read(f"{m}.F")) for m in entry["modules"]}

    def extras(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.adapter(name)
        if not entry.get("extras_file"):
            return {}
        f = self._file(entry["extras_file"])
        return {key: f.read(key) for key in entry.get("extras", [])}

    def report(self, against: list[str] | None = None) -> dict:
        """The report dict; with ``against`` (original adapters) old adapters' errors are exact."""
        from .against import measure_against
        from .report import build_report

        return build_report(self.manifest, measure_against(self, against) if against else None)

    def add(self, sources: list[str], grow: str = "auto", **kw) -> dict:
        """Fold new adapters in; returns each old adapter's relative drift."""
        from .add import add

        drift = add(self.path, sources, grow=grow, **kw)
        self.manifest = read_manifest(self.path)
        return drift

    def export(self, name: str, out: str | Path, dtype: str = "float32", force: bool = False) -> Path:
        from .export import export

        return export(self, name, out, dtype=dtype, force=force)

    def remove(self, *names: str) -> None:
        from .remove import remove

        remove(self.path, names)
        self.manifest = read_manifest(self.path)

    def verify(self) -> tuple[list[str], list[str]]:
        from .verify import verify

        return verify(self.path)
