"""The built-in GPT with dropout (``GPTConfig.dropout``): exact on every layout, new masks every
step, no RNG state without it, and checkpoints that name a missing RNG stream.

The GPT drops out the embedding output and the last hidden state, outside the layer stack, so
every layout runs it, pipelines included. Each layout trains 3 AdamW steps on 8 emulated devices
and is compared with the same model on one device with the same microbatching, by
test_zoo.py's helpers and test_equivalence.py's fp32 tolerances: the losses, every parameter and
the RNG streams (keys and counters, bitwise) after the three steps. The masks are equal bitwise
whatever the sharding (threefry is partitionable and the model draws them for the global batch).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import meshpar as mp
from meshpar.mesh import make_mesh
from meshpar.models import GPT, get_preset, lm_loss
from meshpar.train.checkpoint import Checkpointer, CheckpointError
from meshpar.train.data import TokenBatches

from helpers.compare import mesh_axes, single_device_mesh
from helpers.zoo import ZooModel
from test_zoo import LAYOUTS, STEPS, Run, _host, assert_runs_match, train

DROPOUT = 0.1
CFG = get_preset("tiny", dropout=DROPOUT)             # 2 layers: pipe=2 holds one per stage
DATA = TokenBatches(batch_size=16, seq_len=CFG.seq_len, seed=0)
RNG_STREAMS = ("embed_dropout/rngs", "final_dropout/rngs")


# AdamW as in test_zoo.py, with eps=1e-6 instead of 1e-8. Adam's first update of an entry,
# lr * g / (|g| + eps), has slope lr / eps at g ~ 0; with dropout, this model's step-0 gradient has
# a w_out entry at -3.1e-8 (3 eps) whose fp32 reordering noise is 2e-9 (tensor=2 vs one device):
# with eps=1e-8 that alone moves the parameter by 1.4e-4 (1.4% of lr), over PARAM_ATOL = 5e-5,
# although the masks are the same and, at equal parameters and RNG state, every gradient agrees
# to 1e-6 of its leaf's largest entry at each of the 3 steps (measured). eps=1e-6 divides that
# slope by 100 and leaves everything else the same; a wrong mask or reduction is still O(lr).
# Seen with it: parameters within 2.0e-5 + 1e-5 |p_ref| (tp, 3-D; <= 8e-6 elsewhere), step
# losses within 3e-7 relative.
def make_tx() -> optax.GradientTransformation:
    return optax.adamw(1e-2, eps=1e-6)


def gpt(cfg) -> ZooModel:
    return ZooModel(f"gpt-{cfg.layers}-dropout", lambda: GPT(cfg, rngs=nnx.Rngs(0)), lm_loss,
                    DATA.batch, scanned=True)


@functools.cache
def reference(microbatches: int) -> Run:
    return train(gpt(CFG), single_device_mesh(), "dp", mp.TrainConfig(microbatches=microbatches),
                 tx=make_tx())


@functools.cache
def initial(kind) -> dict:
    with nnx.use_eager_sharding(False):
        return _host(nnx.state(GPT(CFG, rngs=nnx.Rngs(0)), kind))


CASES = {
    # name: (mesh, strategy, TrainConfig); the reference runs the same microbatching
    # (a pipeline's microbatches belong to the pipeline: its reference runs one).
    **{name: (mesh, strategy, mp.TrainConfig(microbatches=m))
       for name, (mesh, strategy, m) in LAYOUTS.items()},
    # One pipelined layout: the dropout layers sit outside the stack, so the schedule does not
    # change what they draw (tests/test_zoo.py runs dropout *inside* a stack under every schedule).
    "pipe-gpipe": ("pipe=2,data=4", "dp", mp.TrainConfig(microbatches=2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gpt_with_dropout_trains_like_one_device(name):
    mesh, strategy, config = CASES[name]
    ref_microbatches = 1 if mesh.startswith("pipe") else config.microbatches
    ref = reference(ref_microbatches)
    got = train(gpt(CFG), make_mesh(dict(mesh_axes(mesh))), strategy, config, tx=make_tx())
    assert_runs_match(got, ref, initial(nnx.Param))
    # Not vacuous: the model has its two RNG streams, and they advanced (one draw per call).
    before = initial(nnx.Not(nnx.Param))
    assert sorted(got.rest) == sorted(before) == sorted(
        f"['{s}']['rngs']['{leaf}'].value" for s in ("embed_dropout", "final_dropout")
        for leaf in ("count", "key"))
    counts = {k: int(got.rest[k]) for k in got.rest if "count" in k}
    assert all(n == int(before[k]) + STEPS * ref_microbatches for k, n in counts.items()), counts


def _losses_on_one_batch(cfg, steps: int = 2) -> list[float]:
    """``steps`` optimizer steps with learning rate 0 on batch 0: only the masks can change."""
    trainer = mp.Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.sgd(0.0), lm_loss,
                         mesh=make_mesh(data=8), strategy="dp")
    return [trainer.step(DATA.batch(0))["loss"] for _ in range(steps)]


def test_masks_change_every_step_and_dropout_0_is_deterministic():
    a, b = _losses_on_one_batch(CFG)
    assert a != b and abs(a - b) > 1e-4, (a, b)
    a, b = _losses_on_one_batch(get_preset("tiny"))
    assert a == b


def test_dropout_0_gives_no_rng_state_and_keeps_the_batch_local_paths():
    with nnx.use_eager_sharding(False):
        plain = GPT(get_preset("tiny"), rngs=nnx.Rngs(0))
        dropped = GPT(CFG, rngs=nnx.Rngs(0))
    assert jax.tree.leaves(nnx.state(plain, nnx.Not(nnx.Param))) == []
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(dropped, nnx.Not(nnx.Param)))}
    assert paths == {f"{s}/{leaf}" for s in RNG_STREAMS for leaf in ("key", "count")}

    def make(cfg):
        return mp.Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-3), lm_loss,
                          mesh=make_mesh(fsdp=8), strategy="zero3",
                          config=mp.TrainConfig(row_separable=True))

    fast = make(get_preset("tiny"))
    assert fast.explicit_zero
    assert not any("non-parameter state" in str(f) for f in fast.fallbacks), fast.fallbacks
    slow = make(CFG)
    assert not slow.explicit_zero
    assert any("non-parameter state (embed_dropout/rngs/count" in str(f) for f in slow.fallbacks), \
        [str(f) for f in slow.fallbacks]


def test_a_checkpoint_without_the_rng_streams_is_refused_naming_them(tmp_path):
    def make(cfg):
        return mp.Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-3), lm_loss,
                          mesh=make_mesh(data=8), strategy="dp")

    plain, dropped = make(get_preset("tiny")), make(CFG)
    for trainer, name in ((plain, "plain"), (dropped, "dropped")):
        trainer.step(DATA.batch(0))
        with Checkpointer(tmp_path / name) as ckpt:
            ckpt.save(1, trainer.checkpoint_state(), meta={"step": 1})

    before = jax.tree.map(np.asarray, jax.device_get(dropped.checkpoint_state()))
    with pytest.raises(CheckpointError, match=(
            r"checkpoint step 1 in .*plain.* does not match the restore target: model state "
            r"'rest/embed_dropout/rngs/\w+' \(RNG stream 'embed_dropout/rngs', non-parameter "
            r"state\) of the restore target is missing from the checkpoint \(3 more")):
        Checkpointer(tmp_path / "plain").restore(dropped.checkpoint_target())
    after = jax.tree.map(np.asarray, jax.device_get(dropped.checkpoint_state()))
    jax.tree.map(np.testing.assert_array_equal, after, before)  # the trainer's state: untouched
    assert Checkpointer(tmp_path / "plain").all_steps() == [1]

    # The other way round: the checkpoint holds streams the model does not have.
    with pytest.raises(CheckpointError, match=(
            r"the checkpoint has model state 'rest/embed_dropout/rngs/\w+' \(RNG stream "
            r"'embed_dropout/rngs', non-parameter state\), which the restore target lacks")):
        Checkpointer(tmp_path / "dropped").restore(plain.checkpoint_target())
