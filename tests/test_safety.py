"""A zoo is a trust boundary (issue: safety). One section per guarantee of the README's "Safety".

Every attack runs beside a checksummed sentinel tree outside the zoo; the ``sentinel`` fixture
asserts after each test that nothing in it was created, changed or deleted.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import sharecompress
from sharecompress import Zoo
from sharecompress.cli import app
from sharecompress.errors import ZooChanged, ZooError
from sharecompress.io.names import name_problem
from sharecompress.store.verify import verify

from factories import PREFIX, random_factors, write_peft_adapter

MODULES = {"layers.0.q_proj": (12, 10), "layers.0.v_proj": (12, 10)}
Q = f"{PREFIX}layers.0.q_proj"  # the zoo keeps PEFT's module names
runner = CliRunner()


# ---------------------------------------------------------------- fixtures


def tree_state(root):
    """{relative path: (kind, mode, sha256 or link target)} of everything under ``root``."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            info = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISLNK(info.st_mode):
                state[rel] = ("link", os.readlink(full))
            elif stat.S_ISREG(info.st_mode):
                state[rel] = ("file", stat.S_IMODE(info.st_mode), hashlib.sha256(open(full, "rb").read()).hexdigest())
            else:
                state[rel] = ("dir", stat.S_IMODE(info.st_mode))
    return state


@pytest.fixture
def sentinel(tmp_path):
    """A tree outside the zoo, with files whose names the zoo's scheme also produces."""
    root = tmp_path / "outside"
    (root / "adapters").mkdir(parents=True)
    for rel in ("secret.txt", "basis.safetensors", "manifest.json", "adapters/a0.safetensors",
                "adapters/a0.g2.safetensors", "adapters/x.g9.safetensors"):
        (root / rel).write_bytes(f"precious {rel}\n".encode())
    before = tree_state(root)
    yield root
    assert tree_state(root) == before, "something outside the zoo was created, changed or deleted"


def adapters(tmp_path, count=3, seed=0):
    return [str(write_peft_adapter(tmp_path / "src" / f"a{i}", random_factors(MODULES, 2, seed=seed + i))) for i in range(count)]


@pytest.fixture
def zoo(tmp_path):
    paths = adapters(tmp_path, 4)
    sharecompress.merge(paths[:3], tmp_path / "zoo", k=3)
    return tmp_path / "zoo"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, *needles, code=2):
    """One line on stderr, the given exit code, no traceback; returns the line."""
    assert result.exit_code == code, result.output
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert str(needle).lower() in lines[0].lower(), lines[0]
    return lines[0]


def edit_manifest(zoo_dir, change):
    path = zoo_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def hidden_leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- 1. names are single path components


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\b", "/etc", "C:evil", "a\x00b", "a\nb", "x" * 201, " pad", "\u202eevil"])
def test_unsafe_names_are_refused(name):
    assert name_problem(name) is not None


@pytest.mark.parametrize("name", ["sentiment", "owner--name", "v1.2-final", "ünïcode", ".hidden"])
def test_ordinary_names_pass(name):
    assert name_problem(name) is None


def test_merge_refuses_an_adapter_named_with_a_control_character(tmp_path, sentinel):
    src = write_peft_adapter(tmp_path / "evil\nname", random_factors(MODULES, 2, seed=1))
    refused(cli("merge", src, "--zoo", tmp_path / "zoo", "-k", "2"), "control character")
    assert not (tmp_path / "zoo").exists()


@pytest.mark.parametrize("name", ["../outside/pwned", "/tmp/pwned", "..", "a/b"])
def test_a_manifest_name_that_is_a_path_is_refused_on_open(zoo, tmp_path, sentinel, name):
    edit_manifest(zoo, lambda m: m["adapters"][0].update(name=name))
    refused(cli("export", "--all", "--zoo", zoo, "--out", tmp_path / "out"), "adapters[0].name")
    refused(cli("report", "--zoo", zoo), "adapters[0].name")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [
    ("file", "../outside/secret.txt"), ("file", "/etc/passwd"), ("file", "adapters/../../outside/x.safetensors"),
    ("file", "manifest.json"), ("extras_file", "../../x.safetensors"),
])
def test_a_manifest_file_outside_the_scheme_is_refused(zoo, tmp_path, sentinel, field, value):
    edit_manifest(zoo, lambda m: m["adapters"][0].update({field: value, "extras_sha256": "0" * 64}))
    refused(cli("export", "a0", "--zoo", zoo, "--out", tmp_path / "out"), f"adapters['a0'].{field}")


def test_basis_file_outside_is_refused(zoo, sentinel):
    edit_manifest(zoo, lambda m: m.update(basis_file="../outside/basis.safetensors"))
    refused(cli("verify", "--zoo", zoo), "basis_file", code=1)


