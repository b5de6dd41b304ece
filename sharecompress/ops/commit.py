"""``commit``: a task trained in the zoo's subspace (``Runtime.new_adapter``) becomes a zoo adapter.

Its update per module is ``U_t·C·V_tᵀ`` with ``U_t = [U | P]``, ``V_t = [V | Q]`` (DESIGN.md §8a).

- **In the span** (no new directions, and the zoo's bases are still the ones trained on): the
  bases stay as they are and no stored adapter moves; the new cores are C's own factors
  (E = W·√S, F = √S·Zᵀ from C = W·S·Zᵀ, rank = C's numerical rank), so the stored adapter is
  the trained one up to the zoo's storage rounding, and that difference is measured exactly.
- **Otherwise**: the update is an ordinary rank-p LoRA, ``B = U_t·W·√S``, ``A = √S·Zᵀ·V_tᵀ``,
  and goes through ``add`` like any adapter read from a file (bases refit, old cores
  re-projected, each drift measured).

Either way the adapter is also a standard PEFT adapter in memory (``trained_adapter``), so its
entry, keys and config are those of one read from disk, and ``export`` writes it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import linalg
from ..core.bounds import orthonormal, parts_of
from ..errors import InputError
from ..io.adapter import Adapter, LoraModule
from ..io.formats import PEFT_PREFIX
from ..io.safetensors_file import SafetensorsFile, encode
from ..store.reader import ZooReader
from ..store.transaction import Transaction
from ..store.writer import CORES_METADATA, unique_stem, write_adapter_files
from .add import add_adapters, check_new
from .anchors import anchor_here
from .entries import adapter_entry, check_finite, finish_adapter_entry, now, refresh_module_stats, source_keys
from .merge import STORE_DTYPES

f64 = torch.float64


@dataclass
class TrainedModule:
    """One module's trained update U_full·C·V_fullᵀ, and how a PEFT adapter names and shapes it."""

    key: str  # the module's name in the adapter's keys (``base_model.model.<key>.lora_A.weight``)
    kind: str  # "linear", "conv" (a_shape carries the kernel) or "embedding"
    U: torch.Tensor  # n × (k_u + φ), as the training used it
    C: torch.Tensor  # (k_u + φ) × (k_v + φ)
    V: torch.Tensor  # d × (k_v + φ)
    extra: tuple[int, int]  # new directions (φ_u, φ_v): the last columns of U and V
    kernel: tuple[int, ...] = ()  # (in, kh, kw) for a conv

    @property
    def in_span(self) -> bool:
        return self.extra == (0, 0)


