"""Checkpoint and resume of ``meshpar train``: kill/resume exactness, other meshes, errors, safety.

The end-to-end tests run the real CLI in subprocesses (``python -m meshpar train``) with the tiny
preset. Each child gets a clean environment (no ``JAX_*``/``XLA_*``/``MESHPAR_*`` from this test
process, so it emulates its own 8 CPU devices, not whatever the test session set), the CPU
platform, and the test suite's persistent compilation cache through ``JAX_COMPILATION_CACHE_DIR``
(jax reads every ``jax_*`` option from the upper-case environment variable), so that repeated
compiles of the same step are cheap. Every subprocess has a hard timeout.

All runs of one comparison use the same ``--layers 4 --steps 6`` (the learning-rate schedule
depends on ``--steps``; 4 layers so that the pipelined mesh ``pipe=2`` has whole stages).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from meshpar.cli import main as cli_main
from meshpar.cli.train import make_optimizer
from meshpar.mesh import make_mesh
from meshpar.models import GPT, get_preset, lm_loss
from meshpar.train import TrainConfig, Trainer
from meshpar.train.checkpoint import COMMIT_MARKER, TMP_SUFFIX, Checkpointer
from meshpar.train.data import TokenBatches

from helpers.env import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(REPO, "tests", "helpers")

# When a restore of a corrupted checkpoint fails, Orbax abandons its other pending TensorStore
# reads; their callbacks later hit a closed asyncio loop and Python reports them as "unraisable"
# (orbax-checkpoint 0.12.8 internals, harmless; see test_checkpoint.py).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

MESH = "data=2,fsdp=2,tensor=2"
STEPS = 6
#: The arguments every run of the kill/resume comparison shares.
BASE = ["train", "--preset", "tiny", "--layers", "4", "--batch-size", "16", "--steps", str(STEPS),
        "--no-progress", "--sample-tokens", "0"]
#: Smaller runs for the error tests (2 layers, 2 steps: only the checkpoint matters there).
SMALL = ["train", "--preset", "tiny", "--batch-size", "16", "--steps", "2", "--no-progress",
         "--sample-tokens", "0"]


def meshpar(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m meshpar ARGS`` in a fresh process (stdout and stderr kept apart)."""
    return subprocess.run(
        [sys.executable, "-m", "meshpar", *args], env=child_env(), capture_output=True,
        text=True, timeout=timeout, cwd=REPO,
    )


def read_metrics(path) -> dict[int, float]:
    """``{step: loss}`` from a ``--metrics-file``."""
    rows = [json.loads(line) for line in open(path).read().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), steps
    return {r["step"]: r["loss"] for r in rows}


def output(proc) -> str:
    return f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def resume_copy(source, dst, *, keep_up_to: int):
    """A copy of checkpoint directory ``source`` with the steps after ``keep_up_to`` removed."""
    shutil.copytree(source, dst)
    for name in os.listdir(dst):
        if name.isdigit() and int(name) > keep_up_to:
            shutil.rmtree(os.path.join(dst, name))
    return dst


