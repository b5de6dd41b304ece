"""Bad input: one line on stderr naming the file and the problem, exit 2, nothing written."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from sharecompress.cli import app

from factories import PREFIX, random_factors, write_peft_adapter

MODULES = {"layers.0.q_proj": (12, 10), "layers.0.v_proj": (12, 10)}
runner = CliRunner()


def good(tmp_path, name="good", seed=0, **kw):
    return write_peft_adapter(tmp_path / name, random_factors(MODULES, 2, seed=seed), **kw)


def merge(tmp_path, *sources, extra=()):
    return runner.invoke(app, ["merge", *map(str, sources), "--zoo", str(tmp_path / "zoo"), "-k", "2", *extra])


def assert_refused(result, tmp_path, needle, named):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert needle.lower() in lines[0].lower()
    assert str(named) in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "zoo").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".zoo")]


def with_tensors(tmp_path, name, tensors, config=True):
    path = tmp_path / name
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    if config:
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    return path


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.safetensors"
    bad.write_bytes(b"")
    assert_refused(merge(tmp_path, good(tmp_path), bad, extra=["--alpha", "4"]), tmp_path, "empty or truncated", bad)


def test_truncated_file(tmp_path):
    src = good(tmp_path, "cut")
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    assert_refused(merge(tmp_path, good(tmp_path), src), tmp_path, "truncated", weights)


def test_not_safetensors(tmp_path):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(b"this is plainly some text and not a tensor file at all")
    assert_refused(merge(tmp_path, bad, extra=["--alpha", "4"]), tmp_path, "not a safetensors file", bad)


def test_header_not_json(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 8)
    assert_refused(merge(tmp_path, bad, extra=["--alpha", "4"]), tmp_path, "not valid JSON", bad)


def test_absurd_header_length(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    assert_refused(merge(tmp_path, bad, extra=["--alpha", "4"]), tmp_path, "header claims", bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf(tmp_path, value):
    factors = random_factors(MODULES, 2, seed=1)
    factors["layers.0.v_proj"][1][1, 3] = value
    src = write_peft_adapter(tmp_path / "poisoned", factors)
    assert_refused(merge(tmp_path, good(tmp_path), src), tmp_path, "NaN or Inf", src / "adapter_model.safetensors")


@pytest.mark.parametrize("extra", [(), ("--budget", "2kB")])
def test_finite_factors_too_large_to_decompose(tmp_path, extra):
    """float64 factors of 1e160 are finite, but their Grams overflow: one line, nothing written (it
    was a LinAlgError traceback, with a budget too: review findings)."""
    sources = [write_peft_adapter(tmp_path / f"h{i}", {m: (b.double() * 1e160 * (i + 1), a.double()) for m, (b, a)
                                                       in random_factors(MODULES, 2, seed=i).items()}, dtype=torch.float64)
               for i in range(4)]
    args = ["merge", *map(str, sources), "--zoo", str(tmp_path / "zoo"), *(extra or ("-k", "2"))]
    assert_refused(runner.invoke(app, args), tmp_path, "could not be decomposed", "" if extra else "the adapters")


def test_lora_a_without_b(tmp_path):
    src = with_tensors(tmp_path, "half", {f"{PREFIX}layers.0.q_proj.lora_A.weight": torch.randn(2, 10)})
    assert_refused(merge(tmp_path, src), tmp_path, "has lora_A but no lora_B", src / "adapter_model.safetensors")


def test_ranks_disagree(tmp_path):
    src = with_tensors(tmp_path, "ranks", {
        f"{PREFIX}layers.0.q_proj.lora_A.weight": torch.randn(2, 10),
        f"{PREFIX}layers.0.q_proj.lora_B.weight": torch.randn(12, 3),
    })
    assert_refused(merge(tmp_path, src), tmp_path, "lora_A has rank 2 but lora_B has rank 3", src / "adapter_model.safetensors")


def test_module_shape_differs_between_adapters(tmp_path):
    other = write_peft_adapter(tmp_path / "wide", random_factors({"layers.0.q_proj": (12, 11)}, 2, seed=3))
    assert_refused(merge(tmp_path, good(tmp_path), other), tmp_path, "has shape 12x11 here but 12x10", other / "adapter_model.safetensors")


def test_no_lora_tensors(tmp_path):
    src = with_tensors(tmp_path, "none", {"classifier.weight": torch.randn(2, 3)})
    assert_refused(merge(tmp_path, src), tmp_path, "no LoRA tensors", src / "adapter_model.safetensors")


def test_integer_tensors(tmp_path):
    src = with_tensors(tmp_path, "ints", {
        f"{PREFIX}layers.0.q_proj.lora_A.weight": torch.ones(2, 10, dtype=torch.int32),
        f"{PREFIX}layers.0.q_proj.lora_B.weight": torch.ones(12, 2, dtype=torch.int32),
    })
    assert_refused(merge(tmp_path, src), tmp_path, "integer dtype", src / "adapter_model.safetensors")


@pytest.mark.parametrize("text,needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"peft_type": "LORA", "r": -3, "lora_alpha": 8}', "invalid r"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": "big"}', "invalid lora_alpha"),
    ('{"peft_type": "IA3"}', "is not LoRA"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true}', "DoRA"),
    ('{"peft_type": "LORA", "r": 5, "lora_alpha": 4}', "config gives r=5"),
])
def test_invalid_adapter_config(tmp_path, text, needle):
    src = good(tmp_path, "cfg")
    (src / "adapter_config.json").write_text(text)
    assert_refused(merge(tmp_path, good(tmp_path), src), tmp_path, needle, src / "adapter_config.json")


def test_unreadable_config(tmp_path):
    src = good(tmp_path, "cfg")
    (src / "adapter_config.json").unlink()
    (src / "adapter_config.json").mkdir()
    assert_refused(merge(tmp_path, src), tmp_path, "cannot read adapter config", src / "adapter_config.json")


def test_empty_directory(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert_refused(merge(tmp_path, empty), tmp_path, "empty directory", empty)


def test_two_adapters_with_one_name(tmp_path):
    a = good(tmp_path / "x", "same")
    b = good(tmp_path / "y", "same", seed=1)
    assert_refused(merge(tmp_path, a, b), tmp_path, "used twice", b)


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt"])
def test_pickle_checkpoints_are_refused(tmp_path, name):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    (src / name).write_bytes(b"\x80\x04 not to be unpickled")
    assert_refused(merge(tmp_path, src), tmp_path, "pickle", src / name)
    assert_refused(merge(tmp_path, src / name), tmp_path, "pickle", src / name)


def test_dora_magnitude_vector_is_refused(tmp_path):
    src = with_tensors(tmp_path, "dora", {
        f"{PREFIX}layers.0.q_proj.lora_A.weight": torch.randn(2, 10),
        f"{PREFIX}layers.0.q_proj.lora_B.weight": torch.randn(12, 2),
        f"{PREFIX}layers.0.q_proj.lora_magnitude_vector": torch.randn(12),
    })
    assert_refused(merge(tmp_path, src), tmp_path, "DoRA", src / "adapter_model.safetensors")


def test_missing_source(tmp_path):
    assert_refused(merge(tmp_path, tmp_path / "nope"), tmp_path, "no such file", tmp_path / "nope")


def test_bare_file_without_config_or_alpha(tmp_path):
    src = good(tmp_path)
    bare = tmp_path / "bare.safetensors"
    (src / "adapter_model.safetensors").rename(bare)
    assert_refused(merge(tmp_path, bare), tmp_path, "pass --alpha", bare)


def test_existing_zoo_is_not_overwritten_without_force(tmp_path):
    src = good(tmp_path)
    assert merge(tmp_path, src).exit_code == 0
    before = (tmp_path / "zoo" / "manifest.json").read_bytes()
    again = merge(tmp_path, src, good(tmp_path, "second", seed=4))
    assert again.exit_code == 2 and "--force" in again.stderr
    assert (tmp_path / "zoo" / "manifest.json").read_bytes() == before
    forced = merge(tmp_path, src, good(tmp_path, "second", seed=4), extra=["--force"])
    assert forced.exit_code == 0, forced.output
    assert len(json.loads((tmp_path / "zoo" / "manifest.json").read_text())["adapters"]) == 2


def test_report_json_and_max_error_gate(tmp_path):
    srcs = [good(tmp_path, f"a{i}", seed=i) for i in range(3)]
    assert merge(tmp_path, *srcs).exit_code == 0
    result = runner.invoke(app, ["report", "--zoo", str(tmp_path / "zoo"), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    worst = max(a["relative_error"] for a in data["adapters"])
    assert worst > 0
    over = runner.invoke(app, ["report", "--zoo", str(tmp_path / "zoo"), "--json", "--max-error", str(worst / 2)])
    assert over.exit_code == 1
    under = runner.invoke(app, ["report", "--zoo", str(tmp_path / "zoo"), "--max-error", str(worst * 1.01)])
    assert under.exit_code == 0


def test_report_on_a_directory_that_is_not_a_zoo(tmp_path):
    result = runner.invoke(app, ["report", "--zoo", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a zoo" in result.stderr


def test_flags_are_named_in_errors_and_counts_read_right(tmp_path):
    from typer.testing import CliRunner

    from sharecompress.cli import app
    from factories import random_factors, write_peft_adapter

    src = str(write_peft_adapter(tmp_path / "only", random_factors({"layers.0.q_proj": (8, 6)}, 2, seed=0)))
    runner = CliRunner()
    assert "-k must be at least 1" in runner.invoke(app, ["merge", src, "--zoo", str(tmp_path / "z"), "-k", "0"]).output
    assert "--dtype fp16: choose auto, float32" in runner.invoke(app, ["merge", src, "--zoo", str(tmp_path / "z"), "--dtype", "fp16"]).output
    done = runner.invoke(app, ["merge", src, "--zoo", str(tmp_path / "z"), "-k", "2"])
    assert "(1 adapter, 1 module)" in done.output


def test_report_takes_several_originals_after_against_and_verify_speaks_json(tmp_path):
    import json

    from typer.testing import CliRunner

    from sharecompress.cli import app
    from factories import random_factors, write_peft_adapter

    modules = {"layers.0.q_proj": (12, 10)}
    paths = [str(write_peft_adapter(tmp_path / f"a{i}", random_factors(modules, 2, seed=i))) for i in range(3)]
    runner = CliRunner()
    zoo = str(tmp_path / "zoo")
    runner.invoke(app, ["merge", *paths[:2], "--zoo", zoo, "-k", "1", "-q"])
    runner.invoke(app, ["add", paths[2], "--zoo", zoo, "-q"])
    out = runner.invoke(app, ["report", "--zoo", zoo, "--json", "--against", *paths])  # as a shell glob expands
    assert out.exit_code == 0, out.output
    assert all(a["exact"] for a in json.loads(out.output)["adapters"])
    checked = runner.invoke(app, ["verify", "--zoo", zoo, "--json"])
    assert checked.exit_code == 0 and json.loads(checked.output) == {"problems": [], "notes": []}


def test_piped_list_prints_every_name_in_full(tmp_path):
    from typer.testing import CliRunner

    from sharecompress.cli import app
    from factories import random_factors, write_peft_adapter

    name = "a_rather_long_adapter_name_that_an_eighty_column_table_would_cut_short_" + "x" * 20
    src = str(write_peft_adapter(tmp_path / name, random_factors({"layers.0.q_proj": (8, 6)}, 2, seed=0)))
    runner = CliRunner()
    runner.invoke(app, ["merge", src, "--zoo", str(tmp_path / "zoo"), "-k", "2", "-q"])
    listed = runner.invoke(app, ["list", "--zoo", str(tmp_path / "zoo")])
    assert name in listed.output and str(tmp_path / name) in listed.output


def test_torch_is_imported_with_the_collector_paused_then_frozen():
    """The commands that need torch import it with the cyclic collector off (it walked torch's 10⁵
    new objects again and again), freeze what it made and turn the collector back on, also when
    the import fails."""
    import subprocess
    import sys

    imported = ("import gc, sys\nfrom sharecompress.cli import torch_imported\ntorch_imported()\n"
                "assert 'torch' in sys.modules and gc.isenabled(), gc.isenabled()\n"
                "assert gc.get_freeze_count() > 10000, gc.get_freeze_count()\n")
    failing = ("import gc, sys\nfrom sharecompress.cli import torch_imported\n"
               "class Refuse:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch':\n            raise ImportError('no torch here')\n"
               "sys.meta_path.insert(0, Refuse())\ntry:\n    torch_imported()\nexcept ImportError:\n    pass\n"
               "else:\n    raise AssertionError('imported')\nassert gc.isenabled()\n")
    left_off = ("import gc, sys\nfrom sharecompress.cli import torch_imported\ngc.disable()\ntorch_imported()\n"
                "assert 'torch' in sys.modules and not gc.isenabled()\n")  # as an embedding program left it
    for code in (imported, failing, left_off):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-500:]


def test_help_and_list_do_not_import_torch(tmp_path):
    import subprocess
    import sys

    from factories import random_factors, write_peft_adapter
    import sharecompress

    src = str(write_peft_adapter(tmp_path / "a", random_factors({"layers.0.q_proj": (8, 6)}, 2, seed=0)))
    sharecompress.merge([src], tmp_path / "zoo", k=2)
    for args in (["--help"], ["merge", "--help"], ["list", "--zoo", str(tmp_path / "zoo")]):
        code = ("import sys\nfrom sharecompress.cli import app\ntry:\n    app(%r)\nexcept SystemExit as e:\n"
                "    assert not e.code, e.code\nassert 'torch' not in sys.modules, 'torch imported'\n" % (args,))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, (args, done.stderr[-500:])
