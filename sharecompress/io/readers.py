"""Turn what the user names on the command line into ``Adapter`` objects.

Sources are PEFT adapter directories, bare ``.safetensors`` files (PEFT, kohya or diffusers
key layouts, see ``formats``), and directories holding either. Only headers (and kohya /
diffusers alpha scalars) are read here: every structural problem (missing pairs, rank
disagreement, DoRA, pickles, bad configs) is found before any compute starts.
"""

from __future__ import annotations

import glob
import math
import re

try:  # the regex parser the re module itself uses (its name changed in Python 3.11)
    import re._parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from ..errors import InputError, ShareError
from . import formats, jsonio
from .adapter import Adapter, LoraModule
from .confined import read_regular
from .formats import PEFT_CONFIG, PEFT_WEIGHTS, PICKLE_SUFFIXES
from .hub import HubSnapshot, resolve_hub_source
from .names import name_problem
from .safetensors_file import SafetensorsFile

# Files a shell glob such as `adapters/*` sweeps up that are plainly not adapters.
IGNORED_SUFFIXES = frozenset({".md", ".txt", ".json", ".yaml", ".yml", ".png", ".jpg", ".html", ".csv"})

# Tensors of formats that are not plain low-rank LoRA (PEFT and LyCORIS / sd-scripts names).
_NOT_LOW_RANK = {
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "lora_mid": "LoCon (lora_mid)",
    "oft_": "OFT",
    "lora_magnitude_vector": "DoRA",
    "dora_scale": "DoRA",
    "glora_": "GLoRA",
    ".on_input": "IA3",
}
_NOT_LOW_RANK_SUFFIXES = {".diff": "LyCORIS full-weight (diff)", ".diff_b": "LyCORIS full-weight (diff)"}
_PEFT_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 16 << 20
# |scale| beyond this overflows float32 cores (√s · UᵀB) long before it is a real adapter.
MAX_SCALE = 1e8


def find_adapters(
    sources: Iterable[str],
    rank: int | None = None,
    alpha: float | None = None,
    layout: str = "auto",
    known: dict[str, str] | None = None,
) -> list[Adapter]:
    """Every adapter named by ``sources``, validated, with unique names.

    ``layout`` (auto, peft, kohya, diffusers) overrides key-layout detection. Modules are named
    as ``known`` (a zoo's {module: layout}) or the first adapter holding them names them, so
    that one module read through different layouts is one module (``formats.align_modules``).
    """
    formats.check_layout(layout)
    adapters: list[Adapter] = []
    seen: dict[str, Adapter] = {}
    for path, kind in _expand(sources):
        if kind == "hub":
            adapter = replace(read_peft_dir(path.path, layout), name=path.name, source=path.source)
        else:
            adapter = read_peft_dir(path, layout) if kind == "dir" else read_bare_file(path, rank, alpha, layout)
        problem = name_problem(adapter.name)
        if problem:
            raise InputError(path, f"adapter name {adapter.name!r} {problem}: rename the file or directory")
        if adapter.name in seen:
            raise InputError(
                path, f"adapter name {adapter.name!r} is used twice (also {seen[adapter.name].source})"
            )
        seen[adapter.name] = adapter
        adapters.append(adapter)
    if not adapters:
        raise InputError(" ".join(sources) or "(no sources)", "no adapters found")
    formats.align_modules(adapters, known)
    return adapters


def _expand(sources: Iterable[str]) -> list[tuple[Path | HubSnapshot, str]]:
    """(path, kind) per adapter; a Hub id comes as (HubSnapshot, "hub"). Local paths win over ids."""
    found: list[tuple[Path | HubSnapshot, str]] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            snapshot = resolve_hub_source(source)  # None unless it reads as owner/name[@revision]
            if snapshot is not None:
                found.append((snapshot, "hub"))
                continue
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
            elif child.is_dir() and (child / formats.DIFFUSERS_WEIGHTS).is_file():
                children.append((child / formats.DIFFUSERS_WEIGHTS, "file"))  # a diffusers LoRA dir
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