# ======================================================================= 1. kill and resume


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """Run A: 6 uninterrupted steps on the default mesh, no checkpoints."""
    path = tmp_path_factory.mktemp("run_a") / "a.jsonl"
    proc = meshpar(*BASE, "--mesh", MESH, "--metrics-file", str(path))
    assert proc.returncode == 0, output(proc)
    losses = read_metrics(path)
    assert sorted(losses) == list(range(STEPS))
    return losses


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    """Run B: A's arguments plus checkpoints every 2 steps, SIGKILLed after checkpoint 4.

    The child is the real CLI, patched only to stop before step 5 (``helpers/hang_train.py``) so
    that the kill lands at a known point: metrics of steps 0..4 written, checkpoints 2 and 4
    committed (async saves), training "in progress". Returns (checkpoint dir, B's losses).
    """
    root = tmp_path_factory.mktemp("run_b")
    ckpt, metrics, log = root / "ckpt", root / "b.jsonl", root / "b.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(HELPERS, "hang_train.py"), "5", "--", *BASE,
             "--mesh", MESH, "--metrics-file", str(metrics), "--checkpoint-dir", str(ckpt),
             "--checkpoint-every", "2"],
            env=child_env(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"run B ended by itself ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"run B timed out:\n{log.read_text()[-3000:]}"
            done = (ckpt / "4" / COMMIT_MARKER).exists() and metrics.exists() and any(
                json.loads(l)["step"] >= 4 for l in metrics.read_text().splitlines() if l.strip()
            )
            if done:
                break
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    text = log.read_text()
    assert "HANGING before step 5" in text, text[-3000:]
    assert "done:" not in text  # it was killed mid-run
    assert Checkpointer(ckpt).all_steps() == [2, 4]
    return ckpt, read_metrics(metrics)


def test_checkpointing_does_not_change_the_losses(run_a, run_b):
    _, losses_b = run_b
    assert sorted(losses_b) == [0, 1, 2, 3, 4]
    assert losses_b == {s: run_a[s] for s in losses_b}  # bitwise: same mesh, same program


def test_kill_and_resume_on_the_same_mesh_is_bitwise_exact(run_a, run_b, tmp_path):
    ckpt = resume_copy(run_b[0], tmp_path / "ckpt", keep_up_to=4)
    metrics = tmp_path / "c.jsonl"
    proc = meshpar(*BASE, "--mesh", MESH, "--metrics-file", str(metrics), "--checkpoint-dir",
                   str(ckpt), "--checkpoint-every", "2", "--resume")
    assert proc.returncode == 0, output(proc)
    assert re.search(rf"resumed from step 4 \(saved on mesh {MESH}, strategy auto\)", proc.stdout)
    assert "done: 2 steps" in proc.stdout
    losses_c = read_metrics(metrics)
    assert sorted(losses_c) == [4, 5]
    # Bitwise: float equality of the JSON-printed float32 losses (json round-trips floats exactly).
    assert losses_c == {4: run_a[4], 5: run_a[5]}
    # The resumed run went on checkpointing into the same directory.
    assert Checkpointer(ckpt).all_steps() == [2, 4, 6]


@pytest.mark.parametrize(
    "from_step, layout",
    [
        (4, ["--mesh", "fsdp=4,tensor=2"]),
        (2, ["--mesh", "pipe=2,data=2,tensor=2", "--microbatches", "2"]),
    ],
    ids=["step4-fsdp4-tensor2", "step2-pipelined"],
)
def test_resume_on_another_mesh(run_a, run_b, tmp_path, from_step, layout):
    ckpt = resume_copy(run_b[0], tmp_path / "ckpt", keep_up_to=from_step)
    metrics = tmp_path / "d.jsonl"
    proc = meshpar(*BASE, *layout, "--metrics-file", str(metrics), "--checkpoint-dir", str(ckpt),
                   "--resume")
    assert proc.returncode == 0, output(proc)
    assert f"resumed from step {from_step} (saved on mesh {MESH}" in proc.stdout
    losses_d = read_metrics(metrics)
    assert sorted(losses_d) == list(range(from_step, STEPS))
    np.testing.assert_allclose(
        [losses_d[s] for s in sorted(losses_d)], [run_a[s] for s in sorted(losses_d)], rtol=2e-5
    )


# ======================================================================= 2. restore in-process

CFG4 = get_preset("tiny", layers=4)


def make_trainer(mesh, strategy="auto", microbatches=1) -> Trainer:
    return Trainer(lambda: GPT(CFG4, rngs=nnx.Rngs(0)), make_optimizer(3e-3, STEPS), lm_loss,
                   mesh=mesh, strategy=strategy, config=TrainConfig(microbatches=microbatches,
                                                                   row_separable=True))


def host_tree(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_same_leaves(got, want):
    fg, fw = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    assert [jax.tree_util.keystr(p) for p, _ in fg] == [jax.tree_util.keystr(p) for p, _ in fw]
    assert len(fg) > 10
    for (path, x), (_, y) in zip(fg, fw):
        x = np.asarray(jax.device_get(x))
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def saved_zero3(tmp_path_factory):
    """2 steps on ``fsdp=8`` ZeRO-3, saved; returns (dir, saved values, step-3 batch, loss)."""
    data = TokenBatches(batch_size=16, seq_len=CFG4.seq_len, seed=0)
    source = make_trainer(make_mesh(fsdp=8), "zero3")
    for step in range(2):
        source.step(data.batch(step))
    directory = tmp_path_factory.mktemp("zero3") / "ckpt"
    state = source.checkpoint_state()
    saved = host_tree(state)
    with Checkpointer(directory) as ckpt:
        ckpt.save(2, state, meta={"step": 2})
    assert int(saved["step"]) == 2
    loss3 = source.step(data.batch(2))["loss"]
    return directory, saved, data.batch(2), loss3


@pytest.mark.parametrize(
    "name",
    ["tp-data2-tensor4", "pipelined-pipe2-fsdp2-tensor2", "dp-on-4-devices"],
)
def test_restore_onto_other_meshes_gives_every_value_and_the_next_loss(saved_zero3, name):
    directory, saved, batch, loss3 = saved_zero3
    if name == "tp-data2-tensor4":
        trainer = make_trainer(make_mesh(data=2, tensor=4), "tp")
    elif name == "pipelined-pipe2-fsdp2-tensor2":
        trainer = make_trainer(make_mesh(pipe=2, fsdp=2, tensor=2), "auto", microbatches=2)
        assert trainer.pipeline is not None and trainer.pipeline.stages == 2
    else:
        trainer = make_trainer(make_mesh(data=4, devices=jax.devices()[:4]), "dp")
    target = trainer.checkpoint_target()
    state, meta = Checkpointer(directory).restore(target)
    assert meta == {"step": 2}
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        assert leaf.sharding == want.sharding
    trainer.load_checkpoint_state(state)
    # The trainer's own state (stage layout, strategy shardings) round-trips to the saved values.
    assert_same_leaves(trainer.checkpoint_state(), saved)
    if name == "dp-on-4-devices":
        for leaf in jax.tree.leaves(trainer.state):
            assert leaf.sharding.device_set == set(jax.devices()[:4])
    metrics = trainer.step(batch)
    np.testing.assert_allclose(metrics["loss"], loss3, rtol=2e-5)
    assert int(trainer.state.step) == 3


# ======================================================================= 3. kill during a save

DROPOUT = ["--dropout", "0.1"]


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, caplog):
    # With dropout: the model's RNG streams (keys and counters) are saved and restored, so the
    # resumed step draws the masks the killed run drew, and its loss is bitwise the same.
    import logging

    directory = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, os.path.join(HELPERS, "killed_save.py"), str(directory), *DROPOUT],
        env=child_env(), capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == -signal.SIGKILL, output(proc)
    assert "SAVED 1" in proc.stdout, output(proc)
    loss1 = json.loads(proc.stdout.split("LOSS1 ", 1)[1].splitlines()[0])
    # The kill landed mid-write: step 2 exists only as Orbax's tmp directory.
    assert sorted(os.listdir(directory)) == ["1", f"2{TMP_SUFFIX}"], os.listdir(directory)

    with caplog.at_level(logging.WARNING, logger="meshpar.checkpoint"):
        ckpt = Checkpointer(directory)
    assert f"2{TMP_SUFFIX}" in caplog.text and "partial" in caplog.text
    assert ckpt.latest_step() == 1
    assert sorted(os.listdir(directory)) == ["1"]  # the partial save was removed on open
    ckpt.close()

    metrics = tmp_path / "m.jsonl"
    proc = meshpar("train", "--preset", "tiny", "--batch-size", "16", "--steps", "3",
                   "--no-progress", "--sample-tokens", "0", *DROPOUT, "--checkpoint-dir", str(directory), "--resume",
                   "--metrics-file", str(metrics))
    assert proc.returncode == 0, output(proc)
    assert "resumed from step 1 (saved on mesh data=2,fsdp=2,tensor=2" in proc.stdout
    assert "dropout 0.1" in proc.stdout
    losses = read_metrics(metrics)
    assert sorted(losses) == [1, 2]
    assert losses[1] == loss1  # bitwise: the step the killed run computed after saving step 1
    assert Checkpointer(directory).all_steps() == [1, 3]


