"""``export``: one zoo adapter back to a standard adapter, in the key layout it came in.

ΔŴ = U E F Vᵀ is an ordinary LoRA of rank p: B (up) = U·E, A (down) = F·Vᵀ, with
alpha = r = p so that the scale is 1 in every layout. Modules with a smaller p are zero-padded
to the adapter's largest p, so the adapter has one r (which every serving engine reads).

- peft: a directory with adapter_model.safetensors and adapter_config.json.
- kohya, diffusers: one .safetensors file under the adapter's own key names, with alpha
  scalars (= r) where the source had them, and diffusers' ``lora_adapter_metadata`` rewritten
  to r = lora_alpha where it had one. An ``out`` ending in .safetensors is that file; any
  other ``out`` is a directory holding ``<name>.safetensors`` (kohya) or
  ``pytorch_lora_weights.safetensors`` (diffusers: what ``load_lora_weights(dir)`` reads).
"""

from __future__ import annotations

import json
import os
import warnings
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..io import formats
from ..io.confined import Dir
from ..errors import InputError, StorageError, ZooError
from ..io.safetensors_file import SafetensorsFile
from ..store.storage import hidden_name, publish_directory, remove_tree, safe_name, save_tensors, write_json
from ..store.manifest import MANIFEST, refuse_partial
from ..store.reader import ZooReader

EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def exported_config(entry: dict, base_model: str | None, r: int) -> dict:
    config = dict(entry.get("config") or {})
    for key in ("rank_pattern", "alpha_pattern"):
        config[key] = {}
    config.update(peft_type="LORA", r=r, lora_alpha=r, use_rslora=False, use_dora=False)
    if not config.get("target_modules"):
        config["target_modules"] = sorted({_own_module(m, mod).split(".")[-1] for m, mod in entry["modules"].items()})
    if base_model and not config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = base_model
    return config


def _own_module(module: str, mod: dict) -> str:
    """The module as the adapter itself names it (a mixed zoo may call it otherwise)."""
    parsed = formats.parse_key(mod.get("a_key", ""), "peft")
    return parsed.module if parsed is not None else module


def alpha_tensor(r: int, dtype: torch.dtype) -> torch.Tensor:
    """alpha = r as a scalar of the export dtype, or float32 where that dtype cannot hold r exactly."""
    value = torch.tensor(float(r), dtype=dtype)
    return value if float(value) == r else torch.tensor(float(r), dtype=torch.float32)


# Ranks a serving engine accepts (vLLM's ``max_lora_rank`` choices): ``export --profile``.
SERVE_RANKS = {"vllm": (8, 16, 32, 64, 128, 256, 320, 512)}


def adapter_rank(entry: dict) -> int:
    """The rank an export writes: the largest p, plus a module's private residual where it has one."""
    return max(1, max((m["p"] + m.get("residual", 0) for m in entry["modules"].values()), default=0))


def serving_rank(profile: str, entries: list[dict]) -> int:
    """One rank for every adapter exported together: the smallest the engine accepts that holds them all."""
    if profile not in SERVE_RANKS:
        raise ValueError(f"--profile {profile}: choose {', '.join(SERVE_RANKS)}")
    for entry in entries:
        if entry.get("layout", "peft") != "peft":
            raise ZooError(entry["name"], f"--profile {profile} writes PEFT adapters; this one is a {entry['layout']} adapter")
    need = max(adapter_rank(e) for e in entries)
    fits = [r for r in SERVE_RANKS[profile] if r >= need]
    if not fits:
        raise ZooError(entries[0]["name"], f"--profile {profile}: rank {need} is above the largest it serves ({SERVE_RANKS[profile][-1]})")
    return fits[0]


