"""Key layouts (PEFT, kohya, diffusers): read → lossless merge → export gives back the same keys.

Exported factors are not the original factors: B·A = (B·G)(G⁻¹·A) for any invertible G, and the
zoo stores only the update, so export chooses its own gauge (and alpha = r, scale 1). What must
come back is everything a loader sees: the same key set, shapes and dtypes, alpha scalars where
the source had them, and per module the same update s·up·down (to 1e-6 relative).
"""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import sharecompress
from sharecompress.io import formats
from sharecompress.cli import app
from sharecompress.io.readers import find_adapters

from factories import add_conv_and_embedding, write_diffusers_dir, write_kohya_file, write_peft_adapter

runner = CliRunner()
LOSSLESS = 100_000  # k is capped at each module's stack rank: nothing is lost

# One module per row: id, kohya name, diffusers name, diffusers key style, PEFT name (None: not
# in a PEFT UNet adapter), B shape after r, A shape after r, n.
MODULES = [
    ("to_q", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "lora",
     "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (), (12,), 16),
    ("to_out", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "peft",
     "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", (), (16,), 12),
    ("proj_in_1x1", "lora_unet_down_blocks_0_attentions_0_proj_in",
     "unet.down_blocks.0.attentions.0.proj_in", "peft",
     "base_model.model.down_blocks.0.attentions.0.proj_in", (1, 1), (12, 1, 1), 16),
    ("conv_3x3", "lora_unet_down_blocks_0_resnets_0_conv1",
     "unet.down_blocks.0.resnets.0.conv1", "lora",
     "base_model.model.down_blocks.0.resnets.0.conv1", (1, 1), (6, 3, 3), 10),
    ("te_q", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "linear_layer", None, (), (8,), 8),
]


def factors(seed: int, rank: int, peft_only: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module id: (B [n, r, …], A [r, …])}, conv factors as 4-D kernels."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for mid, _, _, _, peft, b_tail, a_tail, n in MODULES:
        if peft_only and peft is None:
            continue
        B = torch.randn(n, rank, *b_tail, generator=gen, dtype=torch.float64) / math.sqrt(n)
        A = torch.randn(rank, *a_tail, generator=gen, dtype=torch.float64)
        out[mid] = (B, A)
    return out


def kohya(path, seed, rank=4, alpha=2.0, dtype=torch.float32, no_alpha=()):
    names = {m[0]: m[1] for m in MODULES}
    alphas = {names[mid]: (None if mid in no_alpha else alpha) for mid in names}
    return write_kohya_file(path, {names[m]: f for m, f in factors(seed, rank).items()}, alpha=alphas, dtype=dtype)


def diffusers(path, seed, rank=4, alphas=None, metadata=None, dtype=torch.float32):
    rows = {m[0]: m for m in MODULES}
    return write_diffusers_dir(
        path, {rows[m][2]: (B, A, rows[m][3]) for m, (B, A) in factors(seed, rank).items()},
        alphas=alphas, metadata=metadata, dtype=dtype,
    )


def peft(path, seed, rank=4, alpha=8.0):
    """A PEFT adapter on the UNet: its modules, and PEFT's own key names for 4-D conv factors."""
    rows = {m[0]: m for m in MODULES}
    path.mkdir(parents=True)
    tensors = {}
    for mid, (B, A) in factors(seed, rank, peft_only=True).items():
        tensors[f"{rows[mid][4]}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{rows[mid][4]}.lora_B.weight"] = B.float().contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha}))
    return path


# --- an independent reading of each layout: {module as its keys name it: s · up · down} ---


