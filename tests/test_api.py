"""The Python API and the CLI are one code path: the same inputs give the same figures and files."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import sharecompress
from sharecompress import Zoo
from sharecompress.cli import app

from factories import planted_basis, random_factors, write_peft_adapter

MODULES = {"layers.0.q_proj": (24, 20), "layers.1.v_proj": (24, 20)}
runner = CliRunner()


def sources(tmp_path, count=5):
    basis = planted_basis(MODULES, 4, seed=7)
    return [
        str(write_peft_adapter(tmp_path / "src" / f"task{i}", random_factors(MODULES, 2 + i % 3, seed=i, basis=basis, noise=0.3),
                               alpha=8.0 + i))
        for i in range(count)
    ]


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def as_printed(report: dict) -> dict:
    return json.loads(json.dumps(report))  # the JSON round trip the CLI output goes through


@pytest.mark.parametrize("options", [["-k", "3"], ["--energy", "0.9"]])
def test_merge_add_report_export_agree_between_api_and_cli(tmp_path, options):
    srcs = sources(tmp_path)
    kwargs = {"k": 3} if options[0] == "-k" else {"energy": 0.9}
    api = sharecompress.merge(srcs[:4], tmp_path / "api", **kwargs)
    cli("merge", *srcs[:4], "--zoo", str(tmp_path / "cli"), *options, "-q")
    assert json.loads(cli("report", "--zoo", str(tmp_path / "cli"), "--json")) == as_printed(api.report())

    drift = api.add([srcs[4]])
    cli("add", srcs[4], "--zoo", str(tmp_path / "cli"), "-q")
    from_cli = json.loads(cli("report", "--zoo", str(tmp_path / "cli"), "--json"))
    assert from_cli == as_printed(api.report())
    assert {a["name"]: a["drift"] for a in from_cli["adapters"][:4]} == pytest.approx(drift)
    exact = json.loads(cli("report", "--zoo", str(tmp_path / "cli"), "--json", "--against", str(tmp_path / "src")))
    assert exact == as_printed(api.report(against=srcs))

    api.export("task4", tmp_path / "out-api")
    cli("export", "task4", "--zoo", str(tmp_path / "cli"), "--out", str(tmp_path / "out-cli"))
    a = load_file(str(tmp_path / "out-api" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "out-cli" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zoo_open_sees_what_merge_wrote(tmp_path):
    srcs = sources(tmp_path, 3)
    merged = sharecompress.merge(srcs, tmp_path / "zoo", k=2)
    opened = Zoo.open(tmp_path / "zoo")
    assert opened.names == merged.names == ["task0", "task1", "task2"]
    assert opened.report() == merged.report()
    listed = json.loads(cli("list", "--zoo", str(tmp_path / "zoo"), "--json"))
    assert [row["name"] for row in listed] == opened.names
