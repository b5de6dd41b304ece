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
from pathlib import Path

import torch

from . import formats
from .errors import ZooError
from .storage import safe_name, save_tensors_durably, staged_directory, staged_file, write_json_durably
from .zoo import Zoo, refuse_partial

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


def adapter_tensors(zoo: Zoo, name: str, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], int]:
    """Tensors of one adapter under its own keys (LoRA factors rebuilt, alphas = r, extras verbatim) and its r."""
    entry = zoo.adapter(name)
    bases, cores = zoo.bases(), zoo.cores(name)
    r = max(1, entry.get("p") or max(m["p"] for m in entry["modules"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for module, mod in entry["modules"].items():
        U, V = (t.to(torch.float64) for t in bases[module])
        E, F = (t.to(torch.float64) for t in cores[module])
        B = torch.zeros(U.shape[0], r, dtype=torch.float64)
        A = torch.zeros(r, V.shape[0], dtype=torch.float64)
        B[:, : E.shape[1]] = U @ E
        A[: F.shape[0]] = F @ V.T
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


def export(zoo: Zoo, name: str, out: str | os.PathLike, dtype: str = "float32", force: bool = False) -> Path:
    """Write adapter ``name`` at ``out`` in its own layout (whole, or not at all); returns ``out``."""
    out = Path(out)
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}")
    refuse_partial(zoo.path, zoo.manifest)
    entry = zoo.adapter(name)
    if out.exists() and not force:
        raise ZooError(out, "already exists; pass --force to replace it")
    tensors, r = adapter_tensors(zoo, name, EXPORT_DTYPES[dtype])
    layout = entry.get("layout", "peft")
    if layout == "peft":
        with staged_directory(out) as staging:
            save_tensors_durably(staging / "adapter_model.safetensors", tensors, {"format": "pt"})
            write_json_durably(staging / "adapter_config.json", exported_config(entry, zoo.manifest.get("base_model"), r))
        return out
    metadata = file_metadata(entry, r)
    if out.suffix == ".safetensors":
        if out.is_dir():
            raise ZooError(out, "is a directory; name a .safetensors file, or a directory without that suffix")
        with staged_file(out) as staging:
            save_tensors_durably(staging, tensors, metadata)
        return out
    with staged_directory(out) as staging:
        save_tensors_durably(staging / weights_name(entry), tensors, metadata)
    return out
