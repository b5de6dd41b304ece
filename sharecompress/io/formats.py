"""LoRA key layouts: which one a file uses, each key's module and side, and module identity.

Three layouts of plain low-rank LoRA are read, and exported back under their own key names:

``peft``
    ``<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_A.<adapter>.weight`` too) and
    ``<module>.lora_embedding_A`` / ``_B``; r and alpha come from ``adapter_config.json``.
``kohya`` (sd-scripts, also what A1111 / ComfyUI load)
    ``lora_unet_…`` / ``lora_te_…`` / ``lora_te1_…`` / ``lora_te2_…`` modules with
    ``.lora_down.weight`` / ``.lora_up.weight`` and a scalar ``<module>.alpha``
    (scale alpha / r; no alpha means alpha = r, as sd-scripts does).
``diffusers`` (``pytorch_lora_weights.safetensors``)
    keys under a component prefix (``unet.``, ``text_encoder.``, ``transformer.``, …) in any
    of the forms diffusers has written: ``.lora_A.weight`` / ``.lora_B.weight`` (PEFT backend),
    ``.lora.down.weight`` / ``.lora.up.weight`` (LoRACompatibleLinear/Conv),
    ``.lora_linear_layer.down.weight`` / ``.up.weight`` (text encoders), and the attention
    processors' ``….processor.to_q_lora.down.weight``. Scale from the ``lora_adapter_metadata``
    LoraConfig per component, else a ``<module>.alpha`` scalar, else alpha = r (diffusers'
    own default).

A, the "down" factor, is r × d; B, the "up" factor, is n × r: the same tensors in every layout.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, TypeVar

from ..errors import InputError
from .jsonio import JSONProblem, loads

if TYPE_CHECKING:
    from .adapter import Adapter

LAYOUTS = ("peft", "kohya", "diffusers")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA = "lora_adapter_metadata"
# Top-level components a diffusers pipeline saves LoRA weights under.
DIFFUSERS_COMPONENTS = frozenset(
    {"unet", "transformer", "prior", "text_encoder", "text_encoder_2", "text_encoder_3"}
)
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})


@dataclass(frozen=True)
class LoraKey:
    """One LoRA tensor key: its module as the layout names it, and which factor it holds."""

    module: str
    side: str  # "A" (down, r × d) or "B" (up, n × r)
    kind: str  # "linear" (conv included) or "embedding"


_SIDE = {"A": "A", "B": "B", "down": "A", "up": "B"}
_PATTERNS: dict[str, list[tuple[re.Pattern, str]]] = {
    "peft": [
        (re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$"), "linear"),
        (re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<side>[AB])(?:\.[^.]+)?$"), "embedding"),
    ],
    "kohya": [
        (re.compile(r"^(?P<module>.+)\.lora_(?P<side>down|up)\.weight$"), "linear"),
    ],
    "diffusers": [
        (re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$"), "linear"),
        (re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<side>[AB])$"), "embedding"),
        (re.compile(r"^(?P<module>.+)\.lora\.(?P<side>down|up)\.weight$"), "linear"),
        (re.compile(r"^(?P<module>.+)\.lora_linear_layer\.(?P<side>down|up)\.weight$"), "linear"),
        (re.compile(r"^(?P<module>.+)_lora\.(?P<side>down|up)\.weight$"), "linear"),
    ],
}
# (name of the A side, name of the B side) in error messages
SIDE_NAMES = {"peft": ("lora_A", "lora_B"), "kohya": ("lora_down", "lora_up"), "diffusers": ("down (lora_A)", "up (lora_B)")}


CACHED_KEY_CHARS = 256
T = TypeVar("T")


def per_key_cache(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn(key, …)`` remembered for keys of ordinary length: every adapter of a zoo repeats the same
    keys, so each is worked out once, while a hostile file's megabyte-long keys are never kept alive.
    The cache itself is ``.cache``."""
    cached = functools.lru_cache(maxsize=1 << 14)(fn)

    @functools.wraps(fn)
    def call(key: str, *rest):
        return cached(key, *rest) if len(key) <= CACHED_KEY_CHARS else fn(key, *rest)

    call.cache = cached  # type: ignore[attr-defined]
    return call