def _delta(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    r = down.shape[0]
    return scale * up.double().reshape(up.shape[0], r) @ down.double().reshape(r, -1)


def kohya_deltas(path) -> dict[str, torch.Tensor]:
    t = load_file(str(path))
    out = {}
    for key in t:
        if key.endswith(".lora_down.weight"):
            m = key[: -len(".lora_down.weight")]
            r = t[key].shape[0]
            alpha = float(t[f"{m}.alpha"]) if f"{m}.alpha" in t else r
            out[m] = _delta(t[f"{m}.lora_up.weight"], t[key], alpha / r)
    return out


def diffusers_deltas(path) -> dict[str, torch.Tensor]:
    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    out = {}
    for down, up in (s for s in [(".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
                                 (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")]):
        for key in [k for k in t if k.endswith(down)]:
            m = key[: -len(down)]
            r = t[key].shape[0]
            comp = m.split(".")[0]
            if f"{comp}.lora_alpha" in meta:
                scale = meta[f"{comp}.lora_alpha"] / meta[f"{comp}.r"]
            else:
                scale = (float(t[f"{m}.alpha"]) if f"{m}.alpha" in t else r) / r
            out[m] = _delta(t[m + up], t[key], scale)
    return out


def peft_deltas(path) -> dict[str, torch.Tensor]:
    t = load_file(str(path / "adapter_model.safetensors"))
    cfg = json.loads((path / "adapter_config.json").read_text())
    return {
        k[: -len(".lora_A.weight")]: _delta(t[k.replace("lora_A", "lora_B")], t[k], cfg["lora_alpha"] / cfg["r"])
        for k in t if k.endswith(".lora_A.weight")
    }


def assert_same_deltas(original: dict, exported: dict) -> None:
    assert set(exported) == set(original)
    for m, delta in original.items():
        err = (exported[m] - delta).norm() / delta.norm()
        assert err < 1e-6, (m, float(err))


def assert_same_tensors(original_file, exported_file, same_dtype=True) -> None:
    """Same keys, same shapes (alphas: scalars), same factor dtypes."""
    with safe_open(str(original_file), "pt") as a, safe_open(str(exported_file), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            x, y = a.get_slice(key), b.get_slice(key)
            assert y.get_shape() == x.get_shape() or (key.endswith(".alpha") and math.prod(y.get_shape()) == 1), key
            if same_dtype and not key.endswith(".alpha"):
                assert y.get_dtype() == x.get_dtype(), key


# --- detection and naming ---


@pytest.mark.parametrize("key,layout,module,side", [
    ("base_model.model.layers.0.q_proj.lora_A.weight", "peft", "base_model.model.layers.0.q_proj", "A"),
    ("base_model.model.layers.0.q_proj.lora_B.default.weight", "peft", "base_model.model.layers.0.q_proj", "B"),
    ("base_model.model.embed.lora_embedding_A", "peft", "base_model.model.embed", "A"),
    ("lora_unet_mid_block_attentions_0_proj_out.lora_down.weight", "kohya", "lora_unet_mid_block_attentions_0_proj_out", "A"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", "kohya", "lora_te2_text_model_encoder_layers_0_mlp_fc1", "B"),
    ("unet.mid_block.attentions.0.proj_out.lora.down.weight", "diffusers", "unet.mid_block.attentions.0.proj_out", "A"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight", "diffusers",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "B"),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight", "diffusers",
     "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q", "A"),
    ("transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight", "diffusers",
     "transformer.single_transformer_blocks.0.attn.to_k", "B"),
])
def test_keys_parse_to_module_and_side(key, layout, module, side):
    parsed = formats.parse_key(key, layout)
    assert (parsed.module, parsed.side) == (module, side)
    assert layout in formats.layouts_of(key)


def test_detection_per_file():
    peft_keys = ["base_model.model.a.lora_A.weight", "base_model.model.a.lora_B.weight"]
    unet_keys = ["unet.a.lora_A.weight", "unet.a.lora_B.weight", "text_encoder.b.lora.down.weight"]
    assert formats.detect(peft_keys, "f") == "peft"
    assert formats.detect(["unet.a.lora_A.weight", "unet.a.lora_B.weight"], "f") == "diffusers"
    assert formats.detect(["unet.a.lora_A.weight"], "f", has_config=True) == "peft"  # a PEFT dir stays PEFT
    assert formats.detect(unet_keys, "f") == "diffusers"  # diffusers mixes its key styles in one file
    assert formats.detect(["lora_unet_a.lora_down.weight", "lora_unet_a.alpha"], "f") == "kohya"
    with pytest.raises(sharecompress.errors.InputError, match="two layouts"):
        formats.detect(["lora_unet_a.lora_down.weight", *peft_keys], "f")


def test_one_module_has_one_identity_in_every_layout():
    for _, kohya_name, diffusers_name, _, peft_name, *_ in MODULES:
        ids = {formats.canonical(kohya_name, "kohya"), formats.canonical(diffusers_name, "diffusers")}
        if peft_name:
            ids.add(formats.canonical(peft_name, "peft"))
        assert len(ids) == 1, ids
    old = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out"
    assert formats.canonical(old, "diffusers") == formats.canonical(MODULES[1][2], "diffusers")
    te_old = "text_encoder.text_model.encoder.layers.0.self_attn.to_q"
    assert formats.canonical(te_old, "diffusers") == formats.canonical(MODULES[4][1], "kohya")
    assert formats.canonical("lora_te1_x_y", "kohya") == formats.canonical("text_encoder.x.y", "diffusers")
    assert formats.canonical("lora_te2_x_y", "kohya") == formats.canonical("text_encoder_2.x.y", "diffusers")


# --- round trips ---


def test_kohya_round_trip(tmp_path):
    """Linear, conv 1×1 and 3×3, text encoder; alphas (one module without: alpha = r)."""
    srcs = [kohya(tmp_path / "src" / f"k{i}.safetensors", seed=i, rank=3 + i, no_alpha=("te_q",)) for i in range(2)]
    adapters = find_adapters(map(str, srcs))
    assert {a.layout for a in adapters} == {"kohya"}
    spec = adapters[0].modules[MODULES[0][1]]
    assert spec.scale == pytest.approx(2.0 / 3) and spec.alpha_key == f"{MODULES[0][1]}.alpha"
    assert adapters[0].modules[MODULES[4][1]].scale == 1.0
    assert not adapters[0].extras  # alphas are consumed, not extras
    zoo = sharecompress.merge(map(str, srcs), tmp_path / "zoo", k=LOSSLESS)
    assert zoo.report()["relative_error"] < 1e-6
    assert set(zoo.modules) == {m[1] for m in MODULES}
    for i, src in enumerate(srcs):
        assert zoo.adapter(f"k{i}")["layout"] == "kohya"
        out = zoo.export(f"k{i}", tmp_path / "out" / f"k{i}.safetensors")
        assert out.is_file()
        assert_same_tensors(src, out)
        assert_same_deltas(kohya_deltas(src), kohya_deltas(out))
        assert float(load_file(str(out))[f"{MODULES[0][1]}.alpha"]) == 3 + i  # alpha = r: scale 1


def test_kohya_fp16_exports_fp16_into_a_directory(tmp_path):
    src = kohya(tmp_path / "src" / "half.safetensors", seed=3, dtype=torch.float16)
    zoo = sharecompress.merge([str(src)], tmp_path / "zoo", k=LOSSLESS)
    assert zoo.manifest["dtype"] == "float16"
    out = zoo.export("half", tmp_path / "exported", dtype="float16")
    assert sorted(p.name for p in out.iterdir()) == ["half.safetensors"]
    assert_same_tensors(src, out / "half.safetensors")
    for m, delta in kohya_deltas(src).items():
        got = kohya_deltas(out / "half.safetensors")[m]
        assert (got - delta).norm() / delta.norm() < 2e-3  # fp16 storage and fp16 export round twice
    assert find_adapters([str(out)])[0].name == "half"  # the export reads back under its name


@pytest.mark.parametrize("how", ["default", "alphas", "metadata"])
def test_diffusers_round_trip(tmp_path, how):
    """Every diffusers key style in one file; scale from metadata, alpha tensors, or alpha = r."""
    rank = 4
    alphas = {m[2]: 2.0 for m in MODULES} if how == "alphas" else None
    metadata = {"unet": {"r": rank, "lora_alpha": 8, "target_modules": ["to_q"]},
                "text_encoder": {"r": rank, "lora_alpha": 2}} if how == "metadata" else None
    srcs = [diffusers(tmp_path / "src" / f"d{i}", seed=10 + i, rank=rank, alphas=alphas, metadata=metadata) for i in range(2)]
    adapters = find_adapters(map(str, srcs))
    assert [a.name for a in adapters] == ["d0", "d1"] and {a.layout for a in adapters} == {"diffusers"}
    expected = {"default": 1.0, "alphas": 0.5, "metadata": 2.0}[how]
    assert adapters[0].modules[MODULES[0][2]].scale == pytest.approx(expected)
    zoo = sharecompress.merge(map(str, srcs), tmp_path / "zoo", k=LOSSLESS)
    assert zoo.report()["relative_error"] < 1e-6
    for i, src in enumerate(srcs):
        out = zoo.export(f"d{i}", tmp_path / "out" / f"d{i}")
        weights = out / "pytorch_lora_weights.safetensors"
        assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors"]
        assert_same_tensors(src / "pytorch_lora_weights.safetensors", weights)
        assert_same_deltas(diffusers_deltas(src / "pytorch_lora_weights.safetensors"), diffusers_deltas(weights))
        if how == "metadata":
            with safe_open(str(weights), "pt") as f:
                meta = json.loads(f.metadata()["lora_adapter_metadata"])
            assert meta["unet.r"] == meta["unet.lora_alpha"] == rank and meta["unet.target_modules"] == ["to_q"]


def test_peft_conv_and_embedding_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(5)
    src = tmp_path / "pe"
    write_peft_adapter(src, {"layers.0.q_proj": (torch.randn(8, 2, generator=gen), torch.randn(2, 6, generator=gen))})
    t = add_conv_and_embedding(src, gen)
    t.update({
        "base_model.model.pw.lora_A.weight": torch.randn(2, 3, 1, 1, generator=gen),
        "base_model.model.pw.lora_B.weight": torch.randn(4, 2, 1, 1, generator=gen),
    })
    save_file(t, str(src / "adapter_model.safetensors"))
    zoo = sharecompress.merge([str(src)], tmp_path / "zoo", k=LOSSLESS)
    assert zoo.adapter("pe")["layout"] == "peft"
    out = zoo.export("pe", tmp_path / "out")
    assert_same_tensors(src / "adapter_model.safetensors", out / "adapter_model.safetensors")
    original = peft_deltas(src)
    original["base_model.model.embed_tokens"] = 8.0 * (t["base_model.model.embed_tokens.lora_embedding_B"].double()
                                                       @ t["base_model.model.embed_tokens.lora_embedding_A"].double())
    exported = peft_deltas(out)
    e = load_file(str(out / "adapter_model.safetensors"))
    exported["base_model.model.embed_tokens"] = (e["base_model.model.embed_tokens.lora_embedding_B"].double()
                                                 @ e["base_model.model.embed_tokens.lora_embedding_A"].double())
    assert_same_deltas(original, exported)


def test_old_processor_keys_and_integer_alphas_meet_on_one_module(tmp_path):
    """diffusers ≤ 0.20 attention-processor keys (no component prefix) and the int64 alpha that
    diffusers' convert_state_dict_to_kohya writes: both read, matched, and exported as they were."""
    gen = torch.Generator().manual_seed(7)
    old = tmp_path / "old"
    old.mkdir()
    stem = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    save_file({f"{stem}.down.weight": torch.randn(2, 12, generator=gen),
               f"{stem}.up.weight": torch.randn(16, 2, generator=gen)}, str(old / "pytorch_lora_weights.safetensors"))
    k = tmp_path / "k.safetensors"
    save_file({f"{MODULES[0][1]}.lora_down.weight": torch.randn(3, 12, generator=gen),
               f"{MODULES[0][1]}.lora_up.weight": torch.randn(16, 3, generator=gen),
               f"{MODULES[0][1]}.alpha": torch.tensor(6)}, str(k))
    zoo = sharecompress.merge([str(old), str(k)], tmp_path / "zoo", k=LOSSLESS)
    assert list(zoo.modules) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q"]
    assert zoo.adapter("k")["modules"][list(zoo.modules)[0]]["scale"] == 2.0
    out = zoo.export("old", tmp_path / "out")
    assert_same_tensors(old / "pytorch_lora_weights.safetensors", out / "pytorch_lora_weights.safetensors")
    a, b = load_file(str(old / "pytorch_lora_weights.safetensors")), load_file(str(out / "pytorch_lora_weights.safetensors"))
    down, up = f"{stem}.down.weight", f"{stem}.up.weight"
    assert_same_deltas({0: _delta(a[up], a[down], 1.0)}, {0: _delta(b[up], b[down], 1.0)})
    assert_same_deltas(kohya_deltas(k), kohya_deltas(zoo.export("k", tmp_path / "k_out.safetensors")))


# --- mixed layouts in one zoo ---


def mixed_sources(tmp_path):
    return [
        peft(tmp_path / "src" / "p", seed=20),
        kohya(tmp_path / "src" / "k.safetensors", seed=21),
        diffusers(tmp_path / "src" / "d", seed=22, alphas={m[2]: 3.0 for m in MODULES}),
    ]


def originals_of(srcs):
    p, k, d = srcs
    return {"p": (peft_deltas, p, p), "k": (kohya_deltas, k, k),
            "d": (diffusers_deltas, d / "pytorch_lora_weights.safetensors", d / "pytorch_lora_weights.safetensors")}


def test_mixed_zoo_one_set_of_modules_each_exported_in_its_layout(tmp_path):
    srcs = mixed_sources(tmp_path)
    zoo = sharecompress.merge(map(str, srcs), tmp_path / "zoo", k=LOSSLESS)
    # the first adapter holding a module names it: PEFT for the UNet, kohya for the text encoder
    assert set(zoo.modules) == {m[4] for m in MODULES if m[4]} | {MODULES[4][1]}
    assert [zoo.modules[m[4]]["adapters"] for m in MODULES if m[4]] == [3, 3, 3, 3]
    assert zoo.report()["relative_error"] < 1e-6
    assert [zoo.adapter(n)["layout"] for n in "pkd"] == ["peft", "kohya", "diffusers"]
    exports = {"p": tmp_path / "out" / "p", "k": tmp_path / "out" / "k.safetensors", "d": tmp_path / "out" / "d"}
    files = {"p": exports["p"] / "adapter_model.safetensors", "k": exports["k"],
             "d": exports["d"] / "pytorch_lora_weights.safetensors"}
    for name, (deltas, original, original_file) in originals_of(srcs).items():
        zoo.export(name, exports[name])
        src_file = original_file if original_file.is_file() else original / "adapter_model.safetensors"
        assert_same_tensors(src_file, files[name])
        assert_same_deltas(deltas(original), deltas(exports[name] if name == "p" else files[name]))
    exact = zoo.report(against=[str(s) for s in srcs])
    assert all(a["exact"] or a["relative_error"] < 1e-6 for a in exact["adapters"])
    assert max(a["relative_error"] for a in exact["adapters"]) < 1e-6


def test_add_matches_modules_across_layouts(tmp_path):
    p, k, d = mixed_sources(tmp_path)
    zoo = sharecompress.merge([str(p)], tmp_path / "zoo", k=LOSSLESS)
    before = set(zoo.modules)
    zoo.add([str(k)])
    zoo.add([str(d)])
    assert set(zoo.modules) == before | {MODULES[4][1]}  # the text encoder is new; the UNet is shared
    assert zoo.modules[MODULES[4][1]]["adapters"] == 2
    out = zoo.export("d", tmp_path / "out.safetensors")
    assert_same_tensors(d / "pytorch_lora_weights.safetensors", out)
    assert_same_deltas(diffusers_deltas(d / "pytorch_lora_weights.safetensors"), diffusers_deltas(out))


def test_a_zoo_from_before_layouts_keeps_working(tmp_path):
    """Manifests without "layout" are PEFT: export as before, and add matches a kohya adapter."""
    p, k, _ = mixed_sources(tmp_path)
    zoo = sharecompress.merge([str(p)], tmp_path / "zoo", k=LOSSLESS)
    manifest = json.loads((tmp_path / "zoo" / "manifest.json").read_text())
    for entry in manifest["adapters"]:
        del entry["layout"]
    (tmp_path / "zoo" / "manifest.json").write_text(json.dumps(manifest))
    zoo = sharecompress.Zoo.open(tmp_path / "zoo")
    assert_same_deltas(peft_deltas(p), peft_deltas(zoo.export("p", tmp_path / "out")))
    zoo.add([str(k)])
    assert len(zoo.modules) == len(MODULES)


# --- the CLI: refusals and --format ---


def one_line_refusal(result, named, needle):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle.lower() in lines[0].lower() and str(named) in lines[0]
    assert "Traceback" not in result.output


def merge_cli(tmp_path, *args):
    return runner.invoke(app, ["merge", *map(str, args), "--zoo", str(tmp_path / "zoo"), "-k", "2"])


@pytest.mark.parametrize("keys,label", [
    (["lora_unet_a.hada_w1_a", "lora_unet_a.hada_w1_b", "lora_unet_a.hada_w2_a", "lora_unet_a.hada_w2_b"], "LoHa"),
    (["lora_unet_a.lokr_w1", "lora_unet_a.lokr_w2_a", "lora_unet_a.lokr_w2_b"], "LoKr"),
    (["lora_unet_a.oft_blocks"], "OFT"),
    (["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.dora_scale"], "DoRA"),
])
def test_not_low_rank_formats_are_refused_by_name(tmp_path, keys, label):
    bad = tmp_path / "lycoris.safetensors"
    save_file({k: torch.ones(2, 2) for k in keys} | {"lora_unet_a.alpha": torch.tensor(1.0)}, str(bad))
    one_line_refusal(merge_cli(tmp_path, bad), bad, label)
    assert not (tmp_path / "zoo").exists()


def test_format_overrides_detection(tmp_path):
    gen = torch.Generator().manual_seed(0)
    bare = tmp_path / "bare.safetensors"  # PEFT-style keys, no prefix, no config: auto reads PEFT
    save_file({"blocks.0.to_q.lora_A.weight": torch.randn(2, 6, generator=gen),
               "blocks.0.to_q.lora_B.weight": torch.randn(5, 2, generator=gen)}, str(bare))
    one_line_refusal(merge_cli(tmp_path, bare), bare, "pass --alpha")
    result = merge_cli(tmp_path, bare, "--format", "diffusers")
    assert result.exit_code == 0, result.output
    entry = sharecompress.Zoo.open(tmp_path / "zoo").adapter("bare")
    assert entry["layout"] == "diffusers" and entry["modules"]["blocks.0.to_q"]["scale"] == 1.0
    prefixed = tmp_path / "unet_lora.safetensors"  # under a diffusers component: auto reads diffusers…
    save_file({f"unet.{k}": v for k, v in load_file(str(bare)).items()}, str(prefixed))
    assert find_adapters([str(prefixed)])[0].layout == "diffusers"
    assert find_adapters([str(prefixed)], alpha=4.0)[0].layout == "peft"  # …unless --alpha says PEFT


def test_forced_format_that_matches_no_key(tmp_path):
    src = peft(tmp_path / "p", seed=1)
    one_line_refusal(merge_cli(tmp_path, src, "--format", "kohya"), src / "adapter_model.safetensors", "no kohya LoRA keys")
    one_line_refusal(merge_cli(tmp_path, src, "--format", "lycoris"), "--format", "must be auto")


def test_add_takes_format_too(tmp_path):
    assert merge_cli(tmp_path, peft(tmp_path / "p", seed=1)).exit_code == 0
    k = kohya(tmp_path / "k.safetensors", seed=2)
    result = runner.invoke(app, ["add", str(k), "--zoo", str(tmp_path / "zoo"), "--format", "diffusers"])
    one_line_refusal(result, k, "no diffusers LoRA keys")
    result = runner.invoke(app, ["add", str(k), "--zoo", str(tmp_path / "zoo"), "--format", "kohya", "-q"])
    assert result.exit_code == 0, result.output


def test_two_layouts_in_one_file_and_half_pairs(tmp_path):
    mixed = tmp_path / "mixed.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.lora_up.weight": torch.ones(4, 2),
               "base_model.model.b.lora_A.weight": torch.ones(2, 3)}, str(mixed))
    one_line_refusal(merge_cli(tmp_path, mixed), mixed, "two layouts")
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.alpha": torch.tensor(1.0)}, str(half))
    one_line_refusal(merge_cli(tmp_path, half), half, "has lora_down but no lora_up")
    bad_alpha = tmp_path / "alpha.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.lora_up.weight": torch.ones(4, 2),
               "lora_unet_a.alpha": torch.ones(2)}, str(bad_alpha))
    one_line_refusal(merge_cli(tmp_path, bad_alpha), bad_alpha, "expected a scalar")


def test_export_never_leaves_half_a_file(tmp_path, monkeypatch):
    src = kohya(tmp_path / "k.safetensors", seed=4)
    zoo = sharecompress.merge([str(src)], tmp_path / "zoo", k=LOSSLESS)
    target = tmp_path / "out" / "k.safetensors"
    zoo.export("k", target)
    before = target.read_bytes()
    with pytest.raises(sharecompress.errors.ZooError, match="--force"):
        zoo.export("k", target)

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr("sharecompress.ops.export.save_tensors", boom)
    with pytest.raises(OSError):
        zoo.export("k", target, force=True)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["k.safetensors"]


def test_text_encoder_modules_with_and_without_text_model_are_one_module(tmp_path):
    from torch import nn

    from factories import write_diffusers_dir, write_kohya_file

    gen = torch.Generator().manual_seed(8)
    factors = [(torch.randn(6, 2, generator=gen), torch.randn(2, 5, generator=gen)) for _ in range(2)]
    kohya = write_kohya_file(tmp_path / "k.safetensors", {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": factors[0]}, alpha=2.0)
    diffusers = write_diffusers_dir(tmp_path / "d", {"text_encoder.encoder.layers.0.self_attn.q_proj": (*factors[1], "peft")})
    zoo = sharecompress.merge([str(kohya), str(diffusers)], tmp_path / "zoo", k=4)
    assert len(zoo.modules) == 1 and zoo.modules[next(iter(zoo.modules))]["adapters"] == 2
    # and the runtime finds it in a text encoder that has text_model inside
    model = nn.Module()
    model.text_model = nn.Module()
    model.text_model.encoder = nn.Module()
    model.text_model.encoder.layers = nn.ModuleList([nn.Module()])
    model.text_model.encoder.layers[0].self_attn = nn.Module()
    model.text_model.encoder.layers[0].self_attn.q_proj = nn.Linear(5, 6)
    rt = zoo.attach(model)
    assert [target for target, _ in rt.modules.values()] == ["text_model.encoder.layers.0.self_attn.q_proj"]
