"""What a loss function may return, how meshpar reduces it, and what it refuses (meshpar.train.loss).

* ``mp.Ratio(total, weight)`` equals its full-batch value on every path, the batch-local ones
  included (``TrainConfig(row_separable=True)``: ZeRO-2/3 written-out collectives, DP
  accumulation in a ``shard_map``), with microbatches holding different token counts.
* A plain scalar is a mean over pieces: a masked ratio written as one becomes a mean of
  per-piece ratios there, as the docs say.
* Bad output, bad batches and all-padding batches are refused with errors naming the cause,
  and the state is left as it was.
* Which path runs is decided when the trainer is built and listed in ``Trainer.fallbacks``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import meshpar as mp
from meshpar.errors import StrategyError, TrainingError

from helpers.compare import single_device_mesh
from helpers.zoo import SEQ, VOCAB, ZOO, encoder_batch
from test_equivalence import LOSS_ATOL, LOSS_RTOL, PARAM_ATOL, PARAM_RTOL


class Tagger(nnx.Module):
    """A stateless per-token model: rows are independent, so it may run batch-local."""

    def __init__(self, rngs: nnx.Rngs):
        p = lambda f, *axes: nnx.with_partitioning(f, axes)  # noqa: E731
        self.embed = nnx.Embed(VOCAB, 32, embedding_init=p(nnx.initializers.normal(0.1),
                                                           "vocab", "embed"), rngs=rngs)
        self.up = nnx.Linear(32, 64, kernel_init=p(nnx.initializers.lecun_normal(), "embed", "mlp"),
                             bias_init=p(nnx.initializers.zeros, "mlp"), rngs=rngs)
        self.out = nnx.Linear(64, VOCAB, kernel_init=p(nnx.initializers.lecun_normal(), "mlp", "vocab"),
                              bias_init=p(nnx.initializers.zeros, "vocab"), rngs=rngs)

    def __call__(self, tokens):
        return self.out(jax.nn.gelu(self.up(self.embed(tokens))))


def _ce(model, batch):
    logits = model(batch["tokens"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]), batch["mask"]


def ratio_loss(model, batch):
    ce, mask = _ce(model, batch)
    return mp.Ratio(jnp.sum(ce * mask), jnp.sum(mask)), {"tokens": mp.Summed(jnp.sum(mask))}


def plain_ratio_loss(model, batch):
    ce, mask = _ce(model, batch)
    return jnp.sum(ce * mask) / jnp.sum(mask)


def _train(loss_fn, mesh, strategy="dp", *, microbatches=1, row_separable=True, steps=2):
    trainer = mp.Trainer(lambda: Tagger(nnx.Rngs(0)), optax.adam(1e-2), loss_fn, mesh=mesh,
                         strategy=strategy,
                         config=mp.TrainConfig(microbatches=microbatches, row_separable=row_separable))
    metrics = [trainer.step(encoder_batch(s)) for s in range(steps)]
    return trainer, metrics


BATCH_LOCAL = [("fsdp=8", "zero3", 2), ("fsdp=8", "zero2", 2), ("data=8", "dp", 2),
               ("data=2,fsdp=4", "zero3", 1)]


@pytest.mark.parametrize("mesh,strategy,m", BATCH_LOCAL, ids=[f"{a}-{b}-mb{c}" for a, b, c in BATCH_LOCAL])
def test_a_ratio_loss_equals_the_full_batch_value_on_the_batch_local_paths(mesh, strategy, m):
    ref, ref_metrics = _train(ratio_loss, single_device_mesh())
    got, metrics = _train(ratio_loss, mp.make_mesh(mesh), strategy, microbatches=m)
    assert got.explicit_zero == (strategy != "dp")
    assert not got.fallbacks or "up-front" in str(got.fallbacks[0])
    np.testing.assert_allclose([x["loss"] for x in metrics], [x["loss"] for x in ref_metrics],
                               rtol=LOSS_RTOL, atol=LOSS_ATOL)
    # The weight and the summed aux are the global token count, exactly.
    tokens = [float(encoder_batch(s)["mask"].sum()) for s in range(2)]
    assert [x["loss_weight"] for x in metrics] == tokens
    assert [x["aux"]["tokens"] for x in metrics] == tokens
    for a, b in zip(jax.tree.leaves(jax.device_get(got.flat_params())),
                    jax.tree.leaves(jax.device_get(ref.flat_params()))):
        np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL)


def test_a_plain_masked_ratio_is_a_mean_of_per_piece_ratios_as_documented():
    # Written as a plain scalar, the masked ratio is averaged over the 8 shards x 2 microbatches
    # of a batch-local run; as an mp.Ratio it is the full-batch value.
    _, plain = _train(plain_ratio_loss, mp.make_mesh("fsdp=8"), "zero3", microbatches=2, steps=1)
    _, ratio = _train(ratio_loss, mp.make_mesh("fsdp=8"), "zero3", microbatches=2, steps=1)
    batch = encoder_batch(0)
    rows = batch["mask"].sum(1)
    assert len(set(rows[::2].tolist())) > 1, "pieces must hold different token counts"
    assert abs(plain[0]["loss"] - ratio[0]["loss"]) > 1e-4 * ratio[0]["loss"]


def test_the_path_is_decided_at_construction_and_reported():
    mesh = mp.make_mesh("fsdp=8")
    plain = mp.Trainer(lambda: Tagger(nnx.Rngs(0)), optax.adam(1e-2), ratio_loss, mesh=mesh,
                       strategy="zero3")
    assert not plain.explicit_zero
    assert any(f.what == "ZeRO-3 collectives" and "not declared row-separable" in f.detail
               for f in plain.fallbacks), plain.fallbacks
    # Non-parameter state keeps a row-separable declaration global, and says which state.
    stateful = mp.Trainer(ZOO["encoder"].make, optax.adam(1e-2), ZOO["encoder"].loss, mesh=mesh,
                          strategy="zero3", config=mp.TrainConfig(row_separable=True))
    assert not stateful.explicit_zero
    (fallback,) = [f for f in stateful.fallbacks if f.what == "ZeRO-3 collectives"]
    assert "drop/rngs/key (RngKey)" in fallback.detail
    dp = mp.Trainer(ZOO["encoder"].make, optax.adam(1e-2), ZOO["encoder"].loss,
                    mesh=mp.make_mesh("data=8"), strategy="dp",
                    config=mp.TrainConfig(microbatches=2, row_separable=True))
    assert [f.what for f in dp.fallbacks] == ["gradient accumulation"]


# -- refused output and batches -------------------------------------------------------------


def _tagger(loss_fn, **config):
    return mp.Trainer(lambda: Tagger(nnx.Rngs(0)), optax.adam(1e-2), loss_fn,
                      mesh=mp.make_mesh("data=8"), strategy="dp", config=mp.TrainConfig(**config))


BAD_OUTPUTS = [
    (lambda m, b: _ce(m, b)[0], r"loss of shape \(16, 16\); expected a scalar"),
    (lambda m, b: (jnp.mean(_ce(m, b)[0]), {}, 1), r"a tuple of 3 values; expected loss or \(loss, aux\)"),
    (lambda m, b: (jnp.mean(_ce(m, b)[0]), {"note": "hello"}), r"aux \['note'\] of type str"),
    (lambda m, b: mp.Ratio(jnp.sum(_ce(m, b)[0]), b["mask"]), r"loss weight of shape \(16, 16\)"),
    (lambda m, b: mp.Summed(jnp.mean(_ce(m, b)[0])), r"a Summed loss; a loss is a scalar or a Ratio"),
    (lambda m, b: jnp.sum(b["mask"] > 0), r"loss of dtype (bool|int32); expected a float"),
]


@pytest.mark.parametrize("loss_fn,message", BAD_OUTPUTS)
def test_bad_loss_output_is_refused_naming_the_cause(loss_fn, message):
    trainer = _tagger(loss_fn)
    before = jax.device_get(trainer.state.params)
    with pytest.raises(StrategyError, match=message):
        trainer.step(encoder_batch(0))
    assert int(trainer.state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.state.params), before)


def test_an_all_padding_batch_is_a_non_finite_step_that_changes_nothing():
    trainer = _tagger(ratio_loss)
    batch = dict(encoder_batch(0), mask=np.zeros((16, SEQ), np.float32))
    before = jax.device_get(trainer.state.params)
    with pytest.raises(TrainingError, match=r"loss weight summed to 0\.0 over the global batch "
                                            r".*at step 0; the update was not applied"):
        trainer.step(batch)
    assert int(trainer.state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.state.params), before)
    skipping = _tagger(ratio_loss, on_nonfinite="skip")
    metrics = skipping.step(batch)
    assert metrics["skipped"] and metrics["loss_weight"] == 0.0
    assert int(skipping.state.step) == 0


BAD_BATCHES = [
    (lambda b: dict(b, scale=np.float32(2.0)), r"batch leaf \['scale'\] is a scalar"),
    (lambda b: dict(b, extra=np.zeros((8, 3), np.float32)),
     r"disagree on the batch size .*\['extra'\]: 8, \['mask'\]: 16"),
    (lambda b: dict(b, name=["a"] * 16), r"batch leaf \['name'\]"),
    (lambda b: {}, r"the batch is empty"),
]


@pytest.mark.parametrize("change,message", BAD_BATCHES)
def test_a_malformed_batch_is_refused_naming_the_key(change, message):
    trainer = _tagger(ratio_loss)
    with pytest.raises(StrategyError, match=message):
        trainer.step(change(encoder_batch(0)))
    assert int(trainer.state.step) == 0


# -- non-parameter state --------------------------------------------------------------------


class Sowing(Tagger):
    def __call__(self, tokens):
        h = self.embed(tokens)
        self.sow(nnx.Intermediate, "embedded", jnp.mean(h))
        return self.out(jax.nn.gelu(self.up(h)))


@pytest.mark.filterwarnings(r"ignore:Using .Module.sow\(\). outside:DeprecationWarning")
def test_sown_values_reach_the_loss_and_do_not_become_state():
    def loss_fn(model, batch):
        loss = plain_ratio_loss(model, batch)
        (embedded,) = nnx.pop(model, nnx.Intermediate)["embedded"].get_value()
        return loss, {"embedded": embedded}

    trainer = mp.Trainer(lambda: Sowing(nnx.Rngs(0)), optax.adam(1e-2), loss_fn,
                         mesh=mp.make_mesh("data=8"), strategy="dp")
    metrics = trainer.step(encoder_batch(0))
    assert np.isfinite(metrics["aux"]["embedded"])
    assert not jax.tree.leaves(trainer.state.rest)


class Growing(Tagger):
    def __call__(self, tokens):
        self.seen = nnx.BatchStat(jnp.zeros(()))   # a variable created during the call
        return super().__call__(tokens)


def test_state_created_during_the_loss_is_refused_naming_it():
    trainer = mp.Trainer(lambda: Growing(nnx.Rngs(0)), optax.adam(1e-2), plain_ratio_loss,
                         mesh=mp.make_mesh("data=8"), strategy="dp")
    with pytest.raises(StrategyError, match=r"new variables \['seen'\].*Create every variable in "
                                            r"the model's constructor"):
        trainer.step(encoder_batch(0))


def test_a_pipelined_stack_with_state_reports_its_automatic_batch_axes():
    # The convnet's stack holds batch statistics and dropout streams: its stages see the whole
    # microbatch (data automatic), and the report says what that costs. test_zoo.py trains it.
    trainer = mp.Trainer(ZOO["convnet"].make, optax.adam(1e-2), ZOO["convnet"].loss,
                         mesh=mp.make_mesh("pipe=2,data=4"), strategy="dp",
                         config=mp.TrainConfig(microbatches=2))
    assert trainer.pipeline.batch_axes == ()
    (fallback,) = [f for f in trainer.fallbacks if "pipeline batch axes" in str(f)]
    assert re.search(r"non-parameter state \(blocks/bn/mean \(BatchStat\).*data stay automatic "
                     r"inside the pipeline stages.*every backward iteration", str(fallback))
