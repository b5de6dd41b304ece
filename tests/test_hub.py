"""Hub ids as sources: resolved from a local Hugging Face cache laid out as huggingface_hub does it.

Nothing here downloads: every test runs with the socket layer refusing connections.
"""

import hashlib
import json
import os
import socket
import time

import pytest
from typer.testing import CliRunner

from sharecompress.cli import app
from sharecompress.errors import InputError
from sharecompress.io.hub import parse_hub_id, resolve_hub_source

from factories import random_factors, write_peft_adapter

MODULES = {"layers.0.q_proj": (12, 10), "layers.0.v_proj": (12, 10)}
runner = CliRunner()


def cache_adapter(cache, tmp_path, repo_id, seed, refs=("main",), files=None):
    """A PEFT adapter in the cache: refs/<ref> → commit, snapshots/<commit>/* → ../../blobs/<sha256>."""
    built = write_peft_adapter(tmp_path / "built" / f"{seed}", random_factors(MODULES, 2, seed=seed))
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}{seed}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for sub in (repo / "blobs", repo / "refs", snapshot):
        sub.mkdir(parents=True, exist_ok=True)
    for file in sorted(built.iterdir()):
        if files is not None and file.name not in files:
            continue
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        os.replace(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache named by HF_HUB_CACHE, offline, cwd in tmp_path, and no network at all."""
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return root


def merge(tmp_path, *sources):
    return runner.invoke(app, ["merge", *sources, "--zoo", str(tmp_path / "zoo"), "-k", "2"])


def manifest(tmp_path):
    return json.loads((tmp_path / "zoo" / "manifest.json").read_text())


def assert_refused(result, tmp_path, needle, named):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and named in lines[0], lines[0]
    assert not (tmp_path / "zoo").exists()


@pytest.mark.parametrize("revision", ["", "@main", "@hash", "@short"])
def test_hub_ids_resolve_and_merge(cache, tmp_path, revision):
    commit = cache_adapter(cache, tmp_path, "owner/ada", seed=1)
    cache_adapter(cache, tmp_path, "other.org/bea_2", seed=2)
    revision = {"@hash": f"@{commit}", "@short": f"@{commit[:10]}"}.get(revision, revision)
    result = merge(tmp_path, f"owner/ada{revision}", "other.org/bea_2")
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in manifest(tmp_path)["adapters"]}
    assert set(entries) == {"owner--ada", "other.org--bea_2"}
    assert entries["owner--ada"]["source"] == f"owner/ada@{commit}"
    blob = (cache / "models--owner--ada" / "snapshots" / commit / "adapter_model.safetensors").resolve()
    assert entries["owner--ada"]["sha256"] == hashlib.sha256(blob.read_bytes()).hexdigest()
    report = runner.invoke(app, ["report", "--zoo", str(tmp_path / "zoo"), "--json", "--against", "owner/ada"])
    assert report.exit_code == 0, report.output
    exact = {a["name"]: a["exact"] for a in json.loads(report.stdout)["adapters"]}
    assert exact["owner--ada"] is True


def test_missing_id_is_one_line_and_quick(cache, tmp_path):
    with pytest.raises(InputError):
        resolve_hub_source("owner/other")  # first call imports huggingface_hub: not what is timed
    start = time.perf_counter()
    with pytest.raises(InputError):
        resolve_hub_source("owner/missing")
    assert time.perf_counter() - start < 1.0  # a cache lookup, never a network timeout
    result = merge(tmp_path, "owner/missing")
    assert_refused(result, tmp_path, "not in the local Hugging Face cache", "owner/missing")
    assert str(cache) in result.stderr


def test_missing_revision(cache, tmp_path):
    cache_adapter(cache, tmp_path, "owner/ada", seed=1)
    result = merge(tmp_path, "owner/ada@v2")
    assert_refused(result, tmp_path, "revision 'v2' is not in the local Hugging Face cache", "owner/ada@v2")
    assert "cached: main" in result.stderr


def test_snapshot_without_adapter_weights(cache, tmp_path):
    cache_adapter(cache, tmp_path, "owner/cfg-only", seed=1, files={"adapter_config.json"})
    result = merge(tmp_path, "owner/cfg-only")
    assert_refused(result, tmp_path, "has no adapter_model.safetensors", "owner/cfg-only")


def test_dangling_symlink(cache, tmp_path):
    commit = cache_adapter(cache, tmp_path, "owner/ada", seed=1)
    link = cache / "models--owner--ada" / "snapshots" / commit / "adapter_model.safetensors"
    link.resolve().unlink()
    result = merge(tmp_path, "owner/ada")
    assert_refused(result, tmp_path, "points to a missing blob", "owner/ada")


def test_local_directory_named_like_an_id_wins(cache, tmp_path):
    cache_adapter(cache, tmp_path, "owner/ada", seed=1)
    write_peft_adapter(tmp_path / "owner" / "ada", random_factors(MODULES, 2, seed=5))
    result = merge(tmp_path, "owner/ada", "owner/ada@main")
    assert result.exit_code == 0, result.output
    sources = {e["name"]: e["source"] for e in manifest(tmp_path)["adapters"]}
    assert sources["ada"] == "owner/ada"
    assert sources["owner--ada"].startswith("owner/ada@")


@pytest.mark.parametrize(
    "source, parsed",
    [
        ("owner/name", ("owner/name", None)),
        ("owner/name@refs/pr/1", ("owner/name", "refs/pr/1")),
        ("a/b.c@v1.0", ("a/b.c", "v1.0")),
        ("a/b/c", None),
        ("./name", None),
        ("owner/na--me", None),
        ("owner/name@", None),
        ("owner/name@../x", None),
        ("owner/*", None),
        ("adapters/x.safetensors", None),
        ("name", None),
    ],
)
def test_what_reads_as_a_hub_id(source, parsed):
    assert parse_hub_id(source) == parsed