def test_export_all_checks_every_target_before_writing_any(zoo, tmp_path, sentinel):
    out = tmp_path / "out"
    (out / "a2").mkdir(parents=True)
    refused(cli("export", "--all", "--zoo", zoo, "--out", out), "a2", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["a2"]  # a0 and a1 were not written either


def test_export_force_replaces_only_an_exported_adapter(zoo, tmp_path, sentinel):
    out = tmp_path / "out"
    assert cli("export", "a0", "--zoo", zoo, "--out", out).exit_code == 0
    assert cli("export", "a0", "--zoo", zoo, "--out", out, "--force").exit_code == 0  # its own export: replaced
    (out / "notes.txt").write_text("mine")
    refused(cli("export", "a0", "--zoo", zoo, "--out", out, "--force"), "holds other files", "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"
    refused(cli("export", "a0", "--zoo", zoo, "--out", sentinel, "--force"), "holds other files")
    refused(cli("export", "a0", "--zoo", zoo, "--out", zoo, "--force"), "inside the zoo")
    refused(cli("export", "a0", "--zoo", zoo, "--out", zoo / "adapters", "--force"), "inside the zoo")
    refused(cli("export", "a0", "--zoo", zoo, "--out", tmp_path, "--force"), "inside the zoo")  # holds the zoo
    (tmp_path / "link").symlink_to(sentinel, target_is_directory=True)
    refused(cli("export", "a0", "--zoo", zoo, "--out", tmp_path / "link", "--force"), "symbolic link")
    assert verify(zoo)[0] == []


def test_report_outputs_never_land_in_the_zoo(zoo):
    before = tree_state(zoo)
    refused(cli("report", "--zoo", zoo, "--html", zoo / "manifest.json"), "inside the zoo")
    assert tree_state(zoo) == before


# ---------------------------------------------------------------- 2. confinement: links are refused, not followed


def test_adapters_dir_linked_outside_is_refused_and_nothing_outside_is_deleted(zoo, tmp_path, sentinel):
    shutil.rmtree(zoo / "adapters")
    (zoo / "adapters").symlink_to(sentinel / "adapters", target_is_directory=True)
    new = write_peft_adapter(tmp_path / "new", random_factors(MODULES, 2, seed=9))
    refused(cli("add", new, "--zoo", zoo), "adapters", "symbolic link")
    refused(cli("export", "a0", "--zoo", zoo, "--out", tmp_path / "out"), "symbolic link")
    assert verify(zoo)[0]


@pytest.mark.parametrize("planted", [".lock", "adapters/a1.g2.safetensors", "basis.g2.safetensors", "manifest.json.tmp"])
def test_a_planted_link_is_refused_and_its_target_untouched(zoo, tmp_path, sentinel, planted):
    (zoo / planted).symlink_to(sentinel / "secret.txt" if planted != ".lock" else sentinel / "created-by-lock")
    new = write_peft_adapter(tmp_path / "new", random_factors(MODULES, 2, seed=9))
    refused(cli("add", new, "--zoo", zoo), "link")
    assert (zoo / planted).is_symlink()  # refused, not "cleaned up" either


def test_a_linked_basis_file_is_never_read(zoo, tmp_path, sentinel):
    real = zoo / "basis.safetensors"
    shutil.copy(real, sentinel.parent / "basis-copy.safetensors")
    real.unlink()
    real.symlink_to(sentinel.parent / "basis-copy.safetensors")  # same bytes, same checksum: still refused
    refused(cli("export", "a0", "--zoo", zoo, "--out", tmp_path / "out"), "symbolic link")


def test_clean_up_deletes_only_the_zoos_own_files(zoo, tmp_path):
    (zoo / "notes.txt").write_text("mine")
    (zoo / "adapters" / "README").write_text("mine")
    (zoo / "adapters" / "stale.g7.safetensors").write_bytes(b"left by a killed writer")
    Zoo.open(zoo).add([write_peft_adapter(tmp_path / "new", random_factors(MODULES, 2, seed=9))])
    assert (zoo / "notes.txt").read_text() == "mine" and (zoo / "adapters" / "README").read_text() == "mine"
    assert not (zoo / "adapters" / "stale.g7.safetensors").exists()
    assert verify(zoo)[0] == []


# ---------------------------------------------------------------- 3. replacing a zoo


def test_force_replaces_only_a_zoo_or_an_empty_directory(tmp_path, sentinel):
    paths = adapters(tmp_path)
    refused(cli("merge", *paths, "--zoo", sentinel, "--force", "-k", "2"), "not a sharecompress zoo")
    (tmp_path / "empty").mkdir()
    assert cli("merge", *paths, "--zoo", tmp_path / "empty", "--force", "-k", "2").exit_code == 0
    assert Zoo.open(tmp_path / "empty").names == ["a0", "a1", "a2"]
    (tmp_path / "zoo-link").symlink_to(tmp_path / "empty", target_is_directory=True)
    refused(cli("merge", *paths, "--zoo", tmp_path / "zoo-link", "--force", "-k", "2"), "symbolic link")
    (tmp_path / "empty" / "mine.txt").write_text("mine")
    refused(cli("merge", *paths, "--zoo", tmp_path / "empty", "--force", "-k", "2"), "not the zoo's", "mine.txt")
    (tmp_path / "empty" / "mine.txt").unlink()
    assert cli("merge", paths[0], "--zoo", tmp_path / "empty", "--force", "-k", "2").exit_code == 0
    assert Zoo.open(tmp_path / "empty").names == ["a0"]
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["rewritten, its mtime set back", "written through a mapping"])
def test_a_manifest_changed_after_it_was_checked_is_checked_again(tmp_path, how):
    """``--force`` checks its target three times and parses a manifest it has seen once: one changed
    since is parsed again and refused, even where its size, mtime and ctime did not change (a
    second write through a mapping leaves them as they were: a review's finding, which a cache by
    file identity let through)."""
    import importlib
    import mmap

    manifest_module = importlib.import_module("sharecompress.store.manifest")
    paths = adapters(tmp_path)
    zoo = tmp_path / "zoo"
    sharecompress.merge(paths, zoo, k=2)
    path = zoo / "manifest.json"
    text = path.read_bytes()
    at = text.index(b'"format":"') + len(b'"format":"')
    if how == "written through a mapping":
        with open(path, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mapped:
            mapped[at : at + 1] = text[at : at + 1]  # the first write dirties the page (and sets the times)
            manifest_module.replaceable_zoo(zoo)  # parsed, and remembered
            before = os.stat(path)
            mapped[at : at + 5] = b"NOTUS"  # a second write to the dirty page
            mapped.flush()
    else:
        manifest_module.replaceable_zoo(zoo)
        before = os.stat(path)
        path.write_bytes(text[:at] + b"NOTUS" + text[at + 5 :])
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(ZooError, match="not a sharecompress zoo"):
        manifest_module.replaceable_zoo(zoo)


@pytest.mark.parametrize("change", ["rewritten", "replaced by another file", "touched"])
def test_a_source_changed_while_merge_or_add_read_it_is_refused(tmp_path, monkeypatch, change):
    """A source rewritten or swapped after its header was read (a training job saving its adapter
    again, say) would leave a zoo whose figures and recorded digest describe two different files:
    refused in one line naming it, and nothing is written (the old code published such a zoo)."""
    import importlib

    paths = adapters(tmp_path, 4)
    victim = os.path.join(paths[1], "adapter_model.safetensors")

    def change_it():
        if change == "rewritten":
            with open(victim, "ab") as fh:
                fh.write(b"\0" * 8)
        elif change == "replaced by another file":
            shutil.copy(os.path.join(paths[2], "adapter_model.safetensors"), victim + ".new")
            os.replace(victim + ".new", victim)
        else:
            info = os.stat(victim)
            os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))

    merge_module = importlib.import_module("sharecompress.ops.merge")
    write = merge_module.write_zoo_files
    monkeypatch.setattr(merge_module, "write_zoo_files", lambda *a, **k: (change_it(), write(*a, **k))[1])
    refused(cli("merge", *paths[:3], "--zoo", tmp_path / "zoo", "-k", "2"), "changed while it was being read", paths[1])
    assert not (tmp_path / "zoo").exists() and hidden_leftovers(tmp_path) == []

    monkeypatch.undo()
    sharecompress.merge([paths[0], paths[2]], tmp_path / "zoo2", k=2)
    add_module = importlib.import_module("sharecompress.ops.add")
    write_files = add_module.write_adapter_files
    victim = os.path.join(paths[3], "adapter_model.safetensors")
    files = lambda: {p.name: p.read_bytes() for p in (tmp_path / "zoo2").rglob("*") if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = files()
    monkeypatch.setattr(add_module, "write_adapter_files", lambda *a, **k: (change_it(), write_files(*a, **k))[1])
    refused(cli("add", paths[3], "--zoo", tmp_path / "zoo2"), "changed while it was being read", paths[3])
    assert files() == before  # (the writer's empty lock file stays, as after any add)


def zoo_and_a_stranger(tmp_path):
    """Adapters, a zoo of them, and someone's directory of their own beside it."""
    paths = adapters(tmp_path)
    zoo = tmp_path / "zoo"
    sharecompress.merge(paths, zoo, k=2)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    return paths, zoo, mine


def move_into_place(zoo, mine, link=False):
    """The zoo moved aside (to zoo.aside), the stranger's directory (or a link to it) in its place."""
    zoo.rename(zoo.with_name("zoo.aside"))
    if link:
        zoo.symlink_to(mine, target_is_directory=True)
    else:
        mine.rename(zoo)


@pytest.mark.parametrize("moment, swap_in", [("compute", "directory"), ("compute", "link"), ("before-swap", "directory")])
def test_a_directory_moved_into_the_zoos_place_is_never_replaced_nor_written(tmp_path, monkeypatch, moment, swap_in):
    """While `merge --force` computes, or between its last check and the swap, someone moves the
    zoo aside and puts their own directory (or a link to it) in its place: refused, and that
    directory keeps exactly its files, without even a lock file (review findings: the lock was
    made through the link or in the stranger's directory, and a directory moved in just before
    the swap was deleted)."""
    import importlib

    from sharecompress.store import storage

    merge_module = importlib.import_module("sharecompress.ops.merge")
    paths, zoo, mine = zoo_and_a_stranger(tmp_path)
    move_in = lambda: move_into_place(zoo, mine, link=swap_in == "link")  # noqa: E731
    if moment == "compute":
        build = merge_module._build
        monkeypatch.setattr(merge_module, "_build", lambda *a, **k: (move_in(), build(*a, **k))[1])
    else:
        pause = storage.pause_point
        monkeypatch.setattr(storage, "pause_point", lambda step: move_in() if step == "before-swap" else pause(step))
    refused(cli("merge", *paths, "--zoo", zoo, "--force", "-k", "2"), "zoo")
    theirs = zoo if swap_in == "directory" else mine
    assert sorted(p.name for p in theirs.iterdir()) == ["thesis.tex"] and (theirs / "thesis.tex").read_text() == "precious"
    assert Zoo.open(tmp_path / "zoo.aside").names == ["a0", "a1", "a2"]  # the zoo moved aside is untouched too
    assert hidden_leftovers(tmp_path) == []


def test_a_directory_moved_in_that_cannot_be_put_back_is_kept(tmp_path, monkeypatch):
    """The directory moved into the zoo's place is found after the exchange and cannot be swapped
    back (the second exchange fails): it is moved out of the staging name, which a later cleanup
    would remove, and the error says where it is."""
    from sharecompress.store import storage

    paths, zoo, mine = zoo_and_a_stranger(tmp_path)
    pause, exchange, calls = storage.pause_point, storage._exchange, []

    def exchange_once(parent, a, b):
        calls.append((a, b))
        if len(calls) > 1:
            raise OSError(errno.EIO, "I/O error")
        return exchange(parent, a, b)

    monkeypatch.setattr(storage, "pause_point", lambda step: move_into_place(zoo, mine) if step == "before-swap" else pause(step))
    monkeypatch.setattr(storage, "_exchange", exchange_once)
    line = refused(cli("merge", *paths, "--zoo", zoo, "--force", "-k", "2"), "could not be put back", "nothing was deleted")
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".zoo.moved-")]
    assert len(kept) == 1 and str(kept[0]) in line
    assert sorted(p.name for p in kept[0].iterdir()) == ["thesis.tex"]
    with storage.Dir.open(tmp_path) as parent:
        assert storage.remove_stale_staging(parent, zoo) == []  # no cleanup takes it


