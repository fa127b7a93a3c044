"""``meshpar train``: metrics file, mesh-independent losses, usage errors with status 2."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from meshpar.cli import main as cli_main

# No end-of-run sample (--sample-tokens 0): its forward program would be compiled in every run.
TINY = ["--preset", "tiny", "--steps", "3", "--batch-size", "16", "--no-progress", "--sample-tokens", "0"]


def _train(tmp_path, name, *extra):
    path = tmp_path / f"{name}.jsonl"
    assert cli_main(["train", *TINY, "--metrics-file", str(path), *extra]) == 0
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_file_has_one_line_per_step_with_the_promised_keys(tmp_path, capsys):
    rows = _train(tmp_path, "a", "--mesh", "data=2,fsdp=2,tensor=2")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"step", "loss", "step_time_s", "tokens_per_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and np.isfinite(r["loss"])
        # lm_loss is a plain mean without aux: no loss weight, no aux keys.
        assert "loss_weight" not in r and not any(k.startswith("aux") for k in r), r
    out = capsys.readouterr().out
    assert "unigram entropy" in out and re.search(r"done: 3 steps", out)
    # The summary names what auto resolved to on this mesh, not just "auto".
    assert "strategy auto -> ZeRO-3 over fsdp + TP over tensor + DP over data, batch" in out


def test_same_seed_and_batch_give_the_same_losses_whatever_the_mesh(tmp_path):
    a = _train(tmp_path, "a", "--mesh", "data=8", "--strategy", "dp")
    b = _train(tmp_path, "b", "--mesh", "fsdp=4,tensor=2", "--zero", "3", "--sequence-parallel",
               "--microbatches", "2")
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=2e-5)


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--batch-size", "6"], r"global batch size 6 is not divisible by the batch-sharding axes \(data=2 x fsdp=2\) times microbatches=1 = 4"),
        (["--batch-size", "16", "--microbatches", "8"], r"microbatches=8 = 32"),
        (["--mesh", "tensor=8", "--heads", "4"], r"--heads 4 is not divisible by tensor=8"),
        (["--mesh", "data=2,tensor=4", "--mlp-dim", "6"], r"--mlp-dim 6 is not divisible by tensor=4"),
        (["--mesh", "data=2,tensor=4", "--sequence-parallel", "--seq-len", "30"], r"--seq-len 30 is not divisible by tensor=4"),
        (["--zero", "3", "--mesh", "data=8", "--strategy", "zero3"], r"needs a 'fsdp' mesh axis"),
        (["--strategy", "nope"], r"unknown strategy 'nope'"),
        (["--steps", "0"], r"--steps 0: must be >= 1"),
        (["--dropout", "1"], r"--dropout 1.0: must be in \[0, 1\)"),
        (["--dropout", "-0.1"], r"--dropout -0.1: must be in \[0, 1\)"),
        (["--dropout", "nan"], r"--dropout nan: must be in \[0, 1\)"),
        (["--vocab-size", "100"], r"needs >= 256"),
        (["--preset", "huge"], r"unknown preset 'huge'|huge"),
        (["--mesh", "foo=8"], r"mesh axis foo=8 is used by nothing: .* every device along it would "
                              r"repeat the same work. Drop it from the mesh \(e.g. data=8\)"),
    ],
)
def test_usage_errors_exit_2_with_one_message(argv, pattern, capsys):
    status = cli_main(["train", "--preset", "tiny", "--steps", "1", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert re.search(pattern, err), err
    assert err.startswith("meshpar train: error: ") and err.count("\n") == 1


def test_usage_error_in_a_fresh_process_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "meshpar", "train", "--preset", "tiny", "--batch-size", "6"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "global batch size 6 is not divisible" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "meshpar", "train", "--zero", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 4" in proc.stderr


def test_metrics_file_lines_carry_aux_and_loss_weight_when_the_loss_has_them():
    """``meshpar train`` writes each step's line with :func:`meshpar.cli.train.metrics_record`; here a
    Trainer whose loss is an ``mp.Ratio`` with aux (Python API, lm_loss has neither)."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import meshpar as mp
    from meshpar.cli.train import metrics_record
    from meshpar.models import GPT, get_preset
    from meshpar.train.data import TokenBatches

    def loss_fn(model, batch):
        logits = model(batch["inputs"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = (batch["targets"] != 32).astype(jnp.float32)  # not the spaces
        return mp.Ratio(jnp.sum(ce * mask), jnp.sum(mask)), {
            "tokens": mp.Summed(jnp.sum(mask)),
            "accuracy": {"top1": mp.Ratio(jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * mask),
                                          jnp.sum(mask))},
            "ce_by_position": jnp.mean(ce, axis=0)[:4],
        }

    trainer = mp.Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)), optax.adamw(1e-3),
                         loss_fn, mesh=mp.make_mesh(data=8), strategy="dp")
    batch = TokenBatches(batch_size=16, seq_len=32, seed=0).batch(0)
    record = json.loads(json.dumps(metrics_record(0, trainer.step(batch), 16 * 32)))
    tokens = float(np.sum(batch["targets"] != 32))
    assert record["loss_weight"] == record["aux/tokens"] == tokens < 16 * 32
    assert 0 <= record["aux/accuracy/top1"] <= 1
    assert len(record["aux/ce_by_position"]) == 4
    assert all(isinstance(x, float) for x in record["aux/ce_by_position"])
    assert {"step", "loss", "grad_norm", "step_time_s", "tokens_per_s", "skipped"} <= set(record)
