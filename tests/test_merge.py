"""merge → zoo on disk → report: every figure equals a dense float64 reference."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import sharecompress
from sharecompress import Zoo

from factories import (
    PREFIX, dense_delta, dense_reconstruction, planted_basis, random_factors, scale_of, write_peft_adapter,
)

MODULES = {"layers.0.q_proj": (24, 20), "layers.0.v_proj": (24, 20), "layers.1.o_proj": (20, 24)}


def make_zoo(tmp_path, specs, modules=MODULES, basis=None, noise=0.0, dtype=torch.float32):
    """specs: list of (rank, alpha, rslora). Returns (source paths, {name: (factors, scale)})."""
    paths, truth = [], {}
    for i, (rank, alpha, rslora) in enumerate(specs):
        factors = random_factors(modules, rank, seed=100 + i, basis=basis, noise=noise)
        name = f"adapter{i}"
        paths.append(str(write_peft_adapter(tmp_path / "src" / name, factors, alpha=alpha, rslora=rslora, dtype=dtype)))
        rounded = {m: (b.to(dtype).double(), a.to(dtype).double()) for m, (b, a) in factors.items()}
        truth[name] = (rounded, scale_of(alpha, rank, rslora))
    return paths, truth


def dense_errors(zoo: Zoo, truth):
    """{adapter: {module: (err², norm²)}} computed densely from the stored tensors."""
    bases = zoo.bases()
    out = {}
    for name, (factors, scale) in truth.items():
        cores = zoo.cores(name)
        out[name] = {}
        for module, (b, a) in factors.items():
            key = PREFIX + module
            U, V = bases[key]
            E, F = cores[key]
            delta = dense_delta(b, a, scale)
            diff = delta - dense_reconstruction(U, E, F, V)
            out[name][key] = (float((diff**2).sum()), float((delta**2).sum()))
    return out


def assert_close(got, want, rel=1e-6, abs_=1e-9):
    assert got == pytest.approx(want, rel=rel, abs=abs_)


def test_every_reported_error_equals_the_dense_reference(tmp_path):
    specs = [(4, 16, False), (2, 8, False), (6, 12, True), (4, 32, False), (3, 3, True)]
    paths, truth = make_zoo(tmp_path, specs)
    zoo = sharecompress.merge(paths, tmp_path / "zoo", k=5)
    report = zoo.report()
    dense = dense_errors(zoo, truth)
    all_err = all_norm = 0.0
    for entry in report["adapters"]:
        per = dense[entry["name"]]
        err, norm = sum(e for e, _ in per.values()), sum(n for _, n in per.values())
        all_err, all_norm = all_err + err, all_norm + norm
        assert_close(entry["relative_error"], math.sqrt(err / norm))
        for module, (e, n) in per.items():
            assert_close(entry["modules"][module], math.sqrt(e / n))
        assert_close(entry["max_module_error"], max(math.sqrt(e / n) for e, n in per.values()))
    assert_close(report["relative_error"], math.sqrt(all_err / all_norm))
    assert 0.05 < report["relative_error"] < 1.0  # lossy at k=5: the check above means something


def test_report_json_shape_and_bytes(tmp_path):
    specs = [(4, 16, False), (8, 16, False), (4, 8, True)]
    paths, _ = make_zoo(tmp_path, specs)
    report = sharecompress.merge(paths, tmp_path / "zoo", k=6).report()
    assert set(report) >= {"relative_error", "bytes_original", "bytes_compressed", "compression_ratio", "modules", "adapters"}
    q_proj = report["modules"][PREFIX + "layers.0.q_proj"]
    assert (q_proj["shape"], q_proj["k"], q_proj["k_u"], q_proj["k_v"]) == ([24, 20], 6, 6, 6)
    # original: Σ r (n + d) fp32 per module; compressed: k (n + d) + Σ 2 k p, all fp32
    original = sum(r * 44 * 4 * 3 for r, _, _ in specs)
    compressed = 3 * (6 * 44 * 4) + sum(3 * 2 * 6 * min(r, 6) * 4 for r, _, _ in specs)
    assert report["bytes_original"] == original
    assert report["bytes_compressed"] == compressed
    assert report["compression_ratio"] == pytest.approx(original / compressed)
    for entry in report["adapters"]:
        assert set(entry) >= {"name", "rank", "relative_error", "max_module_error", "modules"}


def test_planted_shared_subspace_is_recovered(tmp_path):
    basis = planted_basis(MODULES, 4, seed=7)
    paths, _ = make_zoo(tmp_path, [(3, 8, False)] * 6 + [(2, 4, True)] * 2, basis=basis, dtype=torch.float64)
    for k in (4, 6):
        report = sharecompress.merge(paths, tmp_path / f"zoo{k}", k=k).report()
        assert report["relative_error"] < 1e-6
    lossy = sharecompress.merge(paths, tmp_path / "zoo3", k=3).report()
    assert lossy["relative_error"] > 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_share_is_never_worse_than_the_paper_recipe(tmp_path, seed):
    torch.manual_seed(seed)
    basis = planted_basis(MODULES, 6, seed=seed)
    specs = [(4, 4 * (1 + i % 3), i % 2 == 0) for i in range(6)]
    paths, _ = make_zoo(tmp_path, specs, basis=basis, noise=0.5)
    for k in (3, 5, 8):
        share = sharecompress.merge(paths, tmp_path / f"s{k}", k=k).report()["relative_error"]
        paper = sharecompress.merge(paths, tmp_path / f"p{k}", k=k, method="paper").report()["relative_error"]
        assert share <= paper + 1e-9


def test_rectangular_modules_get_a_k_per_side_and_stay_lossless(tmp_path):
    """n < Σr < d: U is full at n columns while V still needs all Σr directions."""
    mods = {"layers.0.up_proj": (6, 30)}
    paths = [str(write_peft_adapter(tmp_path / f"r{i}", random_factors(mods, 3, seed=i))) for i in range(3)]
    zoo = sharecompress.merge(paths, tmp_path / "zoo", k=1000)
    module = zoo.report()["modules"][PREFIX + "layers.0.up_proj"]
    assert (module["k_u"], module["k_v"]) == (6, 9)
    assert zoo.report()["relative_error"] < 1e-6
    from sharecompress.store.verify import verify

    assert verify(tmp_path / "zoo")[0] == []


def test_k_is_capped_and_then_lossless(tmp_path):
    paths, _ = make_zoo(tmp_path, [(2, 4, False), (3, 6, False)])
    zoo = sharecompress.merge(paths, tmp_path / "zoo", k=1000)
    report = zoo.report()
    assert all(m["k"] == 5 for m in report["modules"].values())  # Σr = 5 < n, d
    assert report["relative_error"] < 1e-6


def test_energy_target_picks_k_per_module(tmp_path):
    basis = planted_basis(MODULES, 3, seed=2)
    paths, _ = make_zoo(tmp_path, [(3, 8, False)] * 5, basis=basis, noise=0.01)
    report = sharecompress.merge(paths, tmp_path / "zoo", energy=0.99).report()
    assert all(m["k"] == 3 for m in report["modules"].values())
    assert report["energy_kept"] >= 0.99 - 1e-9
    default = sharecompress.merge(paths, tmp_path / "zoo_default").report()
    assert default["modules"] == report["modules"]  # the default is energy 0.99


@pytest.mark.parametrize("target", [0.9, 0.99])
def test_energy_target_holds_in_every_module_and_k_may_pass_32(tmp_path, target):
    """A 40-dimensional shared span: reaching 0.99 needs more directions than the first solve's 32."""
    modules = {"wide.q": (120, 100), "wide.v": (100, 120)}
    basis = planted_basis(modules, 40, seed=5)
    paths, truth = make_zoo(tmp_path, [(8, 16, False)] * 10, modules=modules, basis=basis, noise=0.05)
    zoo = sharecompress.merge(paths, tmp_path / "zoo", energy=target)
    dense = dense_errors(zoo, truth)
    for module, info in zoo.report()["modules"].items():
        err2 = sum(dense[name][module][0] for name in dense)
        norm2 = sum(dense[name][module][1] for name in dense)
        assert 1 - err2 / norm2 >= target - 1e-9, module
        assert info["energy_kept"] == pytest.approx(1 - err2 / norm2, rel=1e-9)
    ks = [m["k"] for m in zoo.report()["modules"].values()]
    assert max(ks) < 80  # lossy: the target, not the full rank (Σr = 80), set k
    if target == 0.99:
        assert max(ks) > 32