def read_peft_dir(path: Path, layout: str = "auto") -> Adapter:
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
    file = SafetensorsFile(weights)
    _refuse_not_low_rank(file)
    found = formats.detect(file.tensors, file.path, layout, has_config=True)
    return parse_adapter(path.name, path, file, config, config_path, found)


def read_bare_file(path: Path, rank: int | None, alpha: float | None, layout: str = "auto") -> Adapter:
    """A lone weights file; kohya and diffusers files carry their alphas, PEFT ones need a config."""
    sibling = path.parent / PEFT_CONFIG
    name = path.parent.name if path.stem in ("adapter_model", Path(formats.DIFFUSERS_WEIGHTS).stem) else path.stem
    file = SafetensorsFile(path)
    _refuse_not_low_rank(file)  # LoHa & co. are named before anything asks for a config
    peft_config = sibling.is_file() or alpha is not None  # --alpha: plain lora_A/lora_B keys are PEFT's
    found = formats.detect(file.tensors, file.path, layout, has_config=peft_config)
    if found != "peft":
        return parse_adapter(name, path, file, {}, None, found)
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
    return parse_adapter(name, path, file, config, config_path)


def load_config(path: Path) -> dict:
    """An adapter_config.json: a regular file of at most 16 MiB holding bounded JSON."""
    try:
        raw = read_regular(path, MAX_CONFIG_BYTES)
    except ShareError as exc:
        raise InputError(path, f"cannot read adapter config: {getattr(exc, 'problem', exc)}") from None
    try:
        config = jsonio.loads(raw)
    except jsonio.JSONProblem as exc:
        raise InputError(path, f"adapter config is not usable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(path, "adapter config is not a JSON object")
    return check_config(config, path)


def check_config(config: dict, path: object, what: str = "adapter config") -> dict:
    """A LoraConfig dict (PEFT's adapter_config.json, or diffusers' metadata) that can be used."""
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise InputError(path, f"peft_type {peft_type!r} is not LoRA")
    if config.get("use_dora"):
        raise InputError(path, "DoRA adapters are not supported: their magnitude vector needs the base weights")
    r = config.get("r")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
        raise InputError(path, f"{what} has an invalid r: {r!r}")
    lora_alpha = config.get("lora_alpha")
    if lora_alpha is not None and (
        not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not math.isfinite(lora_alpha)
    ):
        raise InputError(path, f"{what} has an invalid lora_alpha: {lora_alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise InputError(path, f"{what} has an invalid {key}: not an object")
        if len(config.get(key) or {}) > MAX_PATTERNS:
            raise InputError(path, f"{what} has {len(config[key])} {key} keys (at most {MAX_PATTERNS})")
        for pattern, value in (config.get(key) or {}).items():
            problem = pattern_problem(pattern)
            if problem:
                raise InputError(path, f"{what}: {key} key {pattern[:80]!r} {problem}")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or (key == "rank_pattern" and (value != int(value) or value <= 0)):
                raise InputError(path, f"{what}: {key}[{pattern[:80]!r}] is {value!r}, not a {'rank' if key == 'rank_pattern' else 'finite alpha'}")
    return config


_REPEATS = {name for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")}
MAX_PATTERNS = 256
MAX_MODULE_CHARS = 1000


def pattern_problem(pattern: str) -> str | None:
    """Why a rank/alpha_pattern key (a regex, as PEFT reads it) is refused, or None.

    Refused: what does not compile, back-references, and a repeated group that itself repeats
    or branches (``(a+)+``, ``(a|a)*``): the shapes whose matching time explodes on a crafted
    module name. The patterns PEFT writes (module names, ``layers.0.*q_proj``) pass.
    """
    if len(pattern) > 1000:
        return "is longer than 1000 characters"
    try:
        re.compile(pattern)
        parsed = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"is not a valid regular expression ({exc})"

    unbounded = [0]

    def walk(items, inside_repeat: bool) -> str | None:
        for op, arg in items:
            name = str(op)
            if name in ("GROUPREF", "GROUPREF_EXISTS"):
                return "uses a back-reference"
            if name in _REPEATS:
                low, high, body = arg
                if inside_repeat and high != 0:
                    return "repeats a group that repeats (catastrophic backtracking)"
                if high == _sre_parse.MAXREPEAT:
                    unbounded[0] += 1
                    if unbounded[0] > 1:
                        return "has more than one unbounded repeat (*, +): its matching time grows too fast"
                found = walk(body, inside_repeat or high > 1)
                if found:
                    return found
            elif name == "BRANCH":
                if inside_repeat:
                    return "repeats a choice of branches (catastrophic backtracking)"
                for branch in arg[1]:
                    found = walk(branch, inside_repeat)
                    if found:
                        return found
            elif name == "SUBPATTERN":
                found = walk(arg[-1], inside_repeat)
                if found:
                    return found
            elif name in ("ASSERT", "ASSERT_NOT"):
                found = walk(arg[1], inside_repeat)
                if found:
                    return found
            elif name == "ATOMIC_GROUP":
                found = walk(arg, inside_repeat)
                if found:
                    return found
        return None

    return walk(parsed, False)


def _pattern_value(patterns: dict | None, module: str, default: object) -> object:
    r"""PEFT's rule, ``re.match(rf"(.*\.)?({key})$", module)``: the first key that matches the whole
    name or a part of it after a dot. Tried on each such part with ``fullmatch``, which means the
    same without the leading ``(.*\.)?`` and its backtracking."""
    if not patterns:
        return default
    parts = module.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    for key, value in patterns.items():
        compiled = re.compile(key)
        if any(compiled.fullmatch(s) for s in suffixes):
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
    name: str,
    source: Path,
    file: SafetensorsFile,
    config: dict,
    config_path: Path | None,
    layout: str = "peft",
) -> Adapter:
    """Pair each module's A (down) and B (up) keys under ``layout``; other tensors are extras kept verbatim.

    kohya / diffusers alpha scalars are consumed into the scale (export writes them back), not kept as extras.
    The callers (``read_peft_dir``, ``read_bare_file``) have already refused non-low-rank formats.
    """
    names = formats.SIDE_NAMES[layout]
    pairs, kinds, extras = _pair_keys(file, layout)
    if not pairs:
        raise InputError(file.path, f"no LoRA tensors ({names[0]} / {names[1]}) in this file")
    if layout == "diffusers":
        config = formats.diffusers_configs(file.metadata, file.path)
        for component, settings in config.items():
            check_config(settings, file.path, f"{formats.DIFFUSERS_METADATA} for {component!r}")
    alphas = {formats.alpha_key(m, layout) for m in pairs} & set(file.tensors) if layout != "peft" else set()
    extras = [key for key in extras if key not in alphas]
    modules: dict[str, LoraModule] = {}
    for module, sides in sorted(pairs.items()):
        if len(module) > MAX_MODULE_CHARS:
            raise InputError(file.path, f"module name {module[:60]!r}… is {len(module)} characters long (at most {MAX_MODULE_CHARS})")
        for side, other in ((0, 1), (1, 0)):
            if "AB"[side] not in sides:
                raise InputError(file.path, f"module {module!r} has {names[other]} but no {names[side]}")
        a, b = file.tensors[sides["A"]], file.tensors[sides["B"]]
        for t in (a, b):
            if not t.is_float:
                raise InputError(file.path, f"tensor {t.name!r} has integer dtype {t.dtype}; LoRA factors must be float")
        rank, n, d = _check_shapes(module, a, b, kinds[module], file.path, names)
        alpha_key = formats.alpha_key(module, layout)
        alpha_key = alpha_key if alpha_key in alphas else None
        scale = _scale(layout, module, rank, config, config_path or file.path, file, alpha_key)
        if not (math.isfinite(scale) and abs(scale) <= MAX_SCALE):
            where = alpha_key or "lora_alpha"
            raise InputError(
                config_path or file.path,
                f"module {module!r}: {where} gives scale {scale:.3g}, beyond the ±{MAX_SCALE:g} this tool accepts (it overflows float32)",
            )
        dtype = a.dtype if a.dtype == b.dtype else "mixed"
        modules[module] = LoraModule(
            module, a.name, b.name, min(rank, n, d), n, d, scale, tuple(a.shape), tuple(b.shape), dtype, alpha_key,
            stored_rank=rank if rank > min(n, d) else None,
        )
    return Adapter(
        name=name, source=str(source), file=file, modules=modules, extras=extras, config=config, layout=layout
    )


def _refuse_not_low_rank(file: SafetensorsFile) -> None:
    """LoHa, LoKr, OFT, DoRA, …: not an update B·A, so refused by name rather than misread."""
    for key in file.tensors:
        label = _not_low_rank(key)
        if label is not None:
            raise InputError(file.path, f"{label} tensors ({key!r}) are not plain low-rank LoRA: refused")


@formats.per_key_cache  # a zoo's adapters repeat their keys
def _not_low_rank(key: str) -> str | None:
    """The format whose tensor ``key`` names, when it is not plain low-rank LoRA (else None)."""
    for marker, label in _NOT_LOW_RANK.items():
        if marker in key:
            return label
    for suffix, label in _NOT_LOW_RANK_SUFFIXES.items():
        if key.endswith(suffix):
            return label
    return None


def _pair_keys(file: SafetensorsFile, layout: str) -> tuple[dict[str, dict[str, str]], dict[str, str], list[str]]:
    """({module: {"A": key, "B": key}}, {module: kind}, other keys) under one layout."""
    pairs: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    extras: list[str] = []
    for key in file.tensors:
        parsed = formats.parse_key(key, layout)
        if parsed is None:
            extras.append(key)
            continue
        sides = pairs.setdefault(parsed.module, {})
        if parsed.side in sides:
            raise InputError(
                file.path, f"module {parsed.module!r} has two {parsed.side} factors: {sides[parsed.side]!r} and {key!r}"
            )
        sides[parsed.side] = key
        kinds[parsed.module] = parsed.kind
    return pairs, kinds, extras


def _scale(
    layout: str, module: str, rank: int, config: dict, where: object, file: SafetensorsFile, alpha_key: str | None
) -> float:
    """s = alpha / r: PEFT from its config; diffusers from its metadata, else like kohya from the
    module's alpha scalar, with alpha = r (s = 1) when there is none."""
    if layout == "peft":
        return module_scale(config, module, rank, where)
    component, rest = formats.split_component(module)
    if layout == "diffusers" and component in config:
        return module_scale(config[component], rest, rank, file.path)
    if alpha_key is None:
        return 1.0
    return formats.alpha_value(file.read(alpha_key), alpha_key, file.path) / rank


def _check_shapes(module, a, b, kind, file_path, names=("lora_A", "lora_B")) -> tuple[int, int, int]:
    """(r, n, d) of a module whose factors are matrices, or conv kernels [r, in, kh, kw] and [out, r, 1, 1]."""
    a_shape, b_shape = a.shape, b.shape
    if kind == "embedding" or len(a_shape) == 2:
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise InputError(file_path, f"module {module!r}: lora factors must be matrices, got {a_shape} and {b_shape}")
    elif len(a_shape) == 4:
        if len(b_shape) != 4 or b_shape[2:] != (1, 1):
            raise InputError(file_path, f"module {module!r}: conv {names[1]} must be [out, r, 1, 1], got {list(b_shape)}")
    else:
        raise InputError(file_path, f"module {module!r}: unsupported {names[0]} shape {list(a_shape)}")
    rank_a, rank_b = a_shape[0], b_shape[1]
    if rank_a != rank_b:
        raise InputError(file_path, f"module {module!r}: {names[0]} has rank {rank_a} but {names[1]} has rank {rank_b}")
    if rank_a == 0:
        raise InputError(file_path, f"module {module!r}: rank 0")
    if 0 in a_shape or 0 in b_shape:
        raise InputError(file_path, f"module {module!r}: a zero-size dimension ({names[0]} {list(a_shape)}, {names[1]} {list(b_shape)})")
    d = 1
    for s in a_shape[1:]:
        d *= s
    return rank_a, b_shape[0], d
