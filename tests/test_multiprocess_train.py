"""``meshpar launch ... -- train``: multi-process training end to end.

Real processes connected by ``jax.distributed`` (gloo collectives on CPU), started by the launcher.
Every subprocess has a hard timeout, and its environment is built from scratch (no ``JAX_*``,
``XLA_*``, ``MESHPAR_*`` from this test process, so a child never inherits the test session's 8
emulated devices); children share the suite's persistent compilation cache through
``JAX_COMPILATION_CACHE_DIR``.

To keep the module under a few minutes on a small machine, one 2-process run (a module fixture)
serves two tests: it is the brief's ``--mesh data=2,fsdp=2,tensor=2`` run with checkpoints every 2
steps added, compared with a 1-process run (losses, output of process 0 only), and then resumed
from its step-2 checkpoint by a single process. The one-process runs (references and resumes)
run in the test process through ``meshpar.cli.main``: one process is what they need.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from meshpar.cli import main as cli_main
from meshpar.train.checkpoint import Checkpointer

from helpers.env import child_env
from test_diloco import CLI_DILOCO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MESH = "data=2,fsdp=2,tensor=2"
STEPS = 4
# No --no-progress: the progress bar must come from process 0 only.
TRAIN = ["train", "--preset", "tiny", "--mesh", MESH, "--steps", str(STEPS), "--batch-size", "16",
         "--sample-tokens", "0"]


def meshpar(*args: str, timeout: float = 180) -> tuple[int, str, float]:
    """``python -m meshpar ARGS`` (stdout and stderr merged): (status, output, seconds)."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "meshpar", *args], env=child_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO,
    )
    # Bytes, not text=True: universal newlines would turn a progress bar's "\r" redraws into
    # lines of their own, without the launcher's "[pN] " prefix.
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), time.monotonic() - start


def launch(*args: str, timeout: float = 180) -> tuple[int, str, float]:
    return meshpar("launch", *args, timeout=timeout)


def read_metrics(path) -> dict[int, float]:
    rows = [json.loads(line) for line in open(path).read().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def lines_of(out: str, process: int) -> list[str]:
    # split on "\n" only: the launcher prefixes "\n"-terminated lines; a tqdm bar redraws with "\r".
    return [l for l in out.split("\n") if l.startswith(f"[p{process}] ")]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """2 processes x 4 devices, checkpoints every 2 steps into one shared directory."""
    root = tmp_path_factory.mktemp("two")
    metrics, ckpt = root / "m.jsonl", root / "ckpt"
    rc, out, seconds = launch(
        "--processes", "2", "--cpu-devices-per-process", "4", "--", *TRAIN,
        "--metrics-file", str(metrics), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2",
    )
    assert rc == 0, out[-4000:]
    print(f"2x4 train: {seconds:.1f} s")
    return out, metrics, ckpt


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory):
    # In this process (its 8 emulated devices): the reference needs one process, not a fresh one,
    # and a subprocess would only add its start-up.
    metrics = tmp_path_factory.mktemp("one") / "m.jsonl"
    start = time.monotonic()
    assert cli_main([*TRAIN, "--no-progress", "--metrics-file", str(metrics)]) == 0
    print(f"1x8 train (in-process): {time.monotonic() - start:.1f} s")
    return read_metrics(metrics)


