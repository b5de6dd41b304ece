"""Turn what the user names on the command line into ``Adapter`` objects.

Sources are PEFT adapter directories, bare ``.safetensors`` files with PEFT key names, and
directories holding either. Only headers are read here: every structural problem (missing
pairs, rank disagreement, DoRA, pickles, bad configs) is found before any compute starts.
"""

from __future__ import annotations

import glob
import json
import math
import re
from pathlib import Path
from typing import Iterable

from .adapter import Adapter, LoraModule
from .errors import InputError
from .safetensors_file import SafetensorsFile

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
# Files a shell glob such as `adapters/*` sweeps up that are plainly not adapters.
IGNORED_SUFFIXES = frozenset({".md", ".txt", ".json", ".yaml", ".yml", ".png", ".jpg", ".html", ".csv"})

_LINEAR = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?$")
_NOT_LOW_RANK = {
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "lora_mid": "LoCon (lora_mid)",
    "oft_": "OFT",
    "lora_magnitude_vector": "DoRA",
}
_PEFT_PREFIX = "base_model.model."


def find_adapters(
    sources: Iterable[str], rank: int | None = None, alpha: float | None = None
) -> list[Adapter]:
    """Every adapter named by ``sources``, validated, with unique names."""
    adapters: list[Adapter] = []
    seen: dict[str, Adapter] = {}
    for path, kind in _expand(sources):
        adapter = read_peft_dir(path) if kind == "dir" else read_bare_file(path, rank, alpha)
        if adapter.name in seen:
            raise InputError(
                path, f"adapter name {adapter.name!r} is used twice (also {seen[adapter.name].source})"
            )
        seen[adapter.name] = adapter
        adapters.append(adapter)
    if not adapters:
        raise InputError(" ".join(sources) or "(no sources)", "no adapters found")
    return adapters


def _expand(sources: Iterable[str]) -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            matches = sorted(glob.glob(source)) if any(c in source for c in "*?[") else []
            if not matches:
                raise InputError(source, "no such file or directory")
            for match in matches:
                found.extend(_classify(Path(match)))
            continue
        found.extend(_classify(path))
    return found


def _is_adapter_dir(path: Path) -> bool:
    return (path / PEFT_CONFIG).is_file() or (path / PEFT_WEIGHTS).is_file() or any(
        (path / f"adapter_model{s}").is_file() for s in PICKLE_SUFFIXES
    )


def _classify(path: Path) -> list[tuple[Path, str]]:
    """An adapter dir, a weights file, or a directory of those (one level down)."""
    if path.is_dir():
        if (path / "manifest.json").is_file() and (path / "basis.safetensors").exists():
            raise InputError(path, "this is a sharecompress zoo, not an adapter")
        if _is_adapter_dir(path):
            return [(path, "dir")]
        children: list[tuple[Path, str]] = []
        for child in sorted(path.iterdir()):
            if child.is_dir() and _is_adapter_dir(child):
                children.append((child, "dir"))
            elif child.is_file() and child.suffix in PICKLE_SUFFIXES | {".safetensors"}:
                children.extend(_classify(child))
        if not children:
            raise InputError(path, "empty directory: no PEFT adapter directories or .safetensors files in it")
        return children
    if path.suffix in PICKLE_SUFFIXES:
        raise InputError(
            path, "pickle checkpoints are refused (never unpickled); convert the adapter to .safetensors"
        )
    if path.suffix.lower() in IGNORED_SUFFIXES:
        return []  # READMEs and configs swept up by `adapters/*`; never adapters themselves
    return [(path, "file")]


