"""Generate a synthetic zoo of PEFT LoRA adapters with Llama-like key names (for benchmarks).

Each module's adapters share a planted low-dimensional subspace (plus noise), as adapters
fine-tuned from one base model tend to; factors are stored in fp16.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def module_shapes(layers: int, hidden: int, intermediate: int | None, targets: list[str]) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} for a Llama-shaped model."""
    shapes = {}
    for layer in range(layers):
        for proj in targets:
            n, d = hidden, hidden
            if proj in ("gate_proj", "up_proj"):
                n = intermediate
            elif proj == "down_proj":
                d = intermediate
            shapes[f"model.layers.{layer}.{PROJ[proj]}.{proj}"] = (n, d)
    return shapes


def generate(out: Path, adapters: int, shapes: dict[str, tuple[int, int]], rank: int = 16,
             shared: int = 24, noise: float = 0.3, seed: int = 0) -> list[Path]:
    """Write ``adapters`` PEFT dirs under ``out``; returns their paths."""
    gen = torch.Generator().manual_seed(seed)
    planted = {m: (torch.linalg.qr(torch.randn(n, shared, generator=gen))[0],
                   torch.linalg.qr(torch.randn(d, shared, generator=gen))[0]) for m, (n, d) in shapes.items()}
    paths = []
    for t in range(adapters):
        tensors = {}
        for m, (n, d) in shapes.items():
            P, Q = planted[m]
            B = P @ torch.randn(shared, rank, generator=gen) + noise * torch.randn(n, rank, generator=gen) / math.sqrt(n) * math.sqrt(shared)
            A = torch.randn(rank, shared, generator=gen) @ Q.T / math.sqrt(d) + noise * torch.randn(rank, d, generator=gen) / math.sqrt(d)
            tensors[f"base_model.model.{m}.lora_A.weight"] = A.half().contiguous()
            tensors[f"base_model.model.{m}.lora_B.weight"] = (B * 0.05).half().contiguous()
        path = out / f"adapter_{t:04d}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "synthetic/llama-like",
            "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted({m.rsplit(".", 1)[1] for m in shapes}),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        }))
        paths.append(path)
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--adapters", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=None)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    shapes = module_shapes(a.layers, a.hidden, a.intermediate, a.targets.split(","))
    generate(a.out, a.adapters, shapes, a.rank, seed=a.seed)