@pytest.mark.parametrize("text", ['{"format":"sharecompress-zoo","x":1}\n{"user":"log line"}',
                                  '{"format":"sharecompress-zoo","format":"other-tool"}',
                                  '{"format":"sharecompress-zoo","x":NaN}',
                                  '{"format":"sharecompress-zoo",'])
def test_force_refuses_a_manifest_that_only_begins_like_ours(tmp_path, text):
    """What makes a directory a zoo is a manifest that parses, with our format: a file that merely
    begins like one is refused, and the directory keeps its files (review finding on a shortcut
    that read only the first bytes, since reverted)."""
    paths = adapters(tmp_path)
    target = tmp_path / "theirs"
    (target / "adapters").mkdir(parents=True)
    (target / "adapters" / "my_lora.safetensors").write_bytes(b"mine")
    (target / "manifest.json").write_text(text)
    refused(cli("merge", *paths, "--zoo", target, "--force", "-k", "2"), "not a sharecompress zoo")
    assert (target / "manifest.json").read_text() == text and (target / "adapters" / "my_lora.safetensors").read_bytes() == b"mine"


def test_combine_force_replaces_only_a_zoo(tmp_path, sentinel):
    paths = adapters(tmp_path)
    for i in (1, 2):
        sharecompress.merge(paths, tmp_path / f"part{i}", k=2, shard=(i, 2))
    refused(cli("combine", tmp_path / "part1", tmp_path / "part2", "--zoo", sentinel, "--force"), "not a sharecompress zoo")


def _merge_process(paths, zoo_dir, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "sharecompress", "merge", *paths, "--zoo", str(zoo_dir), "--force", "-k", "2", "-q"],
        stderr=subprocess.PIPE, env=env, text=True,
    )


def test_merge_force_waits_for_the_writer_lock(zoo, tmp_path):
    from sharecompress.store.storage import WriterLock

    new = adapters(tmp_path / "other", 2, seed=20)
    with WriterLock(zoo):
        proc = _merge_process(new, zoo)
        time.sleep(3.0)
        assert proc.poll() is None, proc.stderr.read()  # still waiting: the zoo is another writer's
        assert Zoo.open(zoo).names == ["a0", "a1", "a2"]
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert Zoo.open(zoo).names == ["a0", "a1"] and verify(zoo)[0] == []


