"""The manifest and the checked reading of zoo files (DESIGN.md §6).

A zoo is a manifest, one basis file and one coefficient file per adapter; every file the
manifest names carries its sha256 there. Reading goes through ``read_checked``: the file is read
once, no link followed, its size bounded by what the manifest says it holds, its checksum
verified before a tensor is parsed. Writers go through ``storage`` and ``transaction``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import InputError, ShareError, StorageError, ZooError
from ..io import jsonio
from ..io.confined import Dir, open_relative
from ..io.safetensors_file import SafetensorsFile
from .schema import check_manifest
from .zoo_files import LOCK, MANIFEST, foreign_entries

FORMAT = "sharecompress-zoo"
FORMAT_VERSION = 1
DEFAULT_ZOO = "share_zoo"
MAX_MANIFEST_BYTES = 64 << 20  # ~1,000 adapters x 200 modules; JSON of that size parses in well under 2 GB
_HEADER_ALLOWANCE = 64 << 10
ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_ITEM_BYTES = ITEM_BYTES


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


def manifest_bytes(manifest: dict) -> bytes:
    """The manifest as written, after the same schema check every reader applies: a writer never
    publishes what no reader would open (a NaN, a generation out of range, …)."""
    from .storage import json_bytes

    try:
        check_manifest(manifest, MANIFEST)
    except ZooError as exc:
        raise ZooError(exc.path, f"{exc.problem}; nothing was published") from None
    return json_bytes(manifest)


def file_digests(manifest: dict) -> dict[str, str]:
    """{file the manifest names: its sha256}."""
    digests = {rel: sha for rel, (sha, _) in anchor_files(manifest).items()}
    digests[manifest["basis_file"]] = manifest["basis_sha256"]
    for entry in manifest["adapters"]:
        digests[entry["file"]] = entry["file_sha256"]
        if entry.get("extras_file"):
            digests[entry["extras_file"]] = entry["extras_sha256"]
    return digests


def refuse_partial(path: Path, manifest: dict) -> None:
    """Writers and export need a whole zoo, not one part of a sharded merge."""
    shard = manifest.get("shard")
    if shard:
        raise ZooError(path, f"a partial zoo (shard {shard['index']}/{shard['count']}): join the parts with `sharecompress combine` first")


# The sha256 of manifests this process has parsed and found to be zoos: a replacement checks its
# target three times (before the compute, before the lock, under it), and a 1,000-adapter manifest
# takes a second to parse but a few hundredths to read and hash. Its bytes are read every time: a
# file's stat does not prove it unchanged (writes through a mapping, or within one tick of a
# coarse clock, keep its mtime and ctime; a review rewrote a manifest so and it was replaced).
_ZOO_MANIFESTS: set[bytes] = set()


def replaceable_zoo(target: Path) -> None:
    """Accept ``target`` for ``--force`` replacement only when it is an empty directory, or a zoo
    (a manifest with the format marker, valid or not) holding nothing but the files the tool
    writes; refuse anything else."""
    if os.path.islink(target):
        raise ZooError(target, "is a symbolic link; refusing to replace it")
    if not os.path.isdir(target):
        raise ZooError(target, "exists and is not a directory; refusing to replace it")
    with Dir.open(target, follow=False) as root:
        lock = root.lstat(LOCK)
        ours = lock is not None and stat.S_ISREG(lock.st_mode) and lock.st_size == 0  # the empty lock a writer makes
        if not [n for n in root.names() if not (n == LOCK and ours)]:
            return
        if root.lstat(MANIFEST) is None:
            raise ZooError(target, "exists and is not a sharecompress zoo (no manifest.json); refusing to replace it")
        try:  # the format marker is what makes it a zoo: a zoo whose fields are broken may still be replaced
            raw = root.read(MANIFEST, MAX_MANIFEST_BYTES)
            digest = hashlib.sha256(raw).digest()
            marked = {"format": FORMAT} if digest in _ZOO_MANIFESTS else jsonio.loads(raw, allow_infinity=True)
        except (ShareError, jsonio.JSONProblem) as exc:
            raise ZooError(target, f"exists and is not a sharecompress zoo ({getattr(exc, 'problem', exc)}); refusing to replace it") from None
        if not isinstance(marked, dict) or marked.get("format") != FORMAT:
            raise ZooError(target, "exists and is not a sharecompress zoo (its manifest.json is not one); refusing to replace it")
        _ZOO_MANIFESTS.add(digest)
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
                if mod.get("residual"):
                    total += sum(modules[m]["shape"]) * mod["residual"] * item + 2 * (len(m) + 164)
            return total
    for rel, anchor in anchor_files(manifest).items():
        if rel == relative:
            return anchor[1]  # an earlier generation's file: its size was recorded when it was written
    raise ZooError(relative, "is not named by the manifest")


def basis_bytes(manifest: dict) -> int:
    """Bytes of the shared bases, as the manifest sizes them."""
    item = ITEM_BYTES[manifest.get("dtype", "float32")]
    return item * sum(info["shape"][0] * side_ks(info)[0] + info["shape"][1] * side_ks(info)[1] for info in manifest["modules"].values())


def adapter_bytes(manifest: dict, entry: dict) -> tuple[int, int]:
    """(bytes of the adapter's cores, bytes of its private residuals), as the manifest sizes them."""
    item = ITEM_BYTES[manifest.get("dtype", "float32")]
    modules = manifest["modules"]
    cores = sum(sum(side_ks(modules[m])) * mod["p"] for m, mod in entry["modules"].items())
    residual = sum(sum(modules[m]["shape"]) * mod.get("residual", 0) for m, mod in entry["modules"].items())
    return cores * item, residual * item


def stored_bytes(manifest: dict) -> int:
    """Bytes of the zoo's bases, cores and private residuals (what serving it needs; heads and anchors apart)."""
    return basis_bytes(manifest) + sum(sum(adapter_bytes(manifest, e)) for e in manifest["adapters"])


def anchor_bytes(manifest: dict) -> int:
    """Bytes of the earlier generations' files kept as anchors (the current ones are counted as the zoo)."""
    current = {manifest["basis_file"], *(e["file"] for e in manifest["adapters"])}
    return sum(size for rel, (_, size) in anchor_files(manifest).items() if rel not in current)


def anchor_files(manifest: dict) -> dict[str, tuple[str, int]]:
    """{earlier generation's file kept for tight bounds (``ops.anchors``): (sha256, bytes)}."""
    out = {rel: (a["sha256"], a["bytes"]) for rel, a in (manifest.get("anchors") or {}).items()}
    for entry in manifest["adapters"]:
        anchor = entry.get("anchor")
        if anchor:
            out[anchor["file"]] = (anchor["sha256"], anchor["bytes"])
    return out


def read_checked(path: Path, manifest: dict, relative: str, digest: str, root: Dir | None = None,
                 limit: int | None = None) -> SafetensorsFile:
    """Zoo file ``relative``, read once into memory, its sha256 checked before any tensor is parsed.

    Links are refused at every step (``confined``); a file larger than the manifest allows (or
    ``limit``: an anchor's recorded size) is refused before it is read. ZooError names the file and what is wrong.
    """
    full = path / relative
    opened = root if root is not None else Dir.open(path)
    try:
        where, leaf = open_relative(opened, relative)
        try:
            data = where.read(leaf, expected_bytes(manifest, relative) if limit is None else limit)
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