@per_key_cache
def parse_key(key: str, layout: str) -> LoraKey | None:
    """The module and side of ``key`` under ``layout``; None when it is not a LoRA key there."""
    for pattern, kind in _PATTERNS[layout]:
        match = pattern.match(key)
        if match:
            return LoraKey(match["module"], _SIDE[match["side"]], kind)
    return None


@per_key_cache
def layouts_of(key: str) -> frozenset[str]:
    """Every layout under which ``key`` is a LoRA factor (empty for other tensors)."""
    return frozenset(layout for layout in LAYOUTS if parse_key(key, layout) is not None)


def check_layout(name: str) -> str:
    """``auto`` or one of LAYOUTS; anything else is a usage error."""
    if name != "auto" and name not in LAYOUTS:
        raise ValueError(f"--format must be auto, {', '.join(LAYOUTS)}; got {name!r}")
    return name


def detect(keys: Iterable[str], where: object, forced: str = "auto", has_config: bool = False) -> str:
    """The layout of one file's keys; every LoRA key of a file must agree.

    Plain ``lora_A``/``lora_B`` keys are both PEFT and diffusers: they are read as diffusers
    only with no ``adapter_config.json`` and every key under a diffusers component prefix.
    """
    found = {key: layouts_of(key) for key in keys}
    found = {key: options for key, options in found.items() if options}
    if forced != "auto":
        check_layout(forced)
        if not any(forced in options for options in found.values()):
            raise InputError(where, f"--format {forced}: no {forced} LoRA keys in this file")
        stray = next((key for key, options in found.items() if forced not in options), None)
        if stray is not None:
            raise InputError(where, f"--format {forced}: {stray!r} is not a {forced} LoRA key")
        return forced
    if not found:
        return "peft"  # the reader then says: no LoRA tensors
    common = frozenset(LAYOUTS)
    for key, options in found.items():
        if not common & options:
            other = next(k for k, o in found.items() if not o & options)
            raise InputError(
                where,
                f"LoRA keys of two layouts in one file: {other!r} ({'/'.join(sorted(found[other]))}) "
                f"and {key!r} ({'/'.join(sorted(options))})",
            )
        common &= options
    if len(common) == 1:
        return next(iter(common))
    diffusers_like = all(key.split(".", 1)[0] in DIFFUSERS_COMPONENTS for key in found)
    return "diffusers" if diffusers_like and not has_config else "peft"


def alpha_key(module: str, layout: str) -> str | None:
    """Where a layout keeps a module's alpha scalar (PEFT keeps it in its config)."""
    return None if layout == "peft" else f"{module}.alpha"


def alpha_value(tensor, key: str, where: object) -> float:
    """A finite scalar from an alpha tensor (any float or integer dtype, shape [] or [1])."""
    if tensor.numel() != 1:
        raise InputError(where, f"alpha tensor {key!r} has shape {list(tensor.shape)}; expected a scalar")
    value = float(tensor.reshape(-1)[0])
    if not math.isfinite(value):
        raise InputError(where, f"alpha tensor {key!r} is {value}")
    return value