@pytest.mark.parametrize("step", ["before-swap", "after-swap"])
def test_a_kill_during_the_swap_leaves_one_whole_zoo(zoo, tmp_path, step):
    new = adapters(tmp_path / "other", 2, seed=20)
    proc = _merge_process(new, zoo, {"SHARECOMPRESS_PAUSE_AT": f"{step}:30"})
    assert f"paused at {step}" in proc.stderr.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert verify(zoo)[0] == []
    assert Zoo.open(zoo).names == (["a0", "a1", "a2"] if step == "before-swap" else ["a0", "a1"])
    # the killed writer's hidden staging is cleaned by the next merge of that target
    sharecompress.merge(new, zoo, k=2, force=True)
    assert hidden_leftovers(tmp_path) == []


def test_a_swap_by_renames_killed_half_way_is_restored(zoo, tmp_path):
    """Where the file system has no atomic exchange, the old zoo set aside is put back by the next command."""
    aside = tmp_path / ".zoo.old-999999-0123abcd"
    os.rename(zoo, aside)  # the state a kill between the two renames leaves
    assert Zoo.open(zoo).names == ["a0", "a1", "a2"]
    assert not aside.exists() and verify(zoo)[0] == []


def test_swap_without_exchange_gives_the_same_result(zoo, tmp_path, monkeypatch):
    from sharecompress.store import storage

    monkeypatch.setattr(storage, "_renameat2", lambda *a: False)
    sharecompress.merge(adapters(tmp_path / "other", 2, seed=20), zoo, k=2, force=True)
    assert Zoo.open(zoo).names == ["a0", "a1"] and verify(zoo)[0] == [] and hidden_leftovers(tmp_path) == []


# ---------------------------------------------------------------- 4. consistent reads