def core_factors(C: torch.Tensor, p: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, F) with E·F = C, of width C's numerical rank (at least 1): the smallest exact cores.

    With ``p`` (the zoo's pseudo-rank), at most p: then E·F is C's best rank-p part.
    """
    W, S, Zh = torch.linalg.svd(C.to(f64), full_matrices=False)
    tol = (S[0] if S.numel() else 0.0) * max(C.shape) * torch.finfo(f64).eps
    p = max(1, min(int((S > tol).sum()), p or C.shape[0]))
    root = S[:p].sqrt()
    return W[:, :p] * root, root[:, None] * Zh[:p]


def check_trained(name: str, modules: dict[str, TrainedModule], heads: dict[str, torch.Tensor]) -> None:
    """Refuse a task whose training diverged: NaN or Inf in any core, direction or head."""
    for module, m in modules.items():
        for what, t in (("core", m.C), ("new directions", m.U), ("new directions", m.V)):
            if not bool(torch.isfinite(t).all()):
                raise InputError(name, f"module {module!r}: its trained {what} hold NaN or Inf (the training diverged); "
                                       "nothing was written")
    for key, t in heads.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(name, f"head tensor {key!r} holds NaN or Inf (the training diverged); nothing was written")


def trained_adapter(name: str, modules: dict[str, TrainedModule], heads: dict[str, torch.Tensor], config: dict) -> Adapter:
    """The trained task as a PEFT adapter held in memory (float32 factors of rank p per module)."""
    check_trained(name, modules, heads)
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, LoraModule] = {}
    for module, m in modules.items():
        E, F = core_factors(m.C)
        B = (m.U.to(f64) @ E).to(torch.float32)
        A = (F @ m.V.to(f64).mT).to(torch.float32)
        p = E.shape[1]
        n, d = B.shape[0], A.shape[1]
        if m.kind == "embedding":
            a_key, b_key = f"{PEFT_PREFIX}{m.key}.lora_embedding_A", f"{PEFT_PREFIX}{m.key}.lora_embedding_B"
            a_shape, b_shape = (p, d), (n, p)
        else:
            a_key, b_key = f"{PEFT_PREFIX}{m.key}.lora_A.weight", f"{PEFT_PREFIX}{m.key}.lora_B.weight"
            a_shape = (p, *m.kernel) if m.kind == "conv" else (p, d)
            b_shape = (n, p, 1, 1) if m.kind == "conv" else (n, p)
        tensors[a_key], tensors[b_key] = A.reshape(a_shape).contiguous(), B.reshape(b_shape).contiguous()
        specs[module] = LoraModule(m.key, a_key, b_key, p, n, d, 1.0, a_shape, b_shape, "F32")
    r = max(s.rank for s in specs.values())
    # scale 1 in every module: lora_alpha = r (PEFT scales by lora_alpha / r, whatever rank a module has)
    config = {**config, "peft_type": "LORA", "r": r, "lora_alpha": r, "use_rslora": False, "use_dora": False}
    tensors.update({key: t.detach().to("cpu").contiguous() for key, t in heads.items()})
    source = f"<trained in the zoo's subspace: {name}>"
    data = b"".join(bytes(chunk) for chunk in encode(tensors, {"format": "pt"}))
    file = SafetensorsFile.from_bytes(source, data)
    return Adapter(name=name, source=source, file=file, modules=specs, extras=sorted(heads), config=config, layout="peft")


def commit_trained(zoo_path: Path, adapter: Adapter, modules: dict[str, TrainedModule], basis_sha256: str,
                   grow: str = "auto") -> dict:
    """Write the trained adapter into the zoo; returns {"path": "in-span" | "add", "drift": {old adapter: drift}}.

    ``basis_sha256`` names the bases the training ran on: when the zoo holds others now (a
    writer came between), or any module has new directions, the update goes through ``add``.
    There, ``grow="auto"`` keeps the new directions whole (each module's k grows by the
    directions it trained, so nothing trained is lost and no stored adapter drifts); ``"off"``
    leaves k to the zoo's own rule (Share's fixed-size re-extraction: the drift is reported).
    """
    if all(m.in_span for m in modules.values()):
        with Transaction(zoo_path) as tx:
            if tx.manifest.get("basis_sha256") == basis_sha256:
                _commit_in_span(tx, adapter, modules)
                return {"path": "in-span", "drift": {}}
    keep = {module: m.extra for module, m in modules.items() if not m.in_span} if grow == "auto" else None
    return {"path": "add", "drift": add_adapters(zoo_path, [adapter], grow=grow, keep=keep)}


def _commit_in_span(tx: Transaction, adapter: Adapter, modules: dict[str, TrainedModule]) -> None:
    """Bases and every stored core as they are; the new adapter's cores are C's factors."""
    manifest = tx.manifest  # edited in place: on failure the transaction publishes nothing
    check_new(manifest, [adapter])
    zoo = ZooReader.from_manifest(tx.zoo, manifest, tx.digest)
    store = STORE_DTYPES[manifest["dtype"]]
    bases = zoo.bases()
    entry = adapter_entry(adapter)
    tensors = {}
    for module, m in modules.items():
        E, F = core_factors(m.C, manifest["modules"][module].get("p") or manifest.get("p"))
        E, F = E.to(store), F.to(store)
        Uz, Vz = (t.to(f64) for t in bases[module])
        X1, Y1 = m.U.to(f64) @ m.C.to(f64), m.V.to(f64).mT  # the update as trained
        X2, Y2 = Uz @ E.to(f64), F.to(f64) @ Vz.mT  # as stored
        err2 = float(linalg.difference_norm2(X1.mT @ X1, X1.mT @ X2, X2.mT @ X2, Y1 @ Y1.mT, Y1 @ Y2.mT, Y2 @ Y2.mT))
        norm2 = float(((X1.mT @ X1) * (Y1 @ Y1.mT)).sum())
        check_finite(adapter.source, module, (E, F), (err2, norm2))
        tensors[f"{module}.E"], tensors[f"{module}.F"] = E, F
        QU, QV = orthonormal(bases[module][0]), orthonormal(bases[module][1])
        entry["modules"][module] = {"rank": E.shape[1], "scale": 1.0, "p": E.shape[1], "err2": err2, "norm2": norm2,
                                    "drift": 0.0, "err_parts": parts_of(QU, QV, torch.cat([X1, -X2], 1), torch.cat([Y1, Y2], 0)),
                                    **source_keys(adapter.modules[module])}
    used = {Path(e["file"]).name.split(".")[0].lower() for e in manifest["adapters"] if e.get("file")}
    entry.update(write_adapter_files(tx.adapters, unique_stem(adapter.name, used), encode(tensors, CORES_METADATA), adapter.extra_tensors(),
                                     tx.generation))
    finish_adapter_entry(entry)
    manifest["adapters"].append(entry)
    anchor_here(manifest, entry, tx.root)  # exact against the trained update, on the bases as they are
    refresh_module_stats(manifest)
    manifest["updated"] = now()
    tx.commit(manifest)
