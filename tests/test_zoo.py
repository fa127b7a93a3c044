"""Any Flax model, exactly: the model zoo trains like one device under every layout.

Each model of :mod:`helpers.zoo` (a CNN with BatchNorm and dropout, a transformer encoder with a
padding-masked ``mp.Ratio`` loss and dropout, an MoE block with a balance loss in aux, a Linen CNN
with ``batch_stats`` and dropout brought in by ``mp.from_linen``) trains 3
AdamW steps on 8 emulated devices under DP, ZeRO-1, ZeRO-2 with 2 microbatches, ZeRO-3, tensor
parallel, 3-D ``data x fsdp x tensor`` and, for the models with a layer stack, a pipeline
(the CNN's stack holds dropout streams and batch statistics). Each run is compared with the same
model trained on one device with the same microbatching (for a pipeline: the stack run once per
microbatch, as the pipeline runs it): the loss and aux of every step, every parameter, and every piece of
non-parameter state (BatchNorm running averages, RNG keys and counters) after the three steps.

The tolerances are test_equivalence.py's fp32 ones (see there for how they were calibrated):
the runs differ only in the order of fp32 reductions. Random draws (dropout masks) are equal
bitwise: JAX's threefry is partitionable, so the global mask is the same whatever the sharding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import meshpar as mp

from meshpar.mesh import make_mesh

from helpers.compare import mesh_axes, single_device_mesh
from helpers.zoo import ZOO, ConvNet, ZooModel
from test_annotations import SEQ as AXIS_SEQ
from test_annotations import VOCAB as AXIS_VOCAB
from test_annotations import AxisNamed
from test_annotations import loss_fn as axis_named_loss
from test_equivalence import LOSS_ATOL, LOSS_RTOL, PARAM_ATOL, PARAM_RTOL, PARAM_UPDATE_RTOL

STEPS = 3


def axis_named_batch(step: int, batch_size: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(400 + step)
    return {"ids": rng.integers(0, AXIS_VOCAB, (batch_size, AXIS_SEQ)),
            "labels": rng.integers(0, AXIS_VOCAB, (batch_size, AXIS_SEQ))}


# The zoo, plus a Gemma-shaped model annotated with mesh-axis names (test_annotations.py).
MODELS = {**ZOO, "axisnames": ZooModel("axisnames", lambda: AxisNamed(nnx.Rngs(0)),
                                       axis_named_loss, axis_named_batch, scanned=False)}
# Batch statistics: means and variances over <= 16 x 8 x 8 positions, reordered sums.
STATE_RTOL, STATE_ATOL = 1e-5, 1e-6


def _host(tree) -> dict[str, np.ndarray]:
    """``{path: host array}``; typed PRNG keys as their uint32 payload."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


@dataclasses.dataclass(frozen=True)
class Run:
    losses: tuple[float, ...]
    aux: tuple[dict, ...]
    params: dict
    rest: dict
    fallbacks: tuple[str, ...]


def train(model: str | ZooModel, mesh, strategy: str, config: mp.TrainConfig, *,
          tx: optax.GradientTransformation | None = None) -> Run:
    """3 steps of a zoo model (by name, or a :class:`ZooModel` from another test file) with
    ``tx`` (default: AdamW, learning rate 1e-2)."""
    zoo = MODELS[model] if isinstance(model, str) else model
    tx = optax.adamw(1e-2) if tx is None else tx
    trainer = mp.Trainer(zoo.make, tx, zoo.loss, mesh=mesh, strategy=strategy, config=config)
    metrics = [trainer.step(zoo.batch(s)) for s in range(STEPS)]
    assert not any(m["skipped"] for m in metrics)
    return Run(tuple(m["loss"] for m in metrics), tuple(m.get("aux", {}) for m in metrics),
               _host(trainer.flat_params()), _host(trainer.state.rest),
               tuple(str(f) for f in trainer.fallbacks))


@functools.cache
def reference(model: str, microbatches: int) -> Run:
    return train(model, single_device_mesh(), "dp", mp.TrainConfig(microbatches=microbatches))


