"""A writer killed at any instant leaves the zoo as it was before or after, and verify accepts it."""

import json
import os
import random
import subprocess
import sys
import time

import pytest

import sharecompress
from sharecompress import Zoo
from sharecompress.store.verify import verify

from factories import kill_when_paused, random_factors, write_peft_adapter

MODULES = {"layers.0.q_proj": (20, 16), "layers.0.v_proj": (20, 16), "layers.1.q_proj": (20, 16)}


@pytest.fixture
def zoo_and_new(tmp_path):
    paths = [str(write_peft_adapter(tmp_path / f"a{i}", random_factors(MODULES, 2, seed=i))) for i in range(4)]
    sharecompress.merge(paths[:3], tmp_path / "zoo", k=3)
    return tmp_path / "zoo", paths[3]


def snapshot(zoo_dir):
    zoo = Zoo.open(zoo_dir)
    return zoo.names, {name: {m: (e.tolist(), f.tolist()) for m, (e, f) in zoo.cores(name).items()} for name in zoo.names}


def start_add(zoo_dir, source, pause):
    env = dict(os.environ, SHARECOMPRESS_PAUSE_AT=pause)
    return subprocess.Popen(
        [sys.executable, "-m", "sharecompress", "add", source, "--zoo", str(zoo_dir), "-q"],
        stderr=subprocess.PIPE, env=env, text=True,
    )


def after_state(tmp_path, zoo_dir, source):
    """The state a completed add gives, from a copy of the zoo."""
    import shutil

    ref = tmp_path / "reference"
    shutil.copytree(zoo_dir, ref)
    Zoo.open(ref).add([source])
    return snapshot(ref)


@pytest.mark.parametrize("step", ["after-basis", "between-adapters", "before-manifest", "after-manifest"])
def test_kill_at_each_step(tmp_path, zoo_and_new, step):
    zoo_dir, source = zoo_and_new
    before = snapshot(zoo_dir)
    after = after_state(tmp_path, zoo_dir, source)
    proc = start_add(zoo_dir, source, f"{step}:30")
    kill_when_paused(proc, step)
    problems, _ = verify(zoo_dir)
    assert problems == []
    state = snapshot(zoo_dir)
    assert state == (after if step == "after-manifest" else before)
    # the zoo stays writable, and the next writer cleans what the killed one left
    if state == before:
        Zoo.open(zoo_dir).add([source])
    else:
        Zoo.open(zoo_dir).remove("a3")
    assert verify(zoo_dir) == ([], [])


def test_kill_at_random_instants(tmp_path, zoo_and_new):
    zoo_dir, source = zoo_and_new
    before = snapshot(zoo_dir)
    after = after_state(tmp_path, zoo_dir, source)
    import shutil

    pristine = tmp_path / "pristine"
    shutil.copytree(zoo_dir, pristine)
    rng = random.Random(0)
    for _ in range(6):
        proc = start_add(zoo_dir, source, "after-basis:0.1,between-adapters:0.1,before-manifest:0.1")
        assert "paused at" in proc.stderr.readline()  # the add is under way
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        assert verify(zoo_dir)[0] == []
        state = snapshot(zoo_dir)
        assert state in (before, after)
        if state == after:
            shutil.rmtree(zoo_dir)
            shutil.copytree(pristine, zoo_dir)


def test_a_second_writer_waits_then_fails_clearly(tmp_path, zoo_and_new):
    from sharecompress.errors import ZooError
    from sharecompress.store.storage import WriterLock

    zoo_dir, source = zoo_and_new
    with WriterLock(zoo_dir):
        with pytest.raises(ZooError, match="another sharecompress process is writing"):
            with WriterLock(zoo_dir, timeout=0.3):
                pass
    assert json.loads((zoo_dir / "manifest.json").read_text())["generation"] == 1


@pytest.mark.parametrize("step", ["after-basis", "before-manifest", "after-manifest"])
def test_kill_during_a_remove_that_refits(tmp_path, zoo_and_new, step):
    import shutil

    zoo_dir, _ = zoo_and_new  # three rank-2 adapters at k=3: removing two leaves rank 2, so the bases shrink
    before = snapshot(zoo_dir)
    reference = tmp_path / "reference"
    shutil.copytree(zoo_dir, reference)
    Zoo.open(reference).remove("a0", "a1")
    after = snapshot(reference)
    assert after != before
    env = dict(os.environ, SHARECOMPRESS_PAUSE_AT=f"{step}:30")
    proc = subprocess.Popen([sys.executable, "-m", "sharecompress", "remove", "a0", "a1", "--zoo", str(zoo_dir)],
                            stderr=subprocess.PIPE, env=env, text=True)
    kill_when_paused(proc, step)
    problems, _ = verify(zoo_dir)
    assert problems == []
    assert snapshot(zoo_dir) == (after if step == "after-manifest" else before)


INTERRUPTED_MERGE = """
import sys, torch
import sharecompress, sharecompress.ops.merge as M
real = M.compress_stacked
said = []
def heavy(*a, **k):  # each batch spends about a second inside torch's C++ before its own compute
    if not said:
        said.append(1)
        print("computing", flush=True)
    for _ in range(6):
        torch.linalg.eigh(torch.randn(700, 700, dtype=torch.float64))
    return real(*a, **k)
M.compress_stacked, M.BATCH_BYTES, M.compute_workers = heavy, 1, lambda device: 2
torch.set_num_threads(2)
try:
    sharecompress.merge(sys.argv[2:], sys.argv[1], k=2)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def test_repeated_ctrl_c_waits_for_the_compute_workers(tmp_path):
    """Ctrl-C four times, 30 ms apart, while both workers are inside torch: the merge waits for them and the
    process ends as interrupted (it was a C++ abort, exit 134, "terminate called without an active
    exception": an interrupted join marked a running worker as stopped; review finding)."""
    import signal

    paths = [str(write_peft_adapter(tmp_path / f"a{i}", random_factors(MODULES, 2, seed=i))) for i in range(3)]
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_MERGE, str(tmp_path / "out" / "zoo"), *paths],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "computing"
    time.sleep(0.2)  # both workers inside eigh
    for _ in range(4):  # the first stops the merge; the others land while it waits for its workers
        proc.send_signal(signal.SIGINT)
        time.sleep(0.03)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "terminate called" not in err and "interrupted" in out
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_held_interrupts_deliver_a_ctrl_c_once_when_the_block_ends():
    """Inside ``held_interrupts`` a SIGINT is recorded, not raised (nested blocks too), and raised
    once the outermost block ends; outside the main thread the block holds nothing."""
    import signal
    import threading

    from sharecompress.store.interrupts import held_interrupts

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with held_interrupts():
            with held_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                reached.append("inner")
            reached.append("outer")
    assert reached == ["inner", "outer"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    seen = []

    def elsewhere() -> None:  # signals reach only the main thread: nothing is swapped here
        with held_interrupts():
            seen.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)

    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join()
    assert seen == [True]