def _tensors(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_a_reader_never_mixes_generations(zoo, tmp_path):
    stale = Zoo.open(zoo)
    stale.bases()  # generation 1's basis is in memory
    kept = Zoo.open(zoo).cores("a0")
    Zoo.open(zoo).add([write_peft_adapter(tmp_path / "new", random_factors(MODULES, 2, seed=9))])
    # generation 1's files stay as anchors (ops.anchors): the stale reader reads generation 1 whole
    assert all(torch.equal(x, y) for m in kept for x, y in zip(stale.cores("a0")[m], kept[m]))
    Zoo.open(zoo).add([write_peft_adapter(tmp_path / "newer", random_factors(MODULES, 2, seed=10))], anchors=0)
    with pytest.raises(ZooChanged):
        stale.cores("a0")  # no anchors kept: generation 1's cores file is gone: refused, never read from generation 3
    stale.export("a0", tmp_path / "from-stale")  # export starts over on the new generation
    Zoo.open(zoo).export("a0", tmp_path / "fresh")
    got, want = _tensors(tmp_path / "from-stale"), _tensors(tmp_path / "fresh")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_exports_during_concurrent_adds_are_each_one_generation(zoo, tmp_path):
    """Each export taken while adds run equals the export of exactly one generation (replayed on a copy)."""
    news = [write_peft_adapter(tmp_path / f"new{i}", random_factors(MODULES, 2, seed=30 + i)) for i in range(4)]
    shutil.copytree(zoo, tmp_path / "replay")
    generations = []
    for i in range(len(news) + 1):
        if i:
            Zoo.open(tmp_path / "replay").add([news[i - 1]])
        Zoo.open(tmp_path / "replay").export("a0", tmp_path / f"ref{i}")
        generations.append(_tensors(tmp_path / f"ref{i}"))
    errors = []

    def writer():
        try:
            for path in news:
                Zoo.open(zoo).add([path])
        except Exception as exc:  # pragma: no cover - shown by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    count = 0
    while thread.is_alive() or count == 0:
        out = tmp_path / f"e{count}"
        Zoo.open(zoo).export("a0", out)
        got = _tensors(out)
        matches = [g for g, want in enumerate(generations) if all(torch.equal(got[k], want[k]) for k in want)]
        assert len(matches) == 1, f"export {count} matches generations {matches}"
        seen.add(matches[0])
        count += 1
    thread.join()
    assert errors == [] and verify(zoo)[0] == []
    assert Zoo.open(zoo).manifest["generation"] == len(news) + 1


# ---------------------------------------------------------------- 5. integrity on read


def flip_byte(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_refused_everywhere(zoo, tmp_path):
    cores = zoo / Zoo.open(zoo).adapter("a1")["file"]
    flip_byte(cores)
    (zoo / ".lock").touch()  # made by the first writer that tries
    before = tree_state(zoo)
    refused(cli("export", "a1", "--zoo", zoo, "--out", tmp_path / "out"), "checksum differs")
    refused(cli("add", write_peft_adapter(tmp_path / "new", random_factors(MODULES, 2, seed=9)), "--zoo", zoo), "checksum differs")
    refused(cli("report", "--zoo", zoo, "--against", tmp_path / "src"), "checksum differs")
    assert tree_state(zoo) == before  # add wrote no new generation over the corrupt file
    problems, _ = verify(zoo)
    assert any("checksum differs" in p for p in problems)
    assert not (tmp_path / "out").exists()


def test_flipped_basis_byte_is_refused(zoo, tmp_path):
    flip_byte(zoo / "basis.safetensors", 100)
    refused(cli("export", "a0", "--zoo", zoo, "--out", tmp_path / "out"), "checksum differs")


@pytest.mark.parametrize("key", ["basis_sha256", "file_sha256"])
def test_a_file_without_a_checksum_is_an_error(zoo, key):
    edit_manifest(zoo, lambda m: (m if key == "basis_sha256" else m["adapters"][0]).pop(key))
    problems, _ = verify(zoo)
    assert problems and key in problems[0]
    refused(cli("report", "--zoo", zoo), key)


def test_a_file_larger_than_the_manifest_allows_is_not_read(zoo, tmp_path):
    entry = Zoo.open(zoo).adapter("a0")
    path = zoo / entry["file"]
    path.write_bytes(path.read_bytes() + b"\0" * (1 << 20))
    refused(cli("export", "a0", "--zoo", zoo, "--out", tmp_path / "out"), "more than the", "expected")


# ---------------------------------------------------------------- 6. manifest schema


@pytest.mark.parametrize("change,field", [
    (lambda m: m["adapters"][0]["modules"][Q].update(p=99), f"adapters['a0'].modules['{Q}'].p"),
    (lambda m: m["modules"][Q].update(k_u=500), f"modules['{Q}'].k_u"),
    (lambda m: m["modules"][Q].update(shape=[-1, 10]), f"modules['{Q}'].shape[0]"),
    (lambda m: m["modules"][Q].update(shape=[12]), f"modules['{Q}'].shape"),
    (lambda m: m["adapters"][0]["modules"][Q].update(err2=-1.0), "err2"),
    (lambda m: m["adapters"][0]["modules"][Q].update(norm2="big"), "norm2"),
    (lambda m: m["adapters"][0]["modules"][Q].update(b_shape=[99, 2]), "b_shape"),
    (lambda m: m.update(dtype="float64"), "dtype"),
    (lambda m: m.update(generation=0), "generation"),
    (lambda m: m["adapters"][0].update(name=7), "adapters[0].name"),
    (lambda m: m["adapters"][1].update(name="a0"), "appears twice"),
    (lambda m: m["adapters"][1].update(file=m["adapters"][0]["file"]), "named twice"),
    (lambda m: m["adapters"][0]["modules"].update({"nope": m["adapters"][0]["modules"][Q]}), "not one of the manifest's modules"),
    (lambda m: m["adapters"][0].update(layout="lycoris"), "layout"),
    (lambda m: m.update(adapters={}), "adapters"),
    (lambda m: m.update(shard={"index": 3, "count": 2}), "shard.index"),
])
def test_a_bad_field_is_one_line_naming_it(zoo, tmp_path, change, field):
    edit_manifest(zoo, change)
    for args in (("report",), ("list",), ("export", "a0", "--out", tmp_path / "out"), ("add", tmp_path / "src" / "a3")):
        refused(cli(*args, "--zoo", zoo), field)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,needle", [
    ('{"format": "sharecompress-zoo", "format_version": 1, "x": NaN}', "NaN"),
    ("[" * 100000 + "]" * 100000, "nested"),
    ('{"format": "sharecompress-zoo", "format": "other"}', "twice"),
    ('{"format": "sharecompress-zoo", "format_version": 1e999}', "overflows"),
    ("\xff\xfe not text", "UTF-8"),
])
def test_a_hostile_manifest_is_one_line(zoo, text, needle):
    (zoo / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape") if not text.startswith("\xff") else b"\xff\xfe x")
    refused(cli("report", "--zoo", zoo), needle)


def test_an_oversized_manifest_is_not_read(zoo):
    with open(zoo / "manifest.json", "ab") as fh:
        fh.truncate(65 << 20)
    refused(cli("list", "--zoo", zoo), "more than the")


# ---------------------------------------------------------------- 7. inputs


def _adapter_with(tmp_path, name, tensors, config=None):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config or {"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    return folder


def test_a_zero_size_dimension_is_refused_fast(tmp_path):
    src = _adapter_with(tmp_path, "zero", {f"{PREFIX}m.lora_A.weight": torch.zeros(2, 0), f"{PREFIX}m.lora_B.weight": torch.zeros(12, 2)})
    start = time.monotonic()
    refused(cli("merge", src, "--zoo", tmp_path / "zoo", "-k", "2"), "zero-size")
    assert time.monotonic() - start < 60


def test_a_rank_above_the_module_size_costs_the_module_not_the_rank(tmp_path):
    """rank 200,000 on a 4 × 3 module: an r × r matrix would be 320 GB; the update is kept exactly."""
    r = 200_000
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(4, r, generator=gen) / 100, torch.randn(r, 3, generator=gen) / 100
    src = _adapter_with(tmp_path, "wide", {f"{PREFIX}m.lora_A.weight": A, f"{PREFIX}m.lora_B.weight": B},
                        {"peft_type": "LORA", "r": r, "lora_alpha": 2.0 * r})
    zoo = sharecompress.merge([str(src)], tmp_path / "zoo", k=3)
    (U, V), (E, F) = zoo.bases()[f"{PREFIX}m"], zoo.cores("wide")[f"{PREFIX}m"]
    dense = 2.0 * (B.double() @ A.double())
    got = U.double() @ E.double() @ F.double() @ V.double().T
    assert torch.allclose(got, dense, rtol=1e-4, atol=1e-6)
    assert zoo.adapter("wide")["relative_error"] < 1e-5


def test_fifos_and_devices_are_refused_without_blocking(tmp_path):
    fifo_dir = _adapter_with(tmp_path, "fifo", {f"{PREFIX}m.lora_A.weight": torch.ones(2, 3), f"{PREFIX}m.lora_B.weight": torch.ones(4, 2)})
    (fifo_dir / "adapter_config.json").unlink()
    os.mkfifo(fifo_dir / "adapter_config.json")
    refused(cli("merge", fifo_dir, "--zoo", tmp_path / "zoo", "-k", "2"), "not a regular file", "FIFO")
    os.mkfifo(tmp_path / "pipe.safetensors")
    refused(cli("merge", tmp_path / "pipe.safetensors", "--zoo", tmp_path / "zoo", "--alpha", "4"), "not a regular file")
    refused(cli("merge", "/dev/zero", "--zoo", tmp_path / "zoo", "--alpha", "4"), "not a regular file")


@pytest.mark.parametrize("config,needle", [
    ({"peft_type": "LORA", "r": 2, "lora_alpha": 1e60}, "lora_alpha"),
    ({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {"m": 1e30}}, "scale"),
])
def test_overflowing_scales_are_refused_by_name(tmp_path, config, needle):
    src = _adapter_with(tmp_path, "loud", {f"{PREFIX}m.lora_A.weight": torch.ones(2, 3), f"{PREFIX}m.lora_B.weight": torch.ones(4, 2)}, config)
    refused(cli("merge", src, "--zoo", tmp_path / "zoo", "-k", "2"), needle)


@pytest.mark.parametrize("text,needle", [
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}', "NaN"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 1e999}', "overflows"),
    ('{"a":' * 5000 + "1" + "}" * 5000, "nested"),
    ('{"r": 2, "r": 3, "lora_alpha": 4}', "twice"),
])
def test_hostile_configs_are_one_line(tmp_path, text, needle):
    src = _adapter_with(tmp_path, "cfg", {f"{PREFIX}m.lora_A.weight": torch.ones(2, 3), f"{PREFIX}m.lora_B.weight": torch.ones(4, 2)})
    (src / "adapter_config.json").write_text(text)
    refused(cli("merge", src, "--zoo", tmp_path / "zoo", "-k", "2"), needle)


