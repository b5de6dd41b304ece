"""``export``: one zoo adapter back to a standard PEFT adapter directory.

ΔŴ = U E F Vᵀ is an ordinary LoRA of rank p: lora_B = U·E, lora_A = F·Vᵀ, with
lora_alpha = r = p so that PEFT's scale is 1. Modules with a smaller p are zero-padded to the
adapter's largest p, so the adapter has one r (which every serving engine reads).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ZooError
from .storage import save_tensors_durably, staged_directory, write_json_durably
from .zoo import Zoo, refuse_partial

EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def exported_config(entry: dict, base_model: str | None, r: int) -> dict:
    config = dict(entry.get("config") or {})
    for key in ("rank_pattern", "alpha_pattern"):
        config[key] = {}
    config.update(peft_type="LORA", r=r, lora_alpha=r, use_rslora=False, use_dora=False)
    if not config.get("target_modules"):
        config["target_modules"] = sorted({m.split(".")[-1] for m in entry["modules"]})
    if base_model and not config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = base_model
    return config


def adapter_tensors(zoo: Zoo, name: str, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], int]:
    """PEFT-keyed tensors of one adapter (LoRA factors rebuilt, extras verbatim) and its r."""
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
    tensors.update(zoo.extras(name))
    return tensors, r


def export(zoo: Zoo, name: str, out: str | os.PathLike, dtype: str = "float32", force: bool = False) -> Path:
    """Write adapter ``name`` as a PEFT directory at ``out`` (whole, or not at all)."""
    out = Path(out)
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}")
    refuse_partial(zoo.path, zoo.manifest)
    entry = zoo.adapter(name)
    if out.exists() and not force:
        raise ZooError(out, "already exists; pass --force to replace it")
    tensors, r = adapter_tensors(zoo, name, EXPORT_DTYPES[dtype])
    with staged_directory(out) as staging:
        save_tensors_durably(staging / "adapter_model.safetensors", tensors, {"format": "pt"})
        write_json_durably(staging / "adapter_config.json", exported_config(entry, zoo.manifest.get("base_model"), r))
    return out