@functools.cache
def stack_reference(model: str, microbatches: int) -> Run:
    """One device, the model's layer stack run once per microbatch (as a pipeline runs it)."""
    zoo = MODELS[model]
    if zoo.make_stack_microbatched is None:   # no state in the stack: the whole batch at once
        return reference(model, 1)
    per_microbatch = dataclasses.replace(zoo, make=lambda: zoo.make_stack_microbatched(microbatches))
    return train(per_microbatch, single_device_mesh(), "dp", mp.TrainConfig())


@functools.cache
def initial_params(model: str) -> dict:
    from flax import nnx
    with nnx.use_eager_sharding(False):
        return _host(nnx.state(MODELS[model].make(), nnx.Param))


LAYOUTS = {
    # name: (mesh, strategy, microbatches)
    "dp": ("data=8", "dp", 1),
    "zero1": ("fsdp=8", "zero1", 1),
    "zero2-mb2": ("fsdp=8", "zero2", 2),
    "zero3": ("fsdp=8", "zero3", 1),
    "tp": ("data=4,tensor=2", "tp", 1),
    "3d": ("data=2,fsdp=2,tensor=2", "zero3", 1),
}
CASES = [(m, layout) for m in MODELS for layout in LAYOUTS]
CASES += [(m, "pipe") for m, zoo in MODELS.items() if zoo.scanned]


def assert_runs_match(got: Run, ref: Run, init: dict, *, state_atol_of_scale: float = 0.0) -> None:
    np.testing.assert_allclose(got.losses, ref.losses, rtol=LOSS_RTOL, atol=LOSS_ATOL,
                               err_msg="step losses")
    for step, (a, b) in enumerate(zip(got.aux, ref.aux)):
        assert a.keys() == b.keys()
        for key in b:
            np.testing.assert_allclose(a[key], b[key], rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                       err_msg=f"aux {key!r} of step {step}")
    assert got.params.keys() == ref.params.keys()
    for key, r in ref.params.items():
        p = got.params[key]
        np.testing.assert_allclose(p, r, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=f"param {key}")
        moved = np.linalg.norm(r - init[key])
        if moved > 0:
            assert np.linalg.norm(p - r) <= PARAM_UPDATE_RTOL * moved, f"update of {key}"
    assert got.rest.keys() == ref.rest.keys()
    for key, r in ref.rest.items():
        if r.dtype.kind in "ui":   # RNG keys and counters: bitwise
            np.testing.assert_array_equal(got.rest[key], r, err_msg=f"state {key}")
        else:
            atol = max(STATE_ATOL, state_atol_of_scale * float(np.max(np.abs(r))))
            np.testing.assert_allclose(got.rest[key], r, rtol=STATE_RTOL, atol=atol,
                                       err_msg=f"state {key}")


@pytest.mark.parametrize("model,layout", CASES, ids=[f"{m}-{layout}" for m, layout in CASES])
def test_zoo_model_trains_like_one_device(model, layout):
    if layout == "pipe":
        mesh, strategy, config = "pipe=2,data=4", "dp", mp.TrainConfig(microbatches=2)
        ref = stack_reference(model, 2)
    else:
        mesh, strategy, m = LAYOUTS[layout]
        config = mp.TrainConfig(microbatches=m)
        ref = reference(model, m)
    got = train(model, make_mesh(dict(mesh_axes(mesh))), strategy, config)
    assert_runs_match(got, ref, initial_params(model))
    # The state really changes and the aux is really there: a vacuous comparison would not.
    assert got.aux[0] or model not in ZOO, "the aux values came back"
    if model in ("convnet", "linen"):
        before = initial_rest(model)
        changed = {k for k, v in got.rest.items() if not np.array_equal(v, before[k])}
        assert any("mean" in k for k in changed) and any("count" in k for k in changed), changed


CONVNET4 = ZooModel("convnet4", lambda: ConvNet(nnx.Rngs(0, dropout=1), layers=4),
                    ZOO["convnet"].loss, ZOO["convnet"].batch, scanned=True)


