"""The manifest's schema: every field the tool reads, checked for type and range on open.

A manifest may come from anyone (a shared artifact store, a stranger's upload), and every
later step trusts it: file names become paths, shapes become allocations, k and p become
slices. One bad field is one line naming it (``adapters[3].modules['q'].p: …``), never a
traceback and never a read outside the zoo.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import ZooError
from ..io.formats import LAYOUTS
from ..io.names import name_problem
from .zoo_files import is_data_path

MAX_DIM = 1 << 31
MAX_GENERATION = 10**12 - 1  # the file names' .g<N> tags have at most 12 digits
MAX_KEY_CHARS = 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
STORE_DTYPES = ("float32", "float16", "bfloat16")
from ..core import METHODS


class _Bad(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def _int(value: Any, field: str, lo: int = 0, hi: int = MAX_DIM) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad(field, f"must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise _Bad(field, f"must be between {lo} and {hi}, got {value}")
    return value


def _num(value: Any, field: str, lo: float | None = 0.0, finite: bool = True) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Bad(field, f"must be a number, got {_show(value)}")
    if math.isnan(value) or (finite and math.isinf(value)):
        raise _Bad(field, f"must be finite, got {value}")
    if lo is not None and value < lo:
        raise _Bad(field, f"must be at least {lo:g}, got {value}")
    return float(value)


def _str(value: Any, field: str, limit: int = MAX_KEY_CHARS) -> str:
    if not isinstance(value, str):
        raise _Bad(field, f"must be a string, got {_show(value)}")
    if len(value) > limit or "\x00" in value:
        raise _Bad(field, f"must be a string of at most {limit} characters without NUL")
    return value


def _sha(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise _Bad(field, "must be a sha256 digest (64 lowercase hex digits); every zoo file needs its checksum")
    return value


def _obj(value: Any, field: str, kind: type = dict) -> Any:
    if not isinstance(value, kind):
        raise _Bad(field, f"must be a JSON {'object' if kind is dict else 'array'}, got {_show(value)}")
    return value


def _shape(value: Any, field: str, length: int | None = None) -> list[int]:
    _obj(value, field, list)
    if (length is not None and len(value) != length) or not 1 <= len(value) <= 8:
        raise _Bad(field, f"must list {length or 'up to 8'} dimensions, got {_show(value)}")
    for i, dim in enumerate(value):
        _int(dim, f"{field}[{i}]", 1)
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _choice(value: Any, field: str, choices: tuple) -> Any:
    if value not in choices:
        raise _Bad(field, f"must be one of {', '.join(map(str, choices))}, got {_show(value)}")
    return value


def check_manifest(manifest: dict, where: object) -> None:
    """Raise ZooError(where, "field …: problem") for the first field that is not as the tool writes it."""
    try:
        _check(manifest)
    except _Bad as exc:
        raise ZooError(where, f"invalid manifest: {exc}") from None


def _check(m: dict) -> None:
    _int(m.get("generation"), "generation", 1, MAX_GENERATION)
    for key in ("created", "updated", "tool_version"):
        if m.get(key) is not None:
            _str(m[key], key, 64)
    if not is_data_path(m["basis_file"]) or m["basis_file"].startswith("adapters/"):
        raise _Bad("basis_file", f"must be a basis file name of this zoo (basis[.gN].safetensors), got {_show(m['basis_file'])}")
    _sha(m.get("basis_sha256"), "basis_sha256")
    _choice(m.get("dtype", "float32"), "dtype", STORE_DTYPES)
    _choice(m.get("method", "share"), "method", METHODS)
    for key in ("sweeps", "p"):
        if m.get(key) is not None:
            _int(m[key], key, 0 if key == "sweeps" else 1)
    if m.get("k_rule") is not None:
        rule = _obj(m["k_rule"], "k_rule")
        if rule.get("k") is not None:
            _int(rule["k"], "k_rule.k", 1)
        if rule.get("energy") is not None:
            _num(rule["energy"], "k_rule.energy", 0.0)
        if rule.get("budget") is not None:
            _int(rule["budget"], "k_rule.budget", 1)
    if m.get("max_error") is not None:
        _num(m["max_error"], "max_error", 0.0)
    if m.get("shard") is not None:
        shard = _obj(m["shard"], "shard")
        count = _int(shard.get("count"), "shard.count", 1, 1 << 20)
        _int(shard.get("index"), "shard.index", 1, count)
    if m.get("shard_modules") is not None:
        _int(m["shard_modules"], "shard_modules", 0, 1 << 40)
    if m.get("base_model") is not None:
        _str(m["base_model"], "base_model")
    modules = m["modules"]
    for name, info in modules.items():
        _check_module(name, info)
    anchors = _obj(m.get("anchors", {}), "anchors")
    for rel, anchor in anchors.items():
        field = f"anchors[{_show(rel)}]"
        if not is_data_path(rel) or rel.startswith("adapters/"):
            raise _Bad(field, "must name a basis file of this zoo (basis[.gN].safetensors)")
        _obj(anchor, field)
        _sha(anchor.get("sha256"), f"{field}.sha256")
        _int(anchor.get("bytes"), f"{field}.bytes", 0, 1 << 50)
        if rel == m["basis_file"] and anchor["sha256"] != m["basis_sha256"]:
            raise _Bad(f"{field}.sha256", "differs from basis_sha256 for the same file")
    names: set[str] = set()
    files: set[str] = {m["basis_file"], *anchors}
    for i, entry in enumerate(m["adapters"]):
        _check_adapter(i, _obj(entry, f"adapters[{i}]"), modules, names, files, anchors)


def _check_module(name: str, info: Any) -> None:
    field = f"modules[{name!r}]"
    _str(name, field)
    if not name:
        raise _Bad(field, "a module name must not be empty")
    _obj(info, field)
    n, d = _shape(info.get("shape"), f"{field}.shape", 2)
    ku = _int(info.get("k_u"), f"{field}.k_u", 0, n)
    kv = _int(info.get("k_v"), f"{field}.k_v", 0, d)
    if _int(info.get("k"), f"{field}.k", 0, max(n, d)) != max(ku, kv):
        raise _Bad(f"{field}.k", f"must be max(k_u, k_v) = {max(ku, kv)}, got {info['k']}")
    _int(info.get("adapters", 0), f"{field}.adapters", 0, 1 << 40)
    _int(info.get("sweeps", 0), f"{field}.sweeps", 0, 1 << 20)
    if info.get("p") is not None:
        _int(info["p"], f"{field}.p", 1, max(n, d))
    for key in ("energy_total", "energy_kept"):
        _num(info.get(key), f"{field}.{key}", None)
    curve = _obj(info.get("energy_curve", []), f"{field}.energy_curve", list)
    for j, value in enumerate(curve):
        _num(value, f"{field}.energy_curve[{j}]", None)


def _check_adapter(i: int, entry: dict, modules: dict, names: set[str], files: set[str], anchors: dict) -> None:
    field = f"adapters[{i}]"
    name = entry.get("name")
    problem = name_problem(name)
    if problem:
        raise _Bad(f"{field}.name", f"{_show(name)} {problem}")
    if name in names:
        raise _Bad(f"{field}.name", f"{name!r} appears twice")
    names.add(name)
    field = f"adapters[{name!r}]"
    for key, sha_key, required in (("file", "file_sha256", True), ("extras_file", "extras_sha256", False)):
        rel = entry.get(key)
        if rel is None and not required:
            continue
        if not is_data_path(rel) or not rel.startswith("adapters/"):
            raise _Bad(f"{field}.{key}", f"must be a file name under adapters/ that this zoo writes, got {_show(rel)}")
        if rel in files:
            raise _Bad(f"{field}.{key}", f"{rel!r} is named twice in the manifest")
        files.add(rel)
        _sha(entry.get(sha_key), f"{field}.{sha_key}")
    if entry.get("anchor") is not None:
        anchor = _obj(entry["anchor"], f"{field}.anchor")
        if anchor.get("basis_file") not in anchors:
            raise _Bad(f"{field}.anchor.basis_file", f"must be one of the manifest's anchors, got {_show(anchor.get('basis_file'))}")
        rel = anchor.get("file")
        if not is_data_path(rel) or not rel.startswith("adapters/"):
            raise _Bad(f"{field}.anchor.file", f"must be a file name under adapters/ that this zoo writes, got {_show(rel)}")
        _sha(anchor.get("sha256"), f"{field}.anchor.sha256")
        _int(anchor.get("bytes"), f"{field}.anchor.bytes", 0, 1 << 50)
        if rel == entry.get("file"):
            if anchor["sha256"] != entry.get("file_sha256"):
                raise _Bad(f"{field}.anchor.sha256", "differs from file_sha256 for the same file")
        elif rel in files:
            raise _Bad(f"{field}.anchor.file", f"{rel!r} is named twice in the manifest")
        else:
            files.add(rel)
    _int(entry.get("rank"), f"{field}.rank", 1)
    _int(entry.get("bytes_original"), f"{field}.bytes_original", 0, 1 << 50)
    _choice(entry.get("layout", "peft"), f"{field}.layout", LAYOUTS)
    for key in ("source", "sha256", "added"):
        _str(entry.get(key), f"{field}.{key}", 8192)
    if not isinstance(entry.get("exact"), bool):
        raise _Bad(f"{field}.exact", f"must be true or false, got {_show(entry.get('exact'))}")
    dtypes = _obj(entry.get("source_dtype", []), f"{field}.source_dtype", list)
    for j, value in enumerate(dtypes):
        _str(value, f"{field}.source_dtype[{j}]", 16)
    if entry.get("config") is not None:
        _obj(entry["config"], f"{field}.config")
    extras = _obj(entry.get("extras", []), f"{field}.extras", list)
    for j, key in enumerate(extras):
        _str(key, f"{field}.extras[{j}]")
    if extras and not entry.get("extras_file"):
        raise _Bad(f"{field}.extras", "lists tensors but the adapter has no extras_file")
    _int(entry.get("bytes_extras", 0), f"{field}.bytes_extras", 0, 1 << 50)
    for key in ("relative_error", "error_bound", "merge_error", "drift"):
        _num(entry.get(key), f"{field}.{key}", 0.0, finite=False)
    _num(entry.get("norm2"), f"{field}.norm2", 0.0)
    ps = [0]
    for module, mod in _obj(entry.get("modules"), f"{field}.modules").items():
        ps.append(_check_adapter_module(f"{field}.modules[{module!r}]", module, _obj(mod, f"{field}.modules[{module!r}]"), modules))
    if _int(entry.get("p"), f"{field}.p", 0, MAX_DIM) != max(ps):
        raise _Bad(f"{field}.p", f"must be the largest p of its modules ({max(ps)}), got {entry['p']}")


def _check_adapter_module(field: str, module: str, mod: dict, modules: dict) -> int:
    """Checks one adapter's entry for one module; returns its p."""
    if module not in modules:
        raise _Bad(field, "is not one of the manifest's modules")
    info = modules[module]
    ku, kv = info["k_u"], info["k_v"]
    p = _int(mod.get("p"), f"{field}.p", 0, min(ku, kv))
    if mod.get("residual") is not None:
        _int(mod["residual"], f"{field}.residual", 0, min(info["shape"]))
    _int(mod.get("rank"), f"{field}.rank", 1)
    _num(mod.get("scale"), f"{field}.scale", None)
    for key in ("err2", "norm2", "drift"):
        _num(mod.get(key), f"{field}.{key}", 0.0)
    if mod.get("bound2") is not None:
        _num(mod["bound2"], f"{field}.bound2", 0.0)
    if mod.get("err_parts") is not None:
        parts = _obj(mod["err_parts"], f"{field}.err_parts", list)
        if len(parts) != 4:
            raise _Bad(f"{field}.err_parts", f"must list 4 numbers, got {_show(parts)}")
        for j, value in enumerate(parts):
            _num(value, f"{field}.err_parts[{j}]", 0.0)
    if mod.get("held_out_err2") is not None:
        _num(mod["held_out_err2"], f"{field}.held_out_err2", 0.0)
    if mod.get("init_cosine") is not None and _num(mod["init_cosine"], f"{field}.init_cosine", -1.0) > 1.0:
        raise _Bad(f"{field}.init_cosine", f"must be a cosine, at most 1, got {mod['init_cosine']}")
    for key in ("a_key", "b_key"):
        _str(mod.get(key), f"{field}.{key}")
    if mod.get("alpha_key") is not None:
        _str(mod["alpha_key"], f"{field}.alpha_key")
    a_shape, b_shape = _shape(mod.get("a_shape"), f"{field}.a_shape"), _shape(mod.get("b_shape"), f"{field}.b_shape")
    n, d = info["shape"]
    fits = (
        len(a_shape) == len(b_shape) and len(a_shape) in (2, 4) and a_shape[0] == b_shape[1]
        and b_shape[0] == n and math.prod(b_shape[2:]) == 1 and math.prod(a_shape[1:]) == d
    )
    if not fits:
        raise _Bad(field, f"a_shape {a_shape} and b_shape {b_shape} are not a LoRA pair of the module's shape [{n}, {d}]")
    return p
