"""Manifest entries of adapters and modules, and the figures derived from them.

Shared by every operation that writes a manifest (merge, add, remove, combine) and by the
report: an adapter's entry from its source, its summary errors from its per-module ones,
each module's energy kept from its adapters'.
"""

from __future__ import annotations

import datetime as _dt

import torch

from ..io.adapter import Adapter, LoraModule
from ..errors import InputError
from ..io.names import printable


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def model_key(name: str) -> str:
    """A base model's name compared by its last path component: a Hub id and a local copy agree."""
    return name.rstrip("/").split("/")[-1]


def source_keys(spec: LoraModule) -> dict:
    """The adapter's own tensor names and shapes for one module: what export writes back."""
    keys = {"a_key": spec.a_key, "b_key": spec.b_key, "a_shape": list(spec.a_shape), "b_shape": list(spec.b_shape)}
    if spec.alpha_key is not None:
        keys["alpha_key"] = spec.alpha_key
    return keys


def adapter_entry(adapter: Adapter, hashed: bool = True) -> dict:
    return {
        "name": adapter.name,
        "source": printable(adapter.source),
        "sha256": adapter.sha256 if hashed else None,  # else filled in once hashed
        "rank": adapter.rank,
        "bytes_original": adapter.lora_bytes,
        "source_dtype": sorted({m.dtype for m in adapter.modules.values()}),
        "config": adapter.config,
        "layout": adapter.layout,
        "extras": list(adapter.extras),
        "bytes_extras": sum(adapter.file.tensors[k].nbytes for k in adapter.extras),
        "added": now(),
        "modules": {},
    }


def finish_adapter_entry(entry: dict) -> None:
    """Fill an adapter's summary figures from its per-module errors and drifts.

    ``err2`` is exact when measured (at merge, or for the adapter an add brought in); each
    later add moves the stored reconstruction by an exactly known ``drift`` (absolute norm,
    summed over adds). By the triangle inequality the error is at most sqrt(err2) + drift.
    """
    mods = entry["modules"].values()
    norm2 = sum(m["norm2"] for m in mods)
    entry["p"] = max((m["p"] for m in mods), default=0)
    entry["norm2"] = norm2
    entry["merge_error"] = relative(sum(m["err2"] for m in mods), norm2)
    entry["drift"] = relative(sum(m.get("drift", 0.0) ** 2 for m in mods), norm2)
    entry["relative_error"] = relative(sum(module_bound2(m) for m in mods), norm2)
    entry["error_bound"] = entry["relative_error"]
    entry["exact"] = all(m.get("drift", 0.0) == 0.0 for m in mods)


def refresh_module_stats(manifest: dict) -> None:
    """Each module's adapter count, total energy and energy kept, from its adapters' entries."""
    for module, info in manifest["modules"].items():
        holders = [e["modules"][module] for e in manifest["adapters"] if module in e["modules"]]
        total = sum(m["norm2"] for m in holders)
        info["adapters"] = len(holders)
        info["energy_total"] = total
        info["energy_kept"] = 1.0 - sum(module_bound2(m) for m in holders) / total if total > 0 else 1.0


def module_bound2(module: dict) -> float:
    """Squared upper bound on a module's error: (sqrt(err²) + accumulated drift)², or the tighter
    ``bound2`` an anchor gave (``ops.anchors``) where there is one."""
    chain = (module["err2"] ** 0.5 + module.get("drift", 0.0)) ** 2
    return min(chain, module["bound2"]) if module.get("bound2") is not None else chain


def check_finite(source: object, module: str, tensors, figures) -> None:
    """Refuse a result that overflowed: NaN or Inf in stored tensors or in the error figures.

    Float16 storage holds at most 65504, so a legitimate-looking adapter with large values or a
    large scale can overflow it; nothing non-finite ever reaches a manifest (the schema refuses
    it on read, which would lock the zoo).
    """
    import math

    import torch

    if all(math.isfinite(x) for x in figures) and all(bool(torch.isfinite(t).all()) for t in tensors):
        return
    raise InputError(source, f"module {module!r}: its values overflow the zoo's storage type (NaN or Inf); "
                             "check the adapter, or store the zoo as float32 (--dtype float32)")


def relative(err2: float, norm2: float) -> float:
    """sqrt(err² / norm²); an all-zero update reconstructed exactly has error 0."""
    if norm2 <= 0.0:
        return 0.0 if err2 <= 1e-30 else float("inf")
    return (err2 / norm2) ** 0.5


def module_info(info: dict | None, n: int, d: int, ku: int, kv: int, curve: torch.Tensor, sweeps: int) -> dict:
    """A module's manifest entry after its bases were refit (by ``add``, ``remove`` or a held budget)."""
    info = dict(info or {"shape": [n, d]})
    keep = min(curve.numel(), max(2 * ku, 64))
    info.update(k=max(ku, kv), k_u=ku, k_v=kv, energy_curve=[round(x, 7) for x in torch.cumsum(curve[:keep], 0).tolist()],
                sweeps=sweeps)
    return info