def test_an_oversized_config_is_not_read(tmp_path):
    src = _adapter_with(tmp_path, "cfg", {f"{PREFIX}m.lora_A.weight": torch.ones(2, 3), f"{PREFIX}m.lora_B.weight": torch.ones(4, 2)})
    with open(src / "adapter_config.json", "ab") as fh:
        fh.truncate(17 << 20)
    refused(cli("merge", src, "--zoo", tmp_path / "zoo", "-k", "2"), "more than the")


def _raw_safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


A_KEY, B_KEY = f"{PREFIX}m.lora_A.weight", f"{PREFIX}m.lora_B.weight"


@pytest.mark.parametrize("header,data,needle", [
    ({A_KEY: {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
      B_KEY: {"dtype": "F32", "shape": [4, 2], "data_offsets": [8, 40]}}, b"\0" * 40, "overlaps"),
    ({A_KEY: {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
      B_KEY: {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]}}, b"\0" * 64, "unused bytes"),
    ({A_KEY: {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
      B_KEY: {"dtype": "F32", "shape": [4, 2], "data_offsets": [24, 56]}}, b"\0" * 60, "after the last tensor"),
])
def test_the_reader_is_as_strict_as_the_library(tmp_path, header, data, needle):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_raw_safetensors(header, data))
    with pytest.raises(Exception):  # the safetensors library refuses the same file
        with safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    refused(cli("merge", path, "--zoo", tmp_path / "zoo", "--alpha", "4"), needle)


def test_duplicate_header_keys_are_refused(tmp_path):
    text = ('{"%s": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, '
            '"%s": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}') % (A_KEY, A_KEY)
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + b"\0" * 24)
    refused(cli("merge", path, "--zoo", tmp_path / "zoo", "--alpha", "4"), "twice")


def test_written_files_are_read_back_by_the_library(zoo):
    """Our own writer (streamed, hashed as written) produces files the safetensors library reads identically."""
    opened = Zoo.open(zoo)
    with safe_open(str(zoo / "basis.safetensors"), "pt") as f:
        for module, (U, V) in opened.bases().items():
            assert torch.equal(f.get_tensor(f"{module}.U"), U) and torch.equal(f.get_tensor(f"{module}.V"), V)


def _hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--owner--adapter"
    commit = "a" * 40
    snap = repo / "snapshots" / commit
    src = write_peft_adapter(tmp_path / "hubsrc", random_factors(MODULES, 2, seed=5))
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        blob = repo / "blobs" / hashlib.sha256(name.encode()).hexdigest()
        shutil.copy(src / name, blob)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return repo, snap


def test_hub_refs_stay_inside_the_cache(tmp_path, monkeypatch, sentinel):
    repo, snap = _hub_cache(tmp_path, monkeypatch)
    assert cli("merge", "owner/adapter", "--zoo", tmp_path / "zoo", "-k", "2").exit_code == 0
    (repo / "refs" / "main").write_text("../../../../outside")
    refused(cli("merge", "owner/adapter", "--zoo", tmp_path / "zoo2", "-k", "2"), "commit hash")
    (repo / "refs" / "main").unlink()
    os.mkfifo(repo / "refs" / "main")
    refused(cli("merge", "owner/adapter", "--zoo", tmp_path / "zoo2", "-k", "2"), "not a regular file")


def test_hub_snapshot_files_linking_outside_are_refused(tmp_path, monkeypatch, sentinel):
    repo, snap = _hub_cache(tmp_path, monkeypatch)
    outside_copy = tmp_path / "elsewhere.json"
    shutil.copy(snap / "adapter_config.json", outside_copy)
    (snap / "adapter_config.json").unlink()
    (snap / "adapter_config.json").symlink_to(outside_copy)
    refused(cli("merge", "owner/adapter", "--zoo", tmp_path / "zoo", "-k", "2"), "outside the cache")


ONE_COMMAND = r"""
import sys
from sharecompress.cli import run
sys.argv = ["sharecompress", *sys.argv[1:]]
run()
"""


