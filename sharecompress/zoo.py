"""The on-disk zoo (DESIGN.md §6): a manifest, one basis file, one coefficient file per adapter.

Reading side only; writers go through ``publish`` (a new zoo) or ``transaction`` (updates).
Every file a manifest names carries its sha256 there, so ``verify`` can check the lot.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from . import jsonio
from .confined import Dir, open_relative
from .errors import InputError, ShareError, StorageError, ZooChanged, ZooError
from .safetensors_file import SafetensorsFile
from .schema import check_manifest
from .zoo_files import LOCK, MANIFEST, foreign_entries

FORMAT = "sharecompress-zoo"
FORMAT_VERSION = 1
DEFAULT_ZOO = "share_zoo"
MAX_MANIFEST_BYTES = 64 << 20  # ~1,000 adapters x 200 modules; JSON of that size parses in well under 2 GB
_HEADER_ALLOWANCE = 64 << 10
_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
T = TypeVar("T")


def side_ks(module: dict) -> tuple[int, int]:
    """(k of U, k of V) of a manifest module entry (equal unless the module is rectangular)."""
    return module.get("k_u", module["k"]), module.get("k_v", module["k"])


def read_manifest(path: Path, root: Dir | None = None) -> dict[str, Any]:
    """The manifest of the zoo at ``path`` (or in the open directory ``root``), fully validated."""
    return read_manifest_digest(path, root)[0]


def read_manifest_digest(path: Path, root: Dir | None = None) -> tuple[dict[str, Any], str]:
    """(manifest, sha256 of its bytes): the digest tells a reader whether a writer published since."""
    path = Path(path)
    if root is None:
        if not os.path.lexists(path):
            from .storage import restore_interrupted_swap

            if not restore_interrupted_swap(path):
                raise ZooError(path, "no such zoo directory")
        if not path.is_dir():
            raise ZooError(path, "not a zoo: not a directory")
        with Dir.open(path) as opened:
            return read_manifest_digest(path, opened)
    mpath = path / MANIFEST
    info = root.lstat(MANIFEST)
    if info is None:
        raise ZooError(path, f"not a zoo: no {MANIFEST}")
    raw = root.read(MANIFEST, MAX_MANIFEST_BYTES)
    try:
        manifest = jsonio.loads(raw, allow_infinity=True)
    except jsonio.JSONProblem as exc:
        raise ZooError(mpath, f"corrupt manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ZooError(mpath, "not a sharecompress manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ZooError(mpath, "corrupt manifest: no format_version")
    if version > FORMAT_VERSION:
        raise ZooError(
            mpath, f"zoo format version {version} is newer than this sharecompress reads ({FORMAT_VERSION}): upgrade"
        )
    for key, kind in (("modules", dict), ("adapters", list), ("basis_file", str)):
        if not isinstance(manifest.get(key), kind):
            raise ZooError(mpath, f"corrupt manifest: {key!r} missing or of the wrong type")
    check_manifest(manifest, mpath)
    return manifest, hashlib.sha256(raw).hexdigest()


def refuse_partial(path: Path, manifest: dict) -> None:
    """Writers and export need a whole zoo, not one part of a sharded merge."""
    shard = manifest.get("shard")
    if shard:
        raise ZooError(path, f"a partial zoo (shard {shard['index']}/{shard['count']}): join the parts with `sharecompress combine` first")


def replaceable_zoo(target: Path) -> None:
    """Accept ``target`` for ``--force`` replacement only when it is an empty directory, or a zoo
    (a valid manifest) holding nothing but the files the tool writes; refuse anything else."""
    if os.path.islink(target):
        raise ZooError(target, "is a symbolic link; refusing to replace it")
    if not os.path.isdir(target):
        raise ZooError(target, "exists and is not a directory; refusing to replace it")
    with Dir.open(target, follow=False) as root:
        if not [n for n in root.names() if n != LOCK]:  # empty (the lock is ours, taken to replace it)
            return
        if root.lstat(MANIFEST) is None:
            raise ZooError(target, "exists and is not a sharecompress zoo (no manifest.json); refusing to replace it")
        try:
            read_manifest(target, root)
        except ZooError as exc:
            raise ZooError(target, f"exists and is not a sharecompress zoo ({exc.problem}); refusing to replace it") from None
        foreign = foreign_entries(root)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ZooError(target, f"holds files that are not the zoo's ({shown}); refusing to replace it")


def expected_bytes(manifest: dict, relative: str) -> int:
    """The most bytes the file ``relative`` can have if it holds what the manifest says (a read cap)."""
    item = _ITEM_BYTES[manifest.get("dtype", "float32")]
    modules = manifest["modules"]
    if relative == manifest["basis_file"]:
        shapes = [(info["shape"][0] * side_ks(info)[0] + info["shape"][1] * side_ks(info)[1], len(m) + 2)
                  for m, info in modules.items()]
        return _HEADER_ALLOWANCE + sum(elems * item + 2 * (key + 160) for elems, key in shapes)
    for entry in manifest["adapters"]:
        if entry.get("extras_file") == relative:
            return _HEADER_ALLOWANCE + entry.get("bytes_extras", 0) + sum(len(k) + 160 for k in entry.get("extras", []))
        if entry.get("file") == relative:
            total = _HEADER_ALLOWANCE
            for m, mod in entry["modules"].items():
                ku, kv = side_ks(modules[m])
                total += (ku + kv) * mod["p"] * item + 2 * (len(m) + 162)
            return total
    raise ZooError(relative, "is not named by the manifest")


def read_checked(path: Path, manifest: dict, relative: str, digest: str, root: Dir | None = None) -> SafetensorsFile:
    """Zoo file ``relative``, read once into memory, its sha256 checked before any tensor is parsed.

    Links are refused at every step (``confined``); a file larger than the manifest allows is
    refused before it is read. ZooError names the file and what is wrong.
    """
    full = path / relative
    opened = root if root is not None else Dir.open(path)
    try:
        where, leaf = open_relative(opened, relative)
        try:
            data = where.read(leaf, expected_bytes(manifest, relative))
        finally:
            if where is not opened:
                where.close()
    except StorageError as exc:
        raise ZooError(full, f"{exc.problem} (named in the manifest)") from None
    finally:
        if root is None:
            opened.close()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ZooError(full, "checksum differs from the manifest: the file is corrupt or was changed (run `sharecompress verify`)")
    try:
        return SafetensorsFile.from_bytes(full, data)
    except InputError as exc:
        raise ZooError(exc.path, exc.problem) from None


class Zoo:
    """An open zoo: its manifest, and lazy access to bases and coefficients."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reload()

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

    def _file(self, relative: str, digest: str) -> SafetensorsFile:
        """A verified zoo file; ZooChanged when it failed because a writer has moved the zoo on."""
        try:
            return read_checked(self.path, self.manifest, relative, digest)
        except ZooError as exc:
            if self._moved_on():
                raise ZooChanged(exc.path, "changed by a writer while being read") from None
            raise

    def _moved_on(self) -> bool:
        try:
            return read_manifest_digest(self.path)[1] != self._digest
        except ShareError:
            return True

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

    def report(self, against: list[str] | None = None) -> dict:
        """The report dict; with ``against`` (original adapters) old adapters' errors are exact."""
        from .against import measure_against
        from .report import build_report

        if not against:
            return build_report(self.manifest, None)
        return self.consistent(lambda: build_report(self.manifest, measure_against(self, against)))

    def add(self, sources: list[str], grow: str = "auto", **kw) -> dict:
        """Fold new adapters in; returns each old adapter's relative drift."""
        from .add import add

        drift = add(self.path, sources, grow=grow, **kw)
        self.reload()
        return drift

    def export(self, name: str, out: str | Path, dtype: str = "float32", force: bool = False) -> Path:
        from .export import export

        return export(self, name, out, dtype=dtype, force=force)

    def remove(self, *names: str) -> None:
        from .remove import remove

        remove(self.path, names)
        self.reload()

    def attach(self, model, device=None, dtype=None):
        """Serve this zoo from memory inside ``model`` (patched in place); see ``runtime.Runtime``."""
        from .runtime import Runtime

        return Runtime(self, model, device=device, dtype=dtype)

    def verify(self) -> tuple[list[str], list[str]]:
        from .verify import verify

        return verify(self.path)
