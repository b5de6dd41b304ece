"""Reading one zoo: its manifest, and its tensors checked against it (one generation at a time)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

import torch

from ..errors import ShareError, ZooChanged, ZooError
from ..io.safetensors_file import SafetensorsFile
from .manifest import read_checked, read_manifest_digest, side_ks

T = TypeVar("T")


class ZooReader:
    """An open zoo: its manifest, and checked access to bases, cores and extras of one generation.

    The operations (``ops``) and the runtime read through this class; the public ``Zoo`` adds
    the operations on top of it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reload()

    @classmethod
    def from_manifest(cls, path: str | Path, manifest: dict, digest: str) -> "ZooReader":
        """A reader of a manifest already read (a writer's, under its lock): no second parse or copy."""
        reader = cls.__new__(cls)
        reader.path, reader.manifest, reader._digest, reader._bases = Path(path), manifest, digest, None
        return reader

    def reload(self) -> None:
        """Read the manifest again (after a writer published a new generation)."""
        self.manifest, self._digest = read_manifest_digest(self.path)
        self._bases: tuple[tuple, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None

    def consistent(self, read: Callable[[], T], attempts: int = 5) -> T:
        """``read()`` on one generation: when a writer publishes meanwhile, start over on the new one.

        Every file is checked against the manifest this object holds, so a read can never mix
        generations; it can only find its files gone or replaced (ZooChanged), and then retries.
        """
        for attempt in range(attempts):
            try:
                return read()
            except ZooChanged:
                if attempt + 1 == attempts:
                    raise
                self.reload()
        raise AssertionError("unreachable")

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

    def _file(self, relative: str, digest: str, size: int | None = None) -> SafetensorsFile:
        """A verified zoo file; ZooChanged when it failed because a writer has moved the zoo on."""
        try:
            return read_checked(self.path, self.manifest, relative, digest, limit=size)
        except ZooError as exc:
            if self._moved_on():
                raise ZooChanged(exc.path, "changed by a writer while being read") from None
            raise

    def _moved_on(self) -> bool:
        try:
            return read_manifest_digest(self.path)[1] != self._digest
        except ShareError:
            return True

    def checked_file(self, relative: str, digest: str, size: int | None = None) -> SafetensorsFile:
        """Any file the manifest names (an anchor of an earlier generation, say), checksum checked;
        ``size``: its recorded size, the read's cap (a writer may be resizing the current k meanwhile)."""
        return self._file(relative, digest, size)

    def _tensor(self, f: SafetensorsFile, key: str, shape: list[int] | None = None) -> torch.Tensor:
        info = f.tensors.get(key)
        if info is None:
            raise ZooError(f.path, f"tensor {key!r} is missing (the manifest names it)")
        if not info.is_float or (shape is not None and list(info.shape) != shape):
            raise ZooError(f.path, f"tensor {key!r} is {info.dtype} {list(info.shape)}; the manifest says float {shape}")
        return f.read(key)

    def bases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (U, V)} as stored; read once per basis generation (``export --all`` asks per adapter)."""
        key = (self.manifest["basis_file"], self.manifest["basis_sha256"])
        if self._bases is None or self._bases[0] != key:
            f = self._file(*key)
            bases = {}
            for m, info in self.modules.items():
                (n, d), (ku, kv) = info["shape"], side_ks(info)
                bases[m] = (self._tensor(f, f"{m}.U", [n, ku]), self._tensor(f, f"{m}.V", [d, kv]))
            self._bases = (key, bases)
        return dict(self._bases[1])

    def cores(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (E, F)} of one adapter as stored."""
        entry = self.adapter(name)
        f = self._file(entry["file"], entry["file_sha256"])
        cores = {}
        for m, mod in entry["modules"].items():
            ku, kv = side_ks(self.modules[m])
            cores[m] = (self._tensor(f, f"{m}.E", [ku, mod["p"]]), self._tensor(f, f"{m}.F", [mod["p"], kv]))
        return cores

    def residuals(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (RU, RV)} of one adapter's private residuals (``merge --max-error``), where it has one."""
        entry = self.adapter(name)
        held = {m: mod["residual"] for m, mod in entry["modules"].items() if mod.get("residual")}
        if not held:
            return {}
        f = self._file(entry["file"], entry["file_sha256"])
        return {m: (self._tensor(f, f"{m}.RU", [self.modules[m]["shape"][0], q]), self._tensor(f, f"{m}.RV", [self.modules[m]["shape"][1], q]))
                for m, q in held.items()}

    def extras(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.adapter(name)
        if not entry.get("extras_file"):
            return {}
        f = self._file(entry["extras_file"], entry["extras_sha256"])
        out = {}
        for key in entry.get("extras", []):
            if key not in f.tensors:
                raise ZooError(f.path, f"tensor {key!r} is missing (the manifest names it)")
            out[key] = f.read(key)
        return out