def adapter_tensors(zoo: ZooReader, name: str, dtype: torch.dtype = torch.float32, rank: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Tensors of one adapter under its own keys (LoRA factors rebuilt, alphas = r, extras verbatim) and its r.

    ``rank`` pads every module to that rank with zeros (a serving profile's one rank); else the
    adapter's largest p.
    """
    entry = zoo.adapter(name)
    bases, cores, residuals = zoo.bases(), zoo.cores(name), zoo.residuals(name)
    r = rank or adapter_rank(entry)
    tensors: dict[str, torch.Tensor] = {}
    for module, mod in entry["modules"].items():
        U, V = (t.to(torch.float64) for t in bases[module])
        E, F = (t.to(torch.float64) for t in cores[module])
        B = torch.zeros(U.shape[0], r, dtype=torch.float64)
        A = torch.zeros(r, V.shape[0], dtype=torch.float64)
        B[:, : E.shape[1]] = U @ E
        A[: F.shape[0]] = F @ V.T
        if module in residuals:  # the private residual's directions follow the shared ones
            RU, RV = (t.to(torch.float64) for t in residuals[module])
            B[:, E.shape[1] : E.shape[1] + RU.shape[1]] = RU
            A[F.shape[0] : F.shape[0] + RV.shape[1]] = RV.T
        b_shape = [mod["b_shape"][0], r, *mod["b_shape"][2:]]
        a_shape = [r, *mod["a_shape"][1:]]
        tensors[mod["b_key"]] = B.reshape(b_shape).to(dtype).contiguous()
        tensors[mod["a_key"]] = A.reshape(a_shape).to(dtype).contiguous()
        if mod.get("alpha_key"):
            tensors[mod["alpha_key"]] = alpha_tensor(r, dtype)
    tensors.update(zoo.extras(name))
    return tensors, r


def file_metadata(entry: dict, r: int) -> dict[str, str]:
    """The safetensors header metadata: diffusers' per-component LoraConfig, now r = lora_alpha."""
    metadata = {"format": "pt"}
    if entry.get("layout") == "diffusers" and entry.get("config"):
        flat = {}
        for component, settings in entry["config"].items():
            settings = dict(settings, r=r, lora_alpha=r, rank_pattern={}, alpha_pattern={}, use_rslora=False)
            flat.update({f"{component}.{key}": value for key, value in settings.items()})
        metadata[formats.DIFFUSERS_METADATA] = json.dumps(flat, indent=2, sort_keys=True)
    return metadata


def weights_name(entry: dict) -> str:
    """The file name inside an export directory: what each layout's loaders look for."""
    return formats.DIFFUSERS_WEIGHTS if entry.get("layout") == "diffusers" else f"{safe_name(entry['name'])}.safetensors"


PEFT_FILES = frozenset({"adapter_model.safetensors", "adapter_config.json"})


def _is_file_target(entry: dict, out: Path) -> bool:
    return entry.get("layout", "peft") != "peft" and out.suffix == ".safetensors"


def _own_files(entry: dict) -> frozenset[str]:
    """What an export directory of this adapter holds: all ``--force`` may replace."""
    return PEFT_FILES if entry.get("layout", "peft") == "peft" else frozenset({weights_name(entry)})


def check_target(zoo_path: Path, entry: dict, out: Path, force: bool) -> None:
    """Refuse a target that is, holds or lies inside the zoo, a link, or (with ``--force``) anything
    but what export itself writes: a regular ``.safetensors`` file, or a directory holding only an
    exported adapter's files."""
    real_out, real_zoo = Path(os.path.realpath(out.parent)) / out.name, Path(os.path.realpath(zoo_path))
    if real_out == real_zoo or real_zoo in real_out.parents or real_out in real_zoo.parents:
        raise ZooError(out, f"is, holds or lies inside the zoo {zoo_path}; export somewhere else")
    if not os.path.lexists(out):
        return
    if os.path.islink(out):
        raise ZooError(out, "is a symbolic link; refusing to replace it")
    if not force:
        raise ZooError(out, "already exists; pass --force to replace it")
    if _is_file_target(entry, out):
        if not stat.S_ISREG(os.lstat(out).st_mode):
            raise ZooError(out, "exists and is not a regular file; refusing to replace it")
        if any((folder / MANIFEST).exists() for folder in (out.parent, out.parent.parent)):
            raise ZooError(out, "lies in a sharecompress zoo; refusing to replace it")
        try:
            marked = "sharecompress" in SafetensorsFile(out).metadata
        except InputError:
            raise ZooError(out, "exists and is not a safetensors file; --force replaces only an exported adapter") from None
        if marked:
            raise ZooError(out, "is a file of a sharecompress zoo; refusing to replace it")
        return
    if not os.path.isdir(out):
        raise ZooError(out, "exists and is not a directory; --force replaces only an exported adapter")
    with Dir.open(out, follow=False) as where:
        others = [n for n in where.names() if n not in _own_files(entry) or not stat.S_ISREG(where.lstat(n).st_mode)]
    if others:
        raise ZooError(out, f"holds other files ({', '.join(others[:3])}); --force replaces only an exported adapter")


@dataclass
class _Staged:
    """One export written under a hidden name beside its target, waiting to be published."""

    parent: Dir
    name: str
    target: Path
    entry: dict
    is_dir: bool


Jobs = list[tuple[str, "str | os.PathLike"]]


def export_adapters(
    zoo: ZooReader, jobs: Jobs | Callable[[ZooReader], Jobs], dtype: str = "float32", force: bool = False,
    done: Callable[[str, Path], None] | None = None, profile: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[Path]:
    """Export each (adapter name, target): every target checked before any is written, every
    adapter written (from one generation of the zoo) before any is published.

    ``jobs`` may be a function of the zoo (``export --all``: every adapter the generation holds),
    asked again when a writer publishes a new generation meanwhile. ``profile`` ("vllm") writes
    what that engine loads: PEFT adapters of one rank from its set, zero-padded, alpha = r;
    ``warn`` hears of what it would still refuse (saved modules such as heads).
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype}: choose {', '.join(EXPORT_DTYPES)}")

    def plan_and_stage() -> list[_Staged]:
        refuse_partial(zoo.path, zoo.manifest)
        planned = [(name, Path(out)) for name, out in (jobs(zoo) if callable(jobs) else jobs)]
        seen: set[Path] = set()
        for name, out in planned:
            if out in seen:
                raise ZooError(out, "is the target of two exports")
            seen.add(out)
            check_target(zoo.path, zoo.adapter(name), out, force)
        rank = serving_rank(profile, [zoo.adapter(n) for n, _ in planned]) if profile else None
        return _stage_all(zoo, planned, EXPORT_DTYPES[dtype], rank)

    if profile is not None and profile not in SERVE_RANKS:
        raise ValueError(f"--profile {profile}: choose {', '.join(SERVE_RANKS)}")

    staged = zoo.consistent(plan_and_stage)
    if profile:
        for item in staged:
            if item.entry.get("extras"):
                (warn or warnings.warn)(f"{item.entry['name']}: saves whole modules ({', '.join(item.entry['extras'][:3])}); "
                                        f"{profile} serves LoRA weights only and refuses an adapter that carries them")
    published: list[Path] = []
    try:
        while staged:
            item = staged[0]
            replace = (lambda t, e=item.entry: check_target(zoo.path, e, t, True)) if force else None
            if item.is_dir:
                publish_directory(item.parent, item.name, item.target, replace, lock=False)
            else:
                _publish_file(item, replace)
            staged.pop(0).parent.close()
            published.append(item.target)
            if done:
                done(item.entry["name"], item.target)
    finally:
        for item in staged:  # not published (an error above): leave nothing behind
            _discard(item)
    return published


def _stage_all(zoo: ZooReader, jobs: list[tuple[str, Path]], dtype: torch.dtype, rank: int | None = None) -> list[_Staged]:
    staged: list[_Staged] = []
    try:
        for name, out in jobs:
            staged.append(_stage(zoo, zoo.adapter(name), out, dtype, rank))
    except BaseException:
        for item in staged:
            _discard(item)
        raise
    return staged


def _stage(zoo: ZooReader, entry: dict, out: Path, dtype: torch.dtype, rank: int | None = None) -> _Staged:
    try:
        return _stage_files(zoo, entry, out, dtype, rank)
    except StorageError as exc:  # name the target, not the hidden name it was being written under
        raise StorageError(out, exc.problem) from None


def _stage_files(zoo: ZooReader, entry: dict, out: Path, dtype: torch.dtype, rank: int | None = None) -> _Staged:
    tensors, r = adapter_tensors(zoo, entry["name"], dtype, rank)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(out.parent, exc.strerror or str(exc)) from None
    parent = Dir.open(out.parent)
    name = hidden_name(out, "tmp")
    if _is_file_target(entry, out):
        item = _Staged(parent, name, out, entry, False)
        try:
            save_tensors(parent, name, tensors, file_metadata(entry, r))
        except BaseException:
            parent.close()
            raise
        return item
    item = _Staged(parent, name, out, entry, True)
    try:
        with parent.sub(name, create=True) as folder:
            if entry.get("layout", "peft") == "peft":
                save_tensors(folder, "adapter_model.safetensors", tensors, {"format": "pt"})
                write_json(folder, "adapter_config.json", exported_config(entry, zoo.manifest.get("base_model"), r))
            else:
                save_tensors(folder, weights_name(entry), tensors, file_metadata(entry, r))
            folder.fsync()
    except BaseException:
        _discard(item)
        raise
    return item


def _publish_file(item: _Staged, replace: Callable[[Path], None] | None) -> None:
    leaf = item.target.name
    if item.parent.lstat(leaf) is not None:
        if replace is None:
            raise ZooError(item.target, "already exists; pass --force to replace it")
        replace(item.target)
    item.parent.replace(item.name, leaf)
    item.parent.fsync()


def _discard(item: _Staged) -> None:
    if item.is_dir:
        remove_tree(item.parent, item.name)
    else:
        item.parent.unlink(item.name, missing_ok=True)
    item.parent.close()


def export(zoo: ZooReader, name: str, out: str | os.PathLike, dtype: str = "float32", force: bool = False,
           profile: str | None = None) -> Path:
    """Write adapter ``name`` at ``out`` in its own layout (whole, or not at all); returns ``out``."""
    return export_adapters(zoo, [(name, out)], dtype=dtype, force=force, profile=profile)[0]