# ======================================================================= 4. errors


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A finished 2-step SMALL run's checkpoint directory (read-only: copy before resuming)."""
    directory = tmp_path_factory.mktemp("small") / "ckpt"
    proc = meshpar(*SMALL, "--checkpoint-dir", str(directory))
    assert proc.returncode == 0, output(proc)
    assert Checkpointer(directory).all_steps() == [2]
    return directory


def expect_usage_error(argv, pattern, capsys):
    """In-process ``meshpar train``: exit 2 and one line ``meshpar train: error: ...``."""
    try:
        status = cli_main(argv)
    except BaseException as e:  # noqa: BLE001 - a non-MeshparError escaping main() is a bug
        pytest.fail(f"meshpar {' '.join(argv)} raised {type(e).__name__}: {e} instead of exiting 2 "
                    "with a one-line message (it is not a MeshparError)")
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("meshpar train: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    return err


def test_resume_with_a_missing_directory(tmp_path, capsys):
    expect_usage_error(
        [*SMALL, "--checkpoint-dir", str(tmp_path / "nowhere"), "--resume"],
        r"--resume: checkpoint directory '.*nowhere' does not exist", capsys,
    )
    assert not (tmp_path / "nowhere").exists()  # and it was not created


def test_resume_with_an_empty_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    expect_usage_error(
        [*SMALL, "--checkpoint-dir", str(tmp_path / "empty"), "--resume"],
        r"--resume: no complete checkpoint in '.*empty'", capsys,
    )


def test_resume_a_different_model_names_the_first_mismatching_parameter(small_ckpt, tmp_path, capsys):
    ckpt = resume_copy(small_ckpt, tmp_path / "ckpt", keep_up_to=2)
    expect_usage_error(
        [*SMALL, "--d-model", "32", "--checkpoint-dir", str(ckpt), "--resume"],
        r"checkpoint step 2 in .* does not match the restore target: parameter '[\w/]+' is "
        r"\([\d, ]+\) float32 in the checkpoint but \([\d, ]+\) float32 in the restore target",
        capsys,
    )


def test_resume_a_corrupted_checkpoint_names_the_step(small_ckpt, tmp_path, capsys):
    ckpt = resume_copy(small_ckpt, tmp_path / "ckpt", keep_up_to=2)
    # The biggest data file holds out-of-line array chunks (small arrays are inlined in the
    # B-tree nodes); cutting it in half is what a crash on a non-atomic filesystem leaves.
    files = glob.glob(str(ckpt / "2" / "state" / "**" / "d" / "*"), recursive=True)
    biggest = max(files, key=os.path.getsize)
    assert os.path.getsize(biggest) > 100_000
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    expect_usage_error(
        [*SMALL, "--checkpoint-dir", str(ckpt), "--resume"],
        r"checkpoint step 2 in .* could not be read: it is corrupted", capsys,
    )


def test_checkpoint_dir_with_checkpoints_needs_resume(small_ckpt, tmp_path, capsys):
    ckpt = resume_copy(small_ckpt, tmp_path / "ckpt", keep_up_to=2)
    expect_usage_error(
        [*SMALL, "--checkpoint-dir", str(ckpt)],
        r"'.*ckpt' already holds checkpoints \(latest step 2\); pass --resume", capsys,
    )
    assert Checkpointer(ckpt).all_steps() == [2]  # untouched


def test_resume_needs_a_checkpoint_dir(capsys):
    expect_usage_error([*SMALL, "--resume"], r"--resume and --checkpoint-every need --checkpoint-dir",
                       capsys)


@pytest.mark.parametrize(
    "flag, value, pattern",
    [
        ("--batch-size", "32", r"--resume: --batch-size 32 differs from the checkpoint's 16"),
        ("--seed", "1", r"--resume: --seed 1 differs from the checkpoint's 0"),
    ],
)
def test_resume_with_another_batch_size_or_seed(small_ckpt, tmp_path, capsys, flag, value, pattern):
    ckpt = resume_copy(small_ckpt, tmp_path / "ckpt", keep_up_to=2)
    argv = [a for a in SMALL]
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    expect_usage_error([*argv, "--checkpoint-dir", str(ckpt), "--resume"], pattern, capsys)


def test_resume_with_dropout_of_a_run_without_names_the_missing_rng_stream(small_ckpt, tmp_path,
                                                                           capsys):
    ckpt = resume_copy(small_ckpt, tmp_path / "ckpt", keep_up_to=2)
    expect_usage_error(
        [*SMALL, "--dropout", "0.1", "--checkpoint-dir", str(ckpt), "--resume"],
        r"--resume: the checkpoint at step 2 is of a different model \(dropout=0.0 there, 0.1 "
        r"here\): checkpoint step 2 in .* does not match the restore target: model state "
        r"'rest/embed_dropout/rngs/\w+' \(RNG stream 'embed_dropout/rngs', non-parameter state\) "
        r"of the restore target is missing from the checkpoint", capsys,
    )
    assert Checkpointer(ckpt).all_steps() == [2]  # untouched


def test_resume_of_a_checkpoint_from_before_dropout_existed(small_ckpt, tmp_path, capsys):
    # Checkpoints written before GPTConfig had `dropout` lack it in their metadata: the field's
    # default (0.0) stands in for it.
    ckpt = resume_copy(small_ckpt, tmp_path / "ckpt", keep_up_to=2)
    path = ckpt / "2" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    assert meta["model"].pop("dropout") == 0.0
    path.write_text(json.dumps(meta))
    status = cli_main([*SMALL, "--checkpoint-dir", str(ckpt), "--resume"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "resumed from step 2" in captured.out
    expect_usage_error([*SMALL, "--dropout", "0.1", "--checkpoint-dir", str(ckpt), "--resume"],
                       r"\(dropout=0.0 there, 0.1 here\)", capsys)


def test_resume_with_another_remat_policy(small_ckpt, tmp_path, capsys):
    # remat is a compute policy of the layer scan: it changes neither the parameters nor the
    # optimizer state, so a run may resume with another one (less or more memory).
    ckpt = resume_copy(small_ckpt, tmp_path / "ckpt", keep_up_to=2)
    status = cli_main([*SMALL, "--remat", "none", "--checkpoint-dir", str(ckpt), "--resume"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "resumed from step 2" in captured.out


def test_resume_of_a_checkpoint_whose_meta_lacks_the_step_exits_2(small_ckpt, tmp_path, capsys):
    # A damaged or hand-edited meta without "step": one CheckpointError (exit 2), no KeyError.
    ckpt = resume_copy(small_ckpt, tmp_path / "ckpt", keep_up_to=2)
    path = ckpt / "2" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    assert meta["step"] == 2
    del meta["step"]
    path.write_text(json.dumps(meta))
    expect_usage_error([*SMALL, "--checkpoint-dir", str(ckpt), "--resume"],
                       r"--resume: checkpoint step 2 has no valid 'step' in its metadata \(None\); "
                       r"it was not written by meshpar train", capsys)


def test_resume_error_in_a_fresh_process_has_no_traceback(small_ckpt, tmp_path):
    ckpt = resume_copy(small_ckpt, tmp_path / "ckpt", keep_up_to=2)
    proc = meshpar(*SMALL, "--d-model", "32", "--checkpoint-dir", str(ckpt), "--resume")
    assert proc.returncode == 2, output(proc)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(
        "meshpar train: error: --resume: the checkpoint at step 2 is of a different model "
        "(d_model=64 there, 32 here): checkpoint step 2 in ")
    assert re.search(r"parameter 'params/", proc.stderr)  # a parameter, not optimizer state
    proc = meshpar(*SMALL, "--checkpoint-dir", str(tmp_path / "nowhere"), "--resume")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, output(proc)
    assert re.search(r"^meshpar train: error: --resume: checkpoint directory .* does not exist\n$",
                     proc.stderr)


# ======================================================================= 5. no unpickling


def test_loading_a_checkpoint_never_unpickles(saved_zero3, monkeypatch):
    import _pickle
    import pickle

    directory, saved, _, _ = saved_zero3
    trainer = make_trainer(make_mesh(data=2, tensor=4), "tp")
    target = trainer.checkpoint_target()  # compiled before the watch: only loading is watched
    calls: list[str] = []

    def forbidden(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"checkpoint loading called {name}")
        return fail

    real_np_load = np.load

    def np_load(*args, **kwargs):
        if kwargs.get("allow_pickle"):
            calls.append("numpy.load(allow_pickle=True)")
            raise AssertionError("checkpoint loading called numpy.load(allow_pickle=True)")
        return real_np_load(*args, **kwargs)

    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
    monkeypatch.setattr(np, "load", np_load)
    # An unpickler bound under another name before the patch still has to look up every class
    # it builds, and Python audits that lookup ("pickle.find_class"), even in Orbax's threads.
    _AUDIT["events"] = []
    _AUDIT["on"] = True
    try:
        state, meta = Checkpointer(directory).restore(target)
        trainer.load_checkpoint_state(state)
    finally:
        _AUDIT["on"] = False
        monkeypatch.undo()
    assert calls == [] and _AUDIT["events"] == [], (calls, _AUDIT["events"])
    assert meta == {"step": 2}
    assert_same_leaves(trainer.checkpoint_state(), saved)
    # The watch itself works: an unpickle under it would have been seen.
    _AUDIT["on"] = True
    try:
        pickle.loads(pickle.dumps(TrainConfig()))
    finally:
        _AUDIT["on"] = False
    assert any(args[1] == "TrainConfig" for _, args in _AUDIT["events"]), _AUDIT["events"]


_AUDIT: dict = {"on": False, "events": []}


def _audit(event, args):
    if _AUDIT["on"] and event == "pickle.find_class":
        _AUDIT["events"].append((event, args))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one is inert unless a test arms it
