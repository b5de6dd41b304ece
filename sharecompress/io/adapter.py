"""The plain in-memory view of one LoRA adapter: where its factors are, and their scales.

Readers turn files into ``Adapter`` objects; the math never sees a file format. Factors are
read lazily, one module at a time, so memory follows one module group, not the zoo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .safetensors_file import SafetensorsFile, torch_dtype


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ΔW = scale · B · A, with B (n × r) and A (r × d) after flattening.

    ``a_shape``/``b_shape`` keep the stored shapes (conv kernels, embeddings) for export.
    """

    name: str
    a_key: str
    b_key: str
    rank: int
    n: int
    d: int
    scale: float
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: str
    alpha_key: str | None = None  # kohya / diffusers: the alpha scalar read (and written back)
    stored_rank: int | None = None  # the files' rank when above min(n, d) (``rank`` is then min(n, d))


@dataclass
class Adapter:
    """One source adapter: its LoRA modules, its non-LoRA tensors and its config.

    ``layout`` is its key layout (formats.LAYOUTS); ``config`` the PEFT adapter config, or
    diffusers' per-component ``lora_adapter_metadata``; ``modules`` is keyed by the zoo's
    module names, which may differ from the adapter's own (``LoraModule.name``).
    """

    name: str
    source: str
    file: SafetensorsFile
    modules: dict[str, LoraModule]
    extras: list[str]
    config: dict = field(default_factory=dict)
    layout: str = "peft"
    _sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = self.file.sha256()
        return self._sha256

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def lora_bytes(self) -> int:
        """Bytes of the LoRA factors as stored in the source (what compression replaces)."""
        t = self.file.tensors
        return sum(t[m.a_key].nbytes + t[m.b_key].nbytes for m in self.modules.values())

    def factors(self, module: str, dtype: torch.dtype | None = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of one module as ``dtype`` matrices; refuses NaN/Inf.

        ``dtype=None``: float32, or float64 for float64 sources (so nothing is rounded).
        """
        spec = self.modules[module]
        b = self.file.read(spec.b_key)
        a = self.file.read(spec.a_key)
        for key, t in ((spec.b_key, b), (spec.a_key, a)):
            # a sum is NaN/Inf when any element is (one cheap pass); confirm before refusing
            if not bool(torch.isfinite(t.sum(dtype=torch.float64))) and not bool(torch.isfinite(t).all()):
                raise InputError(self.file.path, f"tensor {key!r} contains NaN or Inf")
        if dtype is None:
            dtype = torch.float64 if spec.dtype == "F64" else torch.float32
        stored = spec.stored_rank or spec.rank
        b, a = b.reshape(spec.n, stored), a.reshape(stored, spec.d)
        if stored > spec.rank:
            return reduce_rank(b, a, dtype)
        return b.to(dtype), a.to(dtype)

    def stored_as(self, module: str, dtype: torch.dtype, width: int) -> tuple[str, str] | None:
        """(B's key, A's key) when the file holds the module's factors as a stack of ``dtype`` and rank
        ``width`` does (its own rank, that dtype), so that their bytes can go straight into it; else None."""
        spec = self.modules[module]
        if spec.stored_rank not in (None, spec.rank) or spec.rank != width:
            return None
        t = self.file.tensors
        if torch_dtype(t[spec.b_key].dtype) != dtype or torch_dtype(t[spec.a_key].dtype) != dtype:
            return None
        return spec.b_key, spec.a_key

    def read_into(self, module: str, B: torch.Tensor, A: torch.Tensor, fd: int | None = None) -> None:
        """One module's factors into B (n × r) and A (r × d), slices of a batch's stacks (a merge's).

        Where the file holds them as the stacks do (``stored_as``), the bytes go straight from the
        file into the stack and are not checked for NaN/Inf here: the caller checks the whole stack
        at once and asks ``factors`` which tensor it was. Otherwise they go through ``factors``
        (checked, widened) and are copied in, zero-padded beyond the rank.
        ``fd``: the file's descriptor from ``file.opened()``, for many modules of one adapter.
        """
        keys = self.stored_as(module, B.dtype, B.shape[1]) if B.dtype == A.dtype else None
        if keys is not None and B.is_contiguous() and A.is_contiguous():
            self.file.read_into(keys[0], B, fd)
            self.file.read_into(keys[1], A, fd)
            return
        b, a = self.factors(module, None)
        B[:, : b.shape[1]] = b
        A[: a.shape[0]] = a
        B[:, b.shape[1] :] = 0  # the stacks' buffers are reused from batch to batch: no stale rank may stay
        A[a.shape[0] :] = 0

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {key: self.file.read(key) for key in self.extras}


def reduce_rank(b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The same update B·A with rank min(n, d), for factors whose rank is above it.

    B·A (n × d) is smaller than the factors themselves here (n·d < r·(n + d) when r > min(n, d)),
    so nothing is allocated beyond the module's own size, whatever rank a file claims.
    """
    n, d = b.shape[0], a.shape[1]
    w = b.to(torch.float64) @ a.to(torch.float64)
    if n <= d:
        return torch.eye(n, dtype=dtype), w.to(dtype)
    return w.to(dtype), torch.eye(d, dtype=dtype)