def read_peft_dir(path: Path) -> Adapter:
    weights = path / PEFT_WEIGHTS
    if not weights.is_file():
        pickles = [p.name for p in path.glob("adapter_model*") if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise InputError(
                path / pickles[0],
                "pickle checkpoints are refused (never unpickled); convert the adapter to .safetensors",
            )
        raise InputError(path, f"no {PEFT_WEIGHTS} in this adapter directory")
    config_path = path / PEFT_CONFIG
    config = load_config(config_path) if config_path.exists() else None
    if config is None:
        raise InputError(path, f"no {PEFT_CONFIG} in this adapter directory")
    return parse_adapter(path.name, path, SafetensorsFile(weights), config, config_path)


def read_bare_file(path: Path, rank: int | None, alpha: float | None) -> Adapter:
    sibling = path.parent / PEFT_CONFIG
    if sibling.is_file():
        config = load_config(sibling)
        config_path: Path | None = sibling
    else:
        if alpha is None:
            raise InputError(path, f"no {PEFT_CONFIG} beside this file: pass --alpha (and --rank) for it")
        config = {"lora_alpha": alpha, "peft_type": "LORA"}
        if rank is not None:
            config["r"] = rank
        config_path = None
    name = path.parent.name if path.stem == "adapter_model" else path.stem
    return parse_adapter(name, path, SafetensorsFile(path), config, config_path)


def load_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(path, f"cannot read adapter config: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"adapter config is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(path, "adapter config is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise InputError(path, f"peft_type {peft_type!r} is not LoRA")
    if config.get("use_dora"):
        raise InputError(path, "DoRA adapters are not supported: their magnitude vector needs the base weights")
    r = config.get("r")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
        raise InputError(path, f"adapter config has an invalid r: {r!r}")
    lora_alpha = config.get("lora_alpha")
    if lora_alpha is not None and (
        not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not math.isfinite(lora_alpha)
    ):
        raise InputError(path, f"adapter config has an invalid lora_alpha: {lora_alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise InputError(path, f"adapter config has an invalid {key}: not an object")
    return config


def _pattern_value(patterns: dict | None, module: str, default: object) -> object:
    """PEFT's rule: the first pattern key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: dict, module: str, tensor_rank: int, config_path: object) -> float:
    """s = alpha / r (or alpha / sqrt(r) with rsLoRA), honouring rank/alpha patterns."""
    short = module[len(_PEFT_PREFIX):] if module.startswith(_PEFT_PREFIX) else module
    r = _pattern_value(config.get("rank_pattern"), short, config.get("r", tensor_rank))
    if r != tensor_rank:
        raise InputError(
            config_path, f"config gives r={r} for module {short!r} but its tensors have rank {tensor_rank}"
        )
    alpha = _pattern_value(config.get("alpha_pattern"), short, config.get("lora_alpha"))
    if alpha is None:
        raise InputError(config_path, "adapter config has no lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise InputError(config_path, f"invalid alpha {alpha!r} for module {short!r}")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def parse_adapter(
    name: str, source: Path, file: SafetensorsFile, config: dict, config_path: Path | None
) -> Adapter:
    """Pair lora_A/lora_B keys into modules; everything else is an extra kept verbatim."""
    where = config_path or file.path
    pairs: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    extras: list[str] = []
    for key in file.tensors:
        for marker, label in _NOT_LOW_RANK.items():
            if marker in key:
                raise InputError(file.path, f"{label} tensors ({key!r}) are not plain low-rank LoRA: refused")
        if ".lora_down." in key or ".lora_up." in key:
            raise InputError(file.path, f"kohya-style keys ({key!r}) are not supported yet")
        match = _LINEAR.match(key) or _EMBEDDING.match(key)
        if match is None:
            extras.append(key)
            continue
        module = match["module"]
        pairs.setdefault(module, {})[match["side"]] = key
        kinds[module] = "embedding" if "lora_embedding_" in key else "linear"
    if not pairs:
        raise InputError(file.path, "no LoRA tensors (lora_A / lora_B) in this file")
    modules: dict[str, LoraModule] = {}
    for module, sides in sorted(pairs.items()):
        for side, other in (("A", "B"), ("B", "A")):
            if side not in sides:
                raise InputError(file.path, f"module {module!r} has lora_{other} but no lora_{side}")
        a, b = file.tensors[sides["A"]], file.tensors[sides["B"]]
        for t in (a, b):
            if not t.is_float:
                raise InputError(file.path, f"tensor {t.name!r} has integer dtype {t.dtype}; LoRA factors must be float")
        modules[module] = _module_from_shapes(module, a, b, kinds[module], config, where, file.path)
    return Adapter(name=name, source=str(source), file=file, modules=modules, extras=extras, config=config)


def _module_from_shapes(module, a, b, kind, config, config_path, file_path) -> LoraModule:
    a_shape, b_shape = a.shape, b.shape
    if kind == "embedding" or len(a_shape) == 2:
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise InputError(file_path, f"module {module!r}: lora factors must be matrices, got {a_shape} and {b_shape}")
    elif len(a_shape) == 4:
        if len(b_shape) != 4 or b_shape[2:] != (1, 1):
            raise InputError(file_path, f"module {module!r}: conv lora_B must be [out, r, 1, 1], got {list(b_shape)}")
    else:
        raise InputError(file_path, f"module {module!r}: unsupported lora_A shape {list(a_shape)}")
    rank_a, rank_b = a_shape[0], b_shape[1]
    if rank_a != rank_b:
        raise InputError(file_path, f"module {module!r}: lora_A has rank {rank_a} but lora_B has rank {rank_b}")
    if rank_a == 0:
        raise InputError(file_path, f"module {module!r}: rank 0")
    d = 1
    for s in a_shape[1:]:
        d *= s
    n = b_shape[0]
    scale = module_scale(config, module, rank_a, config_path)
    dtype = a.dtype if a.dtype == b.dtype else "mixed"
    return LoraModule(module, a.name, b.name, rank_a, n, d, scale, tuple(a_shape), tuple(b_shape), dtype)