def test_two_processes_train_like_one_and_only_process_0_reports(two_process_run, one_process_losses):
    out, metrics, _ = two_process_run
    losses = read_metrics(metrics)
    # Written by process 0 alone: one line per step, in order (a second writer opening the same
    # path with "w" would have truncated or interleaved it).
    assert [json.loads(l)["step"] for l in open(metrics).read().splitlines()] == list(range(STEPS))
    np.testing.assert_allclose([losses[s] for s in range(STEPS)],
                               [one_process_losses[s] for s in range(STEPS)], rtol=2e-5)
    p0, p1 = lines_of(out, 0), lines_of(out, 1)
    assert any(l.startswith("[p0] meshpar train: GPT") and "on 8 cpu devices" in l for l in p0), out[-4000:]
    assert any(l.startswith(f"[p0] done: {STEPS} steps") for l in p0), out[-4000:]
    assert any(re.search(rf"\b{STEPS}/{STEPS}\b", l) for l in p0), out[-4000:]  # tqdm bar
    assert p1, out[-4000:]  # process 1 ran (its gloo lines at least)
    for line in p1:
        assert "done:" not in line and "meshpar train:" not in line, line
        assert not re.search(rf"\b\d+/{STEPS}\b", line), line  # no progress bar


def test_two_process_checkpoints_resume_in_one_process(two_process_run, tmp_path, capsys):
    out, metrics, ckpt = two_process_run
    assert Checkpointer(ckpt).all_steps() == [2, 4]
    losses_2p = read_metrics(metrics)
    # Continue from step 2 (as if the 2-process job had stopped after its step-2 checkpoint).
    resume = tmp_path / "ckpt"
    shutil.copytree(ckpt, resume)
    shutil.rmtree(resume / "4")
    metrics_1p = tmp_path / "m.jsonl"
    # In this process, like the one-process reference (whose step program it reuses).
    start = time.monotonic()
    rc = cli_main([*TRAIN, "--no-progress", "--metrics-file", str(metrics_1p),
                   "--checkpoint-dir", str(resume), "--resume"])
    seconds = time.monotonic() - start
    captured = capsys.readouterr()
    out1 = captured.out + captured.err
    assert rc == 0, out1[-4000:]
    assert f"resumed from step 2 (saved on mesh {MESH}" in out1
    assert "done: 2 steps" in out1
    losses_1p = read_metrics(metrics_1p)
    assert sorted(losses_1p) == [2, 3]
    np.testing.assert_allclose([losses_1p[2], losses_1p[3]], [losses_2p[2], losses_2p[3]], rtol=2e-5)
    assert Checkpointer(resume).all_steps() == [2, 4]
    print(f"1x8 resume of a 2x4 checkpoint: {seconds:.1f} s")