def run_bounded(args, seconds=60):
    """(exit code, stderr, wall seconds, peak resident bytes) of one CLI process, from the kernel's accounting."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", ONE_COMMAND, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(seconds, proc.kill)
    timer.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stderr, time.monotonic() - start, usage.ru_maxrss * 1024


def test_every_malformed_input_ends_within_60s_and_2GB(tmp_path):
    """The hostile inputs above, each as its own process: wall time and peak memory from the kernel."""
    cases = []
    r = 1 << 22  # a claimed rank of 4M on a 3 × 2 module: 64 MB of factors, 128 TB as an r × r matrix
    huge = _adapter_with(tmp_path, "huge-rank", {A_KEY: torch.zeros(r, 2), B_KEY: torch.zeros(3, r)},
                         {"peft_type": "LORA", "r": r, "lora_alpha": 1.0})
    cases.append((0, ["merge", huge, "--zoo", tmp_path / "z1", "-k", "2"]))
    zero = _adapter_with(tmp_path, "zero", {A_KEY: torch.zeros(2, 0), B_KEY: torch.zeros(12, 2)})
    cases.append((2, ["merge", zero, "--zoo", tmp_path / "z2", "-k", "2"]))
    deep = _adapter_with(tmp_path, "deep", {A_KEY: torch.ones(2, 3), B_KEY: torch.ones(4, 2)})
    (deep / "adapter_config.json").write_text("[" * 1_000_000 + "]" * 1_000_000)
    cases.append((2, ["merge", deep, "--zoo", tmp_path / "z3", "-k", "2"]))
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    cases.append((2, ["merge", fifo, "--zoo", tmp_path / "z4", "--alpha", "4"]))
    header = tmp_path / "header.safetensors"
    header.write_bytes(struct.pack("<Q", 99 << 20) + b"{" + b" " * ((99 << 20) - 1))
    cases.append((2, ["merge", header, "--zoo", tmp_path / "z5", "--alpha", "4"]))
    zoo_dir = tmp_path / "zoo"
    sharecompress.merge(adapters(tmp_path, 2), zoo_dir, k=2)
    for i, flood in enumerate((b"[],", b'"ab",', b"1.5,")):  # 60 MB of the cheapest objects JSON can spell
        other = tmp_path / f"zoo{i}"
        shutil.copytree(zoo_dir, other)
        with open(other / "manifest.json", "wb") as fh:
            fh.write(b"[" + flood * ((60 << 20) // len(flood)) + b"0]")
        cases.append((2, ["list", "--zoo", other]))
    figures = []
    for code, args in cases:
        got, stderr, seconds, peak = run_bounded(args)
        figures.append(f"{args[0]} {seconds:.1f}s {peak / 2**20:.0f}MiB")
        assert got == code and "Traceback" not in stderr, (args, stderr)
        assert seconds < 60 and peak < 2 << 30, (args, seconds, peak)
    print("; ".join(figures))


# ---------------------------------------------------------------- 8. OS errors


def _fail_writes_after(monkeypatch, count, code=errno.ENOSPC):
    real = os.write
    calls = {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] > count:
            raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_no_space_during_merge_leaves_nothing(tmp_path, monkeypatch):
    paths = adapters(tmp_path)
    _fail_writes_after(monkeypatch, 3)
    line = refused(cli("merge", *paths, "--zoo", tmp_path / "zoo", "-k", "2"), "No space left on device")
    assert str(tmp_path / "zoo") in line and ".tmp-" not in line  # the target, not the hidden staging name
    assert not (tmp_path / "zoo").exists() and hidden_leftovers(tmp_path) == []


def test_no_space_in_the_middle_of_export_all_writes_no_target(zoo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_writes_after(monkeypatch, 5)  # the third adapter's files fail
    refused(cli("export", "--all", "--zoo", zoo, "--out", out), "No space left on device")
    assert not out.exists() or list(out.iterdir()) == []


def test_a_name_too_long_is_one_line(zoo, tmp_path):
    refused(cli("export", "a0", "--zoo", zoo, "--out", tmp_path / ("x" * 300)), "File name too long")
    assert hidden_leftovers(tmp_path) == []


def test_no_space_during_add_keeps_the_old_generation(zoo, tmp_path, monkeypatch):
    new = write_peft_adapter(tmp_path / "new", random_factors(MODULES, 2, seed=9))
    before = tree_state(zoo)
    _fail_writes_after(monkeypatch, 2)
    refused(cli("add", new, "--zoo", zoo), "No space left on device")
    monkeypatch.undo()
    after = tree_state(zoo)
    after.pop(".lock", None), before.pop(".lock", None)
    assert after == before and verify(zoo) == ([], [])


# ---------------------------------------------------------------- 9. permissions


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        zoo = sharecompress.merge(adapters(tmp_path), tmp_path / "zoo", k=2)
        zoo.export("a0", tmp_path / "out")
    finally:
        os.umask(old)
    for path in [*(tmp_path / "zoo").rglob("*"), *(tmp_path / "out").rglob("*")]:
        want = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == want, path


# ---------------------------------------------------------------- found by an adversarial pass (one test each)


def test_an_adapter_that_overflows_float16_is_refused_and_the_zoo_stays_usable(tmp_path):
    paths = [str(write_peft_adapter(tmp_path / f"h{i}", random_factors(MODULES, 2, seed=i), dtype=torch.float16)) for i in range(2)]
    zoo = tmp_path / "zoo"
    sharecompress.merge(paths, zoo, k=2)
    loud = {m: (torch.full((n, 2), 30.0), torch.full((2, d), 30.0)) for m, (n, d) in MODULES.items()}
    evil = write_peft_adapter(tmp_path / "evil", loud, alpha=2e6, dtype=torch.float16)
    refused(cli("add", evil, "--zoo", zoo), "overflow", "float32")
    assert cli("list", "--zoo", zoo).exit_code == 0 and verify(zoo) == ([], [])
    refused(cli("merge", evil, "--zoo", tmp_path / "z2", "-k", "2"), "overflow")
    assert not (tmp_path / "z2").exists()


def test_a_writer_never_publishes_a_manifest_no_reader_would_open(zoo, tmp_path):
    from sharecompress.store.schema import MAX_GENERATION

    edit_manifest(zoo, lambda m: m.update(generation=MAX_GENERATION))
    before = tree_state(zoo)
    refused(cli("add", tmp_path / "src" / "a3", "--zoo", zoo), "generation", "merge it anew")
    after = tree_state(zoo)
    after.pop(".lock", None)
    assert after == before and cli("list", "--zoo", zoo).exit_code == 0


def test_a_marked_zoo_with_a_broken_field_can_still_be_replaced(zoo, tmp_path):
    edit_manifest(zoo, lambda m: m["adapters"][0].update(rank="x"))
    refused(cli("list", "--zoo", zoo), "rank")
    assert cli("merge", tmp_path / "src" / "a3", "--zoo", zoo, "--force", "-k", "2").exit_code == 0
    assert Zoo.open(zoo).names == ["a3"]


@pytest.mark.parametrize("change,field", [
    (lambda m: m["adapters"][0].pop("rank"), "adapters['a0'].rank"),
    (lambda m: m["adapters"][0].pop("error_bound"), "error_bound"),
    (lambda m: m["adapters"][0].update(bytes_original="x"), "bytes_original"),
    (lambda m: m["modules"][Q].pop("k"), f"modules['{Q}'].k"),
    (lambda m: m["adapters"][0]["modules"][Q].pop("err2"), "err2"),
    (lambda m: m["adapters"][0].update(p=30_000_000), "adapters['a0'].p"),
    (lambda m: m["adapters"][0]["modules"][Q].update(b_shape=[12, 2, 5]), "not a LoRA pair"),
    (lambda m: m["adapters"][0].update(exact="yes"), "exact"),
])
def test_every_field_the_tool_reads_is_checked(zoo, tmp_path, change, field):
    edit_manifest(zoo, change)
    for args in (("report",), ("list",), ("export", "a0", "--out", tmp_path / "out")):
        refused(cli(*args, "--zoo", zoo), field)


def test_markup_in_stored_text_and_paths_is_printed_as_is(tmp_path):
    zoo = tmp_path / "m[" / "]z"
    zoo.parent.mkdir()
    paths = adapters(tmp_path)
    result = cli("merge", *paths, "--zoo", zoo, "-k", "2")
    assert result.exit_code == 0 and f"wrote the zoo at {zoo}" in result.stderr
    edit_manifest(zoo, lambda m: m["adapters"][0].update(added="[/]", source="[red]x"))
    listed = runner.invoke(app, ["list", "--zoo", str(zoo)], terminal_width=400)
    assert listed.exit_code == 0 and "[/]" in listed.stdout and "[red]x" in listed.stdout
    assert cli("verify", "--zoo", zoo).stderr.strip() == f"{zoo}: ok"


@pytest.mark.parametrize("config,needle", [
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 1%s}' % ("0" * 400), "beyond 64 bits"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"(": 2}}', "not a valid regular expression"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"(a+)+$": 2}}', "catastrophic"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"(m)\\\\1": 2}}', "back-reference"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {"m": "big"}}', "not a finite alpha"),
])
def test_hostile_patterns_and_numbers_in_configs(tmp_path, config, needle):
    src = _adapter_with(tmp_path, "cfg", {A_KEY: torch.ones(2, 3), B_KEY: torch.ones(4, 2)})
    (src / "adapter_config.json").write_text(config)
    start = time.monotonic()
    refused(cli("merge", src, "--zoo", tmp_path / "zoo", "-k", "2"), needle)
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("key", ["q_proj", "layers.0.q_proj", "0.q_proj", "(q|v)_proj", "layers\\.[0-9]+\\.q_proj", "proj", ".*q_proj"])
def test_pattern_matching_is_pefts_rule(key):
    """PEFT's ``re.match(rf"(.*\\.)?({key})$", module)``, computed on the parts after each dot."""
    import re

    from sharecompress.io.readers import _pattern_value

    for module in ("model.layers.0.q_proj", "model.layers.10.v_proj", "q_proj", "layers.0.q_proj_extra"):
        want = bool(re.match(rf"(.*\.)?({key})$", module))
        assert (_pattern_value({key: 1}, module, 0) == 1) == want, (key, module)