@pytest.mark.parametrize("mesh,strategy,schedule,repeats,pipeline_remat", [
    ("pipe=2,data=2,tensor=2", "auto", "circular", 2, None),
    ("pipe=2,fsdp=4", "zero3", "1f1b", 1, None),
    ("pipe=2,data=2,tensor=2", "auto", "interleaved-1f1b", 2, True),
])
def test_batch_statistics_and_dropout_in_every_pipeline_schedule(mesh, strategy, schedule,
                                                                  repeats, pipeline_remat):
    # 4 layers on pipe=2 (one or two chunks per stage), 4 microbatches: each chunk's state is
    # carried through the loop and advanced once per microbatch, in order; 1F1B's backward loop
    # applies the residuals of each chunk's forward tick (1f1b: the default) or reruns the chunk
    # with the state its forward saw (interleaved here: pipeline_remat=True) -- the same
    # dropout mask either way.
    config = mp.TrainConfig(microbatches=4, schedule=schedule, repeats=repeats,
                            pipeline_remat=pipeline_remat)
    got = train(CONVNET4, make_mesh(dict(mesh_axes(mesh))), strategy, config)
    ref = convnet4_reference()
    with nnx.use_eager_sharding(False):
        init = _host(nnx.state(CONVNET4.make(), nnx.Param))
    # Batch statistics are means of fp32 sums over each microbatch's 4 x 8 x 8 positions; a
    # mean near zero (0.004 next to entries of 0.4) loses digits to cancellation, so the float
    # state is compared at an absolute tolerance relative to each array's scale.
    assert_runs_match(got, ref, init, state_atol_of_scale=1e-5)
    assert got.rest["['blocks']['drop']['rngs']['count'].value"].tolist() == [12] * 4  # 3 steps x 4


@functools.cache
def convnet4_reference() -> Run:
    per_microbatch = dataclasses.replace(CONVNET4, make=lambda: ConvNet(
        nnx.Rngs(0, dropout=1), layers=4, stack_microbatches=4))
    return train(per_microbatch, single_device_mesh(), "dp", mp.TrainConfig())


@functools.cache
def initial_rest(model: str) -> dict:
    from flax import nnx
    with nnx.use_eager_sharding(False):
        return _host(nnx.state(MODELS[model].make(), nnx.Not(nnx.Param)))


class ThreeLayers(nnx.Module):
    """The smallest model that met the XLA:CPU miscompile GatherAtUse steers clear of."""

    def __init__(self, rngs: nnx.Rngs):
        p = lambda *axes: nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)  # noqa: E731
        self.a = nnx.Linear(4, 16, use_bias=False, kernel_init=p(None, None), rngs=rngs)
        self.b = nnx.Linear(16, 16, use_bias=False, kernel_init=p(None, "mlp"), rngs=rngs)
        self.c = nnx.Linear(16, 8, use_bias=False, kernel_init=p("embed", "vocab"), rngs=rngs)

    def __call__(self, x):
        return self.c(self.b(self.a(x)))


def test_zero3_on_gspmd_gives_exact_gradients_on_a_3d_mesh():
    # The batch split over data x fsdp and c split over fsdp x tensor: used as stored, XLA:CPU
    # (jax 0.10.2, Shardy) returned the gradients of a and b off by ~100% on data=2,fsdp=2,
    # tensor=2 (no other 8-device mesh). meshpar constrains c to its gathered layout at use.
    def loss(model, batch):
        return jnp.mean(model(batch["x"]) ** 2)

    batch = {"x": np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)}
    make = lambda: ThreeLayers(nnx.Rngs(0))  # noqa: E731
    ref = mp.Trainer(make, optax.sgd(0.1), loss, mesh=single_device_mesh(), strategy="dp")
    got = mp.Trainer(make, optax.sgd(0.1), loss, mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                     strategy="zero3")
    assert not got.explicit_zero and got._gather_at_use is not None
    (_, g_ref), (_, g) = ref.loss_and_grads(batch), got.loss_and_grads(batch)
    for a, b in zip(jax.tree.leaves(jax.device_get(g)), jax.tree.leaves(jax.device_get(g_ref))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b))))