@pytest.mark.parametrize("dtype,store", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_half_precision_inputs(tmp_path, dtype, store):
    paths, truth = make_zoo(tmp_path, [(4, 16, False), (4, 8, True), (2, 4, False)], dtype=dtype)
    zoo = sharecompress.merge(paths, tmp_path / "zoo", k=4)
    assert zoo.manifest["dtype"] == store
    basis_file = load_file(str(tmp_path / "zoo" / "basis.safetensors"))
    assert all(t.dtype == dtype for t in basis_file.values())
    dense = dense_errors(zoo, truth)
    for entry in zoo.report()["adapters"]:
        for module, (e, n) in dense[entry["name"]].items():
            assert_close(entry["modules"][module], math.sqrt(e / n))
    as_fp32 = sharecompress.merge(paths, tmp_path / "zoo32", k=4, dtype="float32")
    assert as_fp32.manifest["dtype"] == "float32"


def test_extras_are_kept_byte_identical(tmp_path):
    head = torch.randn(3, 24, dtype=torch.float32)
    bias = torch.randn(3, dtype=torch.bfloat16)
    factors = random_factors(MODULES, 4, seed=1)
    src = write_peft_adapter(
        tmp_path / "with_head", factors,
        extras={"base_model.model.score.weight": head, "base_model.model.score.bias": bias},
        config={"modules_to_save": ["score"]},
    )
    other = write_peft_adapter(tmp_path / "plain", random_factors(MODULES, 4, seed=2))
    zoo = sharecompress.merge([str(src), str(other)], tmp_path / "zoo", k=3)
    kept = zoo.extras("with_head")
    assert kept["base_model.model.score.weight"].numpy().tobytes() == head.numpy().tobytes()
    assert kept["base_model.model.score.bias"].view(torch.int16).numpy().tobytes() == bias.view(torch.int16).numpy().tobytes()
    assert zoo.extras("plain") == {}
    assert zoo.report()["bytes_extras"] == head.numel() * 4 + bias.numel() * 2


def test_rank_and_alpha_patterns_set_the_scale(tmp_path):
    factors = random_factors({"layers.0.q_proj": (24, 20)}, 4, seed=3)
    factors.update(random_factors({"layers.0.v_proj": (24, 20)}, 2, seed=4))
    src = write_peft_adapter(
        tmp_path / "pat", factors, alpha=8,
        config={"r": 4, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.0.v_proj": 6}},
    )
    zoo = sharecompress.merge([str(src)], tmp_path / "zoo", k=8)
    mods = zoo.adapter("pat")["modules"]
    assert mods[PREFIX + "layers.0.q_proj"]["scale"] == pytest.approx(8 / 4)
    assert mods[PREFIX + "layers.0.v_proj"]["scale"] == pytest.approx(6 / 2)
    b, a = factors["layers.0.v_proj"]
    assert mods[PREFIX + "layers.0.v_proj"]["norm2"] == pytest.approx(float((dense_delta(b.float().double(), a.float().double(), 3.0) ** 2).sum()), rel=1e-9)


def test_all_zero_adapter_is_valid(tmp_path):
    zero = {m: (torch.zeros(n, 4), torch.randn(4, d)) for m, (n, d) in MODULES.items()}
    paths, _ = make_zoo(tmp_path, [(4, 16, False), (4, 16, False)])
    paths.append(str(write_peft_adapter(tmp_path / "src" / "untrained", zero)))
    report = sharecompress.merge(paths, tmp_path / "zoo", k=4).report()
    untrained = next(a for a in report["adapters"] if a["name"] == "untrained")
    assert untrained["relative_error"] == 0.0 and untrained["max_module_error"] == 0.0
    json.dumps(report, allow_nan=False)


def test_adapters_may_cover_different_modules(tmp_path):
    one = write_peft_adapter(tmp_path / "one", random_factors({"layers.0.q_proj": (24, 20)}, 4, seed=1))
    two = write_peft_adapter(tmp_path / "two", random_factors(MODULES, 4, seed=2))
    zoo = sharecompress.merge([str(one), str(two)], tmp_path / "zoo", k=8)
    assert set(zoo.adapter("one")["modules"]) == {PREFIX + "layers.0.q_proj"}
    assert zoo.modules[PREFIX + "layers.0.v_proj"]["adapters"] == 1
    assert zoo.report()["relative_error"] < 1e-6


def test_bare_safetensors_with_rank_and_alpha(tmp_path):
    factors = random_factors(MODULES, 4, seed=5)
    src = write_peft_adapter(tmp_path / "dir", factors, alpha=12)
    bare = tmp_path / "bare"
    bare.mkdir()
    (src / "adapter_model.safetensors").rename(bare / "solo.safetensors")
    zoo = sharecompress.merge([str(bare / "solo.safetensors")], tmp_path / "zoo", k=2, alpha=12.0)
    entry = zoo.adapter("solo")
    assert entry["modules"][PREFIX + "layers.0.q_proj"]["scale"] == pytest.approx(3.0)


def test_progress_advances_per_module_within_one_batch(tmp_path, monkeypatch):
    from sharecompress.ops import merge as merge_op

    monkeypatch.setattr(merge_op, "compute_workers", lambda device: 1)  # one batch at a time: "the first batch" is one
    specs = [(4, 16, False), (2, 8, False)]
    paths, _ = make_zoo(tmp_path, specs)
    returned = []  # batches whose compute has returned
    real = merge_op.compress_stacked

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        returned.append(len(out))
        return out

    monkeypatch.setattr(merge_op, "compress_stacked", spy)
    seen = []
    sharecompress.merge(paths, tmp_path / "zoo", k=2,
                        progress=lambda done, total, module: seen.append((done, total, module, len(returned))))
    assert returned[0] >= 2 and sum(returned) == len(MODULES)  # the first batch holds two modules of one shape
    assert [done for done, *_ in seen] == list(range(1, len(MODULES) + 1))
    assert all(batches_done == 0 for *_, batches_done in seen[: returned[0]])  # reported while that batch still ran


def _split_adapters(root, c, dtype=torch.float32, rotated=False):
    """Four adapters whose ΔW_t = B0·A0 are stored as (B0·D⁻¹, D·A0), D = diag(logspace(0, −c)):
    one update, split with condition number 10^c. ``rotated``: D = Q₁·diag(…)·Q₂, not diagonal (in
    float32 the stored update itself then moves by ε₃₂·10^c, so only float64 keeps it one update)."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    sources = []
    for i in range(4):
        B0, A0 = torch.randn(24, 8, generator=g, dtype=torch.float64) * 0.3, torch.randn(8, 40, generator=g, dtype=torch.float64) * 0.2
        D = torch.diag(torch.logspace(0, -c, 8, dtype=torch.float64))
        if rotated:
            D = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0] @ D @ torch.linalg.qr(
                torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
        p = root / f"c{c}" / f"a{i}"
        p.mkdir(parents=True)
        save_file({"base_model.model.q_proj.lora_A.weight": (D @ A0).to(dtype),
                   "base_model.model.q_proj.lora_B.weight": (B0 @ torch.linalg.inv(D)).to(dtype)}, str(p / "adapter_model.safetensors"))
        (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]}))
        sources.append(str(p))
    return sources


@pytest.mark.parametrize("dtype, rotated", [(torch.float32, False), (torch.float64, True)])
@pytest.mark.parametrize("sketched", [False, True])
def test_a_badly_conditioned_split_gives_the_same_zoo(tmp_path, monkeypatch, sketched, dtype, rotated):
    """Gauge invariance with a split of condition number up to 1e6 (a float32 Gram's root lost it, and
    float64 factors rounded apart to float32 in the sketch: review findings), on the exact path and on
    the sketched one."""
    if sketched:
        from sharecompress.core import linalg

        monkeypatch.setattr(linalg, "EXACT_LIMIT", 8)
    errors = [sharecompress.merge(_split_adapters(tmp_path, c, dtype, rotated), tmp_path / f"zoo{c}", k=6).report()["relative_error"]
              for c in (0, 3, 6)]
    assert max(errors) - min(errors) <= 1e-6 * errors[0]


def test_mixed_dtypes_within_a_module_and_half_precision_products(tmp_path):
    from factories import dense_delta, write_peft_adapter

    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(3)
    paths = []
    for i in range(3):  # lora_B in float16, lora_A in float32
        p = write_peft_adapter(tmp_path / "mixed" / f"a{i}", {"q_proj": (torch.randn(12, 4, generator=gen), torch.randn(4, 10, generator=gen))})
        t = load_file(str(p / "adapter_model.safetensors"))
        t = {k: v.half() if "lora_B" in k else v for k, v in t.items()}
        save_file(t, str(p / "adapter_model.safetensors"))
        paths.append(str(p))
    assert sharecompress.merge(paths, tmp_path / "z1", k=4).report()["relative_error"] >= 0.0

    truth, paths = [], []
    for i in range(3):  # float16, a stored rank (16) above min(n, d) = 6: the merge works on B·A, which must not be rounded
        B, A = torch.randn(6, 16, generator=gen, dtype=torch.float64), torch.randn(16, 40, generator=gen, dtype=torch.float64)
        p = write_peft_adapter(tmp_path / "wide" / f"w{i}", {"q_proj": (B, A)}, dtype=torch.float16, alpha=16.0)
        truth.append(dense_delta(B.half().double(), A.half().double(), 1.0))
        paths.append(str(p))
    zoo = sharecompress.merge(paths, tmp_path / "z2", k=3, dtype="float32")
    bases = zoo.bases()
    for name, want in zip(zoo.names, truth):
        (E, F), (U, V) = zoo.cores(name)[PREFIX + "q_proj"], bases[PREFIX + "q_proj"]
        exact = float((want - U.double() @ E.double() @ F.double() @ V.double().T).norm() / want.norm())
        assert zoo.report()["adapters"][zoo.names.index(name)]["relative_error"] == pytest.approx(exact, rel=1e-7)


@pytest.mark.parametrize("sketched", [False, True])
def test_relative_errors_do_not_depend_on_the_factors_scale(tmp_path, monkeypatch, sketched):
    """Every factor times 1e-30, 1e-25 or 1e18 (all finite in float32): the same relative errors and
    cosines as at scale 1 (review findings: float32 products underflowed or overflowed, and a tiny
    lora_A's cosine came out above 1 and the merge refused its own manifest)."""
    from factories import random_factors, write_peft_adapter

    if sketched:
        from sharecompress.core import linalg

        monkeypatch.setattr(linalg, "EXACT_LIMIT", 4)
    modules = {"layers.0.q_proj": (12, 10), "layers.0.v_proj": (12, 10)}
    figures = {}
    for scale in (1.0, 1e-30, 1e-25, 1e18):
        sources = []
        for i in range(4):
            factors = {m: (b * scale * (i + 1), a * scale) for m, (b, a) in random_factors(modules, 2, seed=i).items()}
            sources.append(str(write_peft_adapter(tmp_path / f"s{scale:g}" / f"a{i}", factors)))
        report = sharecompress.merge(sources, tmp_path / f"zoo{scale:g}", k=2).report()["adapters"]
        figures[scale] = [(a["relative_error"], a["init_similarity"]) for a in report]
    for scale, got in figures.items():
        for (err, cos), (err1, cos1) in zip(got, figures[1.0]):
            assert err == pytest.approx(err1, rel=1e-5), scale
            assert cos == pytest.approx(cos1, abs=1e-5) and cos <= 1.0, scale
