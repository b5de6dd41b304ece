"""Small synthetic adapters on disk, and the dense float64 reference the tool is checked against."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."


def write_peft_adapter(
    path: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    alpha: float = 16.0,
    rslora: bool = False,
    dtype: torch.dtype = torch.float32,
    extras: dict[str, torch.Tensor] | None = None,
    config: dict | None = None,
    base_model: str = "test/tiny-model",
) -> Path:
    """A PEFT adapter dir: factors maps a module name to (B [n, r], A [r, d])."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (B, A) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.to(dtype).contiguous()
    tensors.update(extras or {})
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    rank = next(iter(factors.values()))[0].shape[1]
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": sorted({m.split(".")[-1] for m in factors}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
    }
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def random_factors(
    modules: dict[str, tuple[int, int]], rank: int, seed: int, basis: dict | None = None, noise: float = 0.0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (B, A) per module; with ``basis`` {module: (P [n,k0], Q [d,k0])} they live in that span."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module, (n, d) in modules.items():
        if basis is None:
            B = torch.randn(n, rank, generator=gen, dtype=torch.float64) / math.sqrt(n)
            A = torch.randn(rank, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        else:
            P, Q = basis[module]
            B = P @ torch.randn(P.shape[1], rank, generator=gen, dtype=torch.float64)
            A = torch.randn(rank, Q.shape[1], generator=gen, dtype=torch.float64) @ Q.T
            if noise:
                B = B + noise * torch.randn(n, rank, generator=gen, dtype=torch.float64) / math.sqrt(n)
        out[module] = (B, A)
    return out


def planted_basis(modules: dict[str, tuple[int, int]], k0: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        m: (
            torch.linalg.qr(torch.randn(n, k0, generator=gen, dtype=torch.float64))[0],
            torch.linalg.qr(torch.randn(d, k0, generator=gen, dtype=torch.float64))[0],
        )
        for m, (n, d) in modules.items()
    }


def scale_of(alpha: float, rank: int, rslora: bool = False) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def dense_delta(B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (B.to(torch.float64) @ A.to(torch.float64))


def dense_reconstruction(U, E, F, V) -> torch.Tensor:
    f = torch.float64
    return U.to(f) @ E.to(f) @ F.to(f) @ V.to(f).T


def write_kohya_file(
    path: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    alpha: float | dict[str, float | None] | None = 4.0,
    dtype: torch.dtype = torch.float32,
    extras: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A kohya / sd-scripts LoRA file: ``<module>.lora_down.weight`` (A), ``.lora_up.weight`` (B)
    and a scalar ``<module>.alpha`` (``alpha`` per module, or None for no alpha tensor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (B, A) in factors.items():
        tensors[f"{module}.lora_down.weight"] = A.to(dtype).contiguous()
        tensors[f"{module}.lora_up.weight"] = B.to(dtype).contiguous()
        value = alpha.get(module) if isinstance(alpha, dict) else alpha
        if value is not None:
            tensors[f"{module}.alpha"] = torch.tensor(float(value), dtype=dtype)
    tensors.update(extras or {})
    save_file(tensors, str(path), metadata={"format": "pt", "ss_network_module": "networks.lora"})
    return path


DIFFUSERS_SUFFIXES = {
    "peft": (".lora_A.weight", ".lora_B.weight"),
    "lora": (".lora.down.weight", ".lora.up.weight"),
    "linear_layer": (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
}


def write_diffusers_dir(
    path: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, str]],
    *,
    alphas: dict[str, float] | None = None,
    metadata: dict[str, dict] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A diffusers LoRA dir (``pytorch_lora_weights.safetensors``): factors maps a prefixed module
    (``unet.…``) to (B, A, style), style one of DIFFUSERS_SUFFIXES; ``alphas`` adds ``<module>.alpha``
    scalars; ``metadata`` {component: LoraConfig fields} is stored as diffusers' lora_adapter_metadata."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (B, A, style) in factors.items():
        down, up = DIFFUSERS_SUFFIXES[style]
        tensors[module + down] = A.to(dtype).contiguous()
        tensors[module + up] = B.to(dtype).contiguous()
    for module, value in (alphas or {}).items():
        tensors[f"{module}.alpha"] = torch.tensor(float(value), dtype=dtype)
    header = {"format": "pt"}
    if metadata:
        flat = {f"{c}.{k}": v for c, fields in metadata.items() for k, v in fields.items()}
        header["lora_adapter_metadata"] = json.dumps(flat)
    save_file(tensors, str(path / "pytorch_lora_weights.safetensors"), metadata=header)
    return path


def add_conv_and_embedding(src: Path, gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Add PEFT embedding LoRA (``embed_tokens``, 30 × 5) and 3×3 conv LoRA (``conv``, 3 → 4 channels)
    to the adapter at ``src``; returns all its tensors."""
    from safetensors.torch import load_file

    tensors = load_file(str(src / "adapter_model.safetensors"))
    tensors.update({
        "base_model.model.embed_tokens.lora_embedding_A": scale * torch.randn(2, 30, generator=gen),
        "base_model.model.embed_tokens.lora_embedding_B": scale * torch.randn(5, 2, generator=gen),
        "base_model.model.conv.lora_A.weight": torch.randn(2, 3, 3, 3, generator=gen),
        "base_model.model.conv.lora_B.weight": torch.randn(4, 2, 1, 1, generator=gen),
    })
    save_file(tensors, str(src / "adapter_model.safetensors"))
    return tensors


class TinyNet(torch.nn.Module):
    """An embedding, a 3×3 conv and a linear layer (the modules ``tiny_zoo`` adapts) and a 3-way head."""

    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = torch.nn.Embedding(30, 5)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.q_proj = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, image: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (self.head(self.q_proj(x)) + self.conv(image).mean((1, 2, 3))[:, None]
                + self.embed_tokens(ids).mean((1, 2))[:, None])

    @staticmethod
    def inputs(rows: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randint(0, 30, (rows, 7), generator=gen), torch.randn(rows, 3, 5, 5, generator=gen),
                torch.randn(rows, 6, generator=gen))


def tiny_zoo(tmp_path: Path, count: int = 3, k: int = 2) -> tuple[Path, list[str]]:
    """``count`` adapters of ``TinyNet`` (q_proj, conv, embed_tokens and a saved head; rank 2, alpha 4)
    and a zoo of all but the last at ``k``; returns the zoo's path and every source (the last one spare)."""
    import sharecompress

    gen = torch.Generator().manual_seed(5)
    sources = []
    for i in range(count):
        src = write_peft_adapter(tmp_path / f"t{i}", {"q_proj": (torch.randn(8, 2, generator=gen), torch.randn(2, 6, generator=gen))},
                                 alpha=4.0, extras={"base_model.model.head.weight": torch.randn(3, 8, generator=gen),
                                                    "base_model.model.head.bias": torch.randn(3, generator=gen)},
                                 config={"modules_to_save": ["head"]})
        add_conv_and_embedding(src, gen)
        sources.append(str(src))
    sharecompress.merge(sources[: count - 1] if count > 1 else sources, tmp_path / "zoo", k=k)
    return tmp_path / "zoo", sources


def kill_when_paused(proc, step: str) -> None:
    """Wait until the writer ``proc`` (started with SHARECOMPRESS_PAUSE_AT=step:…) says it paused at
    ``step``, then SIGKILL it: a crash at exactly that point of its transaction."""
    import signal

    line = proc.stderr.readline()
    while line and "paused at" not in line:
        line = proc.stderr.readline()
    assert f"paused at {step}" in line, line
    proc.send_signal(signal.SIGKILL)
    proc.wait()