def diffusers_configs(metadata: dict[str, str], where: object) -> dict[str, dict]:
    """The per-component LoraConfig diffusers stores as ``lora_adapter_metadata`` ({} if none).

    diffusers flattens it as ``{"unet.r": 4, "unet.lora_alpha": 8, …}``.
    """
    raw = metadata.get(DIFFUSERS_METADATA)
    if not raw:
        return {}
    try:
        flat = loads(raw)
    except JSONProblem as exc:
        raise InputError(where, f"{DIFFUSERS_METADATA} in the header is not usable JSON: {exc}") from None
    if not isinstance(flat, dict):
        raise InputError(where, f"{DIFFUSERS_METADATA} in the header is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if field:
            configs.setdefault(component, {})[field] = value
    return configs


def split_component(module: str) -> tuple[str, str]:
    """("unet", "down_blocks.0…") for a diffusers module name; ("", module) without a component."""
    head, _, rest = module.partition(".")
    return (head, rest) if rest and head in DIFFUSERS_COMPONENTS else ("", module)


_KOHYA_PREFIXES = (
    ("lora_unet_", ""),
    ("lora_transformer_", ""),
    ("lora_te1_", "text_encoder_"),
    ("lora_te2_", "text_encoder_2_"),
    ("lora_te3_", "text_encoder_3_"),
    ("lora_te_", "text_encoder_"),
)
_PROCESSOR = re.compile(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)$")
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def canonical(module: str, layout: str) -> str:
    """A layout-free identity for matching modules across layouts (kohya's flattened form).

    The denoiser (``unet.``, ``transformer.``, ``lora_unet_``, a PEFT model's own modules) has
    no prefix; text encoders keep theirs (``text_encoder_``, ``text_encoder_2_``); dots become
    underscores. Old attention-processor names (``processor.to_q_lora``) map to the module, and
    ``text_model.`` inside a text encoder is dropped (``without_text_model``).
    """
    name = module
    if layout == "peft":
        name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    elif layout == "kohya":
        for prefix, replacement in _KOHYA_PREFIXES:
            if name.startswith(prefix):
                name = replacement + name[len(prefix):]
                break
    else:
        component, rest = split_component(name)
        if _PROCESSOR.search(rest):
            text = component.startswith("text_encoder")
            rest = _PROCESSOR.sub(
                lambda m: "." + (_TEXT_PROJ[m[1]] if text else ("to_out.0" if m[1] == "to_out" else m[1])), rest
            )
        name = rest if component in ("", "unet", "transformer") else f"{component}_{rest}"
    return without_text_model(name.replace(".", "_"))


_TEXT_MODEL = re.compile(r"^((?:text_encoder(?:_\d+)?_)?)text_model_")


def without_text_model(flat: str) -> str:
    """A text encoder's modules with or without ``text_model.`` (CLIPTextModel's inner module, which
    some tools write and others leave out) are one module: the segment is dropped at the start of
    the name or right after the text encoder's own prefix."""
    return _TEXT_MODEL.sub(r"\1", flat, count=1)


def zoo_module_layouts(manifest: dict) -> dict[str, str]:
    """{module name in the zoo: the layout that name is written in}.

    A module's zoo name is the one its first adapter used, so it is the adapter entry whose own
    key parses back to that name; zoos from before layouts are all PEFT.
    """
    found: dict[str, str] = {}
    for entry in manifest["adapters"]:
        layout = entry.get("layout", "peft")
        for module, mod in entry["modules"].items():
            parsed = parse_key(mod.get("a_key", ""), layout)
            if module not in found and parsed is not None and parsed.module == module:
                found[module] = layout
    for module in manifest["modules"]:
        found.setdefault(module, "peft")
    return found


def align_modules(adapters: list[Adapter], known: dict[str, str] | None = None) -> None:
    """Rename each adapter's modules to the names the zoo (or an earlier adapter) already uses.

    Exact names match first; across different layouts, modules match by ``canonical``. Same-
    layout names are never merged by their flattened form, so PEFT-only zoos keep their names.
    """
    names = dict(known or {})  # module name -> layout it is written in
    index: dict[str, dict[str, str]] = {}  # canonical -> {layout: name}
    for name, layout in names.items():
        index.setdefault(canonical(name, layout), {}).setdefault(layout, name)
    for adapter in adapters:
        renamed = {}
        for module, spec in adapter.modules.items():
            target = _match(module, adapter.layout, names, index)
            if target in renamed:
                raise InputError(
                    adapter.file.path, f"modules {renamed[target].name!r} and {module!r} are both module {target!r}"
                )
            renamed[target] = spec
        for target in renamed:
            if target not in names:
                names[target] = adapter.layout
                index.setdefault(canonical(target, adapter.layout), {}).setdefault(adapter.layout, target)
        adapter.modules = renamed


def _match(module: str, layout: str, names: dict[str, str], index: dict[str, dict[str, str]]) -> str:
    if module in names:
        return module
    for other_layout, name in index.get(canonical(module, layout), {}).items():
        if other_layout != layout:
            return name
    return module