def _children(parent: int) -> dict[int, int]:
    """``{MESHPAR_PROCESS_ID: pid}`` of the launcher's children (read from /proc)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if b"MESHPAR_PROCESS_ID" in env:
            found[int(env[b"MESHPAR_PROCESS_ID"])] = int(name)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the child's pid in /proc")
def test_killing_one_training_process_fails_the_job_fast(tmp_path):
    metrics = tmp_path / "m.jsonl"
    log = tmp_path / "launch.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshpar", "launch", "--processes", "2",
             "--cpu-devices-per-process", "4", "--heartbeat-timeout", "5", "--", "train",
             "--preset", "tiny", "--mesh", MESH, "--steps", "100000", "--batch-size", "16",
             "--no-progress", "--metrics-file", str(metrics)],
            env=child_env(), stdout=sink, stderr=subprocess.STDOUT, cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 180
        while True:  # both processes are in the training loop once process 0 logged 2 steps
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        children = _children(proc.pid)
        assert set(children) == {0, 1}, children
        os.kill(children[1], signal.SIGKILL)
        killed = time.monotonic()
        rc = proc.wait(timeout=90)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()  # the children die with the launcher (PR_SET_PDEATHSIG)
            proc.wait(timeout=30)
    out = log.read_text()
    assert rc != 0, out[-4000:]
    assert "meshpar launch: process 1 was killed by signal SIGKILL" in out, out[-4000:]
    assert re.search(r"meshpar launch: failed: process \d was killed by signal SIG\w+ first", out)
    # The survivor is gone too: aborted by JAX's heartbeat check or stopped by the launcher.
    assert re.search(r"meshpar launch: process 0 (was killed by signal|exited with code)", out), out[-4000:]
    # Heartbeat 5 s, the launcher's grace 5 s and kill-after 5 s bound it; allow a loaded machine.
    assert elapsed < 45, elapsed
    print(f"launcher exited {elapsed:.1f} s after process 1 was killed (status {rc})")


def test_process_count_that_does_not_fit_the_mesh_is_a_clear_error():
    rc, out, seconds = launch(
        "--processes", "2", "--cpu-devices-per-process", "3", "--", "train", "--preset", "tiny",
        "--mesh", "data=8", "--steps", "1", "--batch-size", "16", "--no-progress", timeout=120,
    )
    assert rc != 0, out[-4000:]
    assert re.search(r"\[p0\] meshpar train: error: mesh \{'data': 8\} has 8 devices .* but 6 "
                     r"devices are available", out), out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert rc == 2, out[-4000:]  # MeshError is a usage error in every process
    print(f"2x3 with data=8 rejected in {seconds:.1f} s")


def test_coordinator_port_in_use_exits_2_naming_the_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out, _ = launch("--processes", "2", "--cpu-devices-per-process", "4", "--port",
                            str(port), "--", *TRAIN, "--no-progress", timeout=60)
    assert rc == 2, out[-4000:]
    assert re.search(rf"^meshpar launch: port {port} on 127\.0\.0\.1 is already in use", out, re.M), out
    assert "[p0]" not in out and "[p1]" not in out  # nothing was started


# One DiLoCo replica group per process (issue 17): diloco is the mesh's outermost axis, so with
# 2 processes x 4 devices each process holds one replica group (fsdp x tensor) and only the
# outer step's reduction crosses processes. The arguments are test_diloco.py's CLI run, whose
# one-process result is the reference here: run in this process, it compiles nothing that test
# did not (the compile cache), where a subprocess would compile its programs again.
DILOCO = CLI_DILOCO
#: The inner step the 2-process run compiles, for `inspect --compiled` (same shapes).
DILOCO_MODEL = ["--preset", "tiny", "--seq-len", "16", "--batch-size", "8",
                "--mesh", "diloco=2,fsdp=2,tensor=2", "--inner-steps", "2"]
assert all(a in DILOCO for a in DILOCO_MODEL)


def test_diloco_with_one_replica_group_per_process_trains_like_one_process(tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    start = time.monotonic()
    assert cli_main([*DILOCO, "--metrics-file", str(one)]) == 0
    s1 = time.monotonic() - start
    rc, out2, s2 = launch("--processes", "2", "--cpu-devices-per-process", "4", "--", *DILOCO,
                          "--metrics-file", str(two))
    assert rc == 0, out2[-4000:]
    rows1 = [json.loads(line) for line in open(one).read().splitlines()]
    rows2 = [json.loads(line) for line in open(two).read().splitlines()]
    assert [r["step"] for r in rows2] == list(range(4))
    # Steps 2 and 3 start from the parameters of the first synchronisation (after step 1): the
    # outer reduction over diloco, across the two processes, gave the one-process result.
    np.testing.assert_allclose([r["loss"] for r in rows2], [r["loss"] for r in rows1], rtol=2e-5)
    assert [r["diloco_bytes"] for r in rows2] == [r["diloco_bytes"] for r in rows1]
    assert rows2[1]["diloco_bytes"] > 0 == rows2[0]["diloco_bytes"]
    # Each process compiles the same programs: its inner step holds no collective over diloco.
    rc, out3, s3 = launch("--processes", "2", "--cpu-devices-per-process", "4", "--", "inspect",
                          *DILOCO_MODEL, "--compiled")
    assert rc == 0, out3[-4000:]
    for process in (0, 1):
        assert f"[p{process}]   collectives over diloco in the inner step: 0 (OK)" in out3, out3[-4000:]
    print(f"DiLoCo 1x8 (in-process): {s1:.1f} s, 2x4: {s2:.1f} s, inspect 2x4: {s3:.1f} s")