def test_boolean_dimensions_are_refused(tmp_path):
    header = {A_KEY: {"dtype": "F32", "shape": [True, 3], "data_offsets": [0, 12]},
              B_KEY: {"dtype": "F32", "shape": [4, 1], "data_offsets": [12, 28]}}
    path = tmp_path / "bool.safetensors"
    path.write_bytes(_raw_safetensors(header, b"\0" * 28))
    refused(cli("merge", path, "--zoo", tmp_path / "zoo", "--alpha", "4"), "invalid shape")


def test_carried_files_are_checked_before_a_new_generation_names_them(tmp_path):
    heads = {f"{PREFIX}classifier.weight": torch.randn(2, 12)}
    paths = [str(write_peft_adapter(tmp_path / f"h{i}", random_factors(MODULES, 2, seed=i), extras=heads)) for i in range(3)]
    zoo = tmp_path / "zoo"
    sharecompress.merge(paths[:2], zoo, k=2)
    flip_byte(zoo / Zoo.open(zoo).adapter("h0")["extras_file"])
    refused(cli("add", paths[2], "--zoo", zoo), "checksum differs")  # add rewrites cores, carries heads
    refused(cli("remove", "h1", "--zoo", zoo), "checksum differs")  # remove carries everything
    assert Zoo.open(zoo).manifest["generation"] == 1


def test_remove_refuses_a_linked_basis(zoo, tmp_path):
    shutil.copy(zoo / "basis.safetensors", tmp_path / "copy.safetensors")
    (zoo / "basis.safetensors").unlink()
    (zoo / "basis.safetensors").symlink_to(tmp_path / "copy.safetensors")
    refused(cli("remove", "a0", "--zoo", zoo), "symbolic link")


def test_export_force_never_replaces_a_file_of_any_zoo(tmp_path):
    from factories import write_kohya_file

    kohya = write_kohya_file(tmp_path / "k.safetensors", {"lora_unet_a": (torch.randn(12, 2), torch.randn(2, 10))})
    sharecompress.merge([str(kohya)], tmp_path / "zk", k=2)
    other = sharecompress.merge(adapters(tmp_path), tmp_path / "other", k=2)
    before = tree_state(other.path)
    refused(cli("export", "k", "--zoo", tmp_path / "zk", "--out", other.path / "basis.safetensors", "--force"), "zoo")
    moved = tmp_path / "elsewhere.safetensors"
    shutil.copy(other.path / "basis.safetensors", moved)  # a zoo's file outside its zoo: its header says what it is
    refused(cli("export", "k", "--zoo", tmp_path / "zk", "--out", moved, "--force"), "is a file of a sharecompress zoo")
    assert tree_state(other.path) == before
    (tmp_path / "readme").mkdir()
    (tmp_path / "readme" / "README.md").write_text("mine")
    refused(cli("export", "a0", "--zoo", other.path, "--out", tmp_path / "readme", "--force"), "README.md")


def test_export_all_takes_the_names_of_the_generation_it_reads(zoo, tmp_path):
    from sharecompress.ops.export import export_adapters

    stale = Zoo.open(zoo)
    Zoo.open(zoo).remove("a1")
    out = tmp_path / "out"
    export_adapters(stale, lambda z: [(name, out / name) for name in z.names])
    assert sorted(p.name for p in out.iterdir()) == ["a0", "a2"]


def test_a_hub_repo_folder_linked_out_of_the_cache_is_refused(tmp_path, monkeypatch):
    repo, _ = _hub_cache(tmp_path, monkeypatch)
    outside = tmp_path / "moved-repo"
    repo.rename(outside)
    repo.symlink_to(outside, target_is_directory=True)
    refused(cli("merge", "owner/adapter", "--zoo", tmp_path / "zoo", "-k", "2"), "link out of the cache")


def test_a_users_lock_file_or_a_fifo_lock_is_not_the_zoos(tmp_path):
    paths = adapters(tmp_path)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / ".lock").write_text("my notes")
    refused(cli("merge", *paths, "--zoo", folder, "--force", "-k", "2"), "not a sharecompress zoo")
    assert (folder / ".lock").read_text() == "my notes"
    zoo = tmp_path / "zoo"
    sharecompress.merge(paths, zoo, k=2)
    (zoo / ".lock").unlink(missing_ok=True)
    os.mkfifo(zoo / ".lock")
    refused(cli("remove", "a0", "--zoo", zoo), "not a regular file")


def test_the_next_generation_is_above_every_tag_the_manifest_names(zoo, tmp_path):
    Zoo.open(zoo).add([tmp_path / "src" / "a3"])  # generation 2: files tagged .g2
    edit_manifest(zoo, lambda m: m.update(generation=1))  # a manifest that under-counts
    Zoo.open(zoo).remove("a3")
    assert Zoo.open(zoo).manifest["generation"] == 3 and verify(zoo)[0] == []


def test_manifest_bytes_refuses_what_the_schema_refuses(zoo):
    from sharecompress.store.manifest import manifest_bytes, read_manifest

    manifest = read_manifest(zoo)
    manifest["adapters"][0]["modules"][Q]["err2"] = float("nan")
    with pytest.raises(ZooError, match="err2.*nothing was published"):
        manifest_bytes(manifest)
