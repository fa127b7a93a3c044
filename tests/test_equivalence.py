"""The equivalence matrix: every strategy, mesh and microbatch count trains like one device.

Each case builds a :class:`~meshpar.train.Trainer` on the 8 emulated devices and compares it with
a single-device reference (strategy ``dp`` on a 1-device ``data=1`` mesh, one microbatch) built
from the same model factory, seed, optimizer and global batches:

1. ``loss_and_grads`` at init: the loss and every gradient leaf;
2. the losses of three ``step()`` calls on three different batches;
3. every parameter after those three steps.

Two models take part: meshpar's built-in GPT (``tiny``: scanned, remat'd, tied embeddings) and
:class:`MixerClassifier`, a differently shaped NNX model defined here (a python list of un-stacked
blocks, token mixing, a heads projection, a classifier head over ``vocab``, its own loss on
float features and integer labels). References are computed once per (model, precision) and
cached, as are the case results. Any two meshes agree with each other to within twice the loss
tolerance, since each agrees with the same reference (no separate pairwise run: under
pytest-xdist it re-ran every case on the other worker, 2 minutes).

Run ``python tests/test_equivalence.py`` to print the largest deviation seen per case.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from meshpar.errors import StrategyError, TrainingError
from meshpar.mesh import make_mesh
from meshpar.models import GPT, get_preset, lm_loss
from meshpar.parallel.layout import constrain
from meshpar.sharding.strategy import Strategy, get_strategy
from meshpar.train import TrainConfig, Trainer
from meshpar.train.data import TokenBatches

from helpers.compare import (assert_losses_and_grads_match, deviations, flat, init_params,
                             mesh_axes, paired, rel_norm, run_steps, single_device_mesh)

# -- tolerances -----------------------------------------------------------------------------------
#
# One set of tolerances per precision, chosen once; never loosened per case.
#
# fp32. The sharded and the single-device programs compute the same math; they differ only in the
# order of fp32 reductions (per-shard partial sums then an all-reduce, microbatch accumulation,
# fusion choices for other shard shapes). Reordering a sum of n terms moves it by about
# sqrt(n) * eps32 (eps32 = 1.2e-7) of the terms' magnitude, n * eps32 at worst.
#
# * Loss: a mean over 16 x 32 tokens of a log-softmax over 256 logits at the end of chains of
#   matmuls no wider than 256: ~1e-6 relative (seen: <= 4e-7). rtol 2e-5 leaves 50x headroom.
LOSS_RTOL, LOSS_ATOL = 2e-5, 2e-6
# * Gradients: the longest reductions are over the 512 tokens of the batch times <= 256
#   contracted entries: sqrt(512 * 256) * eps32 ~ 4e-5 of the terms' scale, and the terms are
#   bounded by the leaf's largest entry. Leaves whose entries nearly cancel (LayerNorm biases,
#   attention q/k at init) have tiny entries next to large ones, so an elementwise rtol alone would
#   be meaningless for them: the absolute tolerance is scaled by the leaf's largest reference
#   magnitude, |g - g_ref| <= GRAD_RTOL * |g_ref| + GRAD_ATOL_FRAC * max|g_ref| (seen: <= 9e-7 of
#   the leaf max). Plus, per leaf, ||g - g_ref|| <= GRAD_NORM_RTOL * ||g_ref|| (seen: <= 8e-7).
GRAD_RTOL, GRAD_ATOL_FRAC, GRAD_NORM_RTOL = 2e-5, 2e-5, 1e-5
# * Parameters after 3 AdamW steps (lr 1e-2; every parameter moves by ~1e-2 per step). Adam's
#   first update of an entry, lr * g / (|g| + eps), has slope lr / eps = 1e6 at g ~ 0: the few
#   entries (of ~120k) whose gradient is within a few eps = 1e-8 of zero turn fp32 gradient noise
#   of ~1e-12 into parameter deviations of ~1e-6..1e-5 (seen: <= 9.2e-6, always at entries with
#   |g_ref| <= 1e-7). PARAM_ATOL = 5e-5 = 5e-3 * lr bounds that with 5x headroom, still 600x below
#   one step's movement. Plus, per leaf, ||p - p_ref|| <= PARAM_UPDATE_RTOL * ||p_ref - p_init||:
#   the trained update itself agrees (seen: <= 6e-6). Initial parameters are equal bitwise
#   (threefry is partitionable: a sharded init draws the same numbers).
PARAM_RTOL, PARAM_ATOL, PARAM_UPDATE_RTOL = 1e-5, 5e-5, 1e-4

# bf16 compute (fp32 master parameters, gradients and optimizer state), bf16 on BOTH sides. The
# cotangents are bf16 until the cast back to the fp32 parameters, so every reduction inside the
# backward pass (a bias gradient is a bf16 sum over the 512 tokens) and the data-parallel /
# tensor-parallel all-reduces round to 8 mantissa bits (eps 7.8e-3) at points that depend on the
# sharding. The sharded run is as far from the single-device bf16 run as the latter is from fp32
# (seen: both 2.8e-2 in norm for the bias gradients). Elementwise checks would be vacuous here (a
# near-zero gradient may change sign, moving one entry by 2 lr per step), so bf16 uses norms:
# * loss: 1e-3 relative (seen: <= 7e-5; the loss averages the per-token errors out);
# * gradients: per leaf ||g - g_ref|| <= 0.1 ||g_ref|| (seen: <= 2.8e-2);
# * parameters: per leaf ||p - p_ref|| <= 0.25 ||p_ref - p_init|| (seen: <= 0.10, ln2_scale).
# Real bugs (a missing or doubled reduction, a shard not updated) are O(1) on these measures.
BF16_LOSS_RTOL, BF16_LOSS_ATOL = 1e-3, 1e-4
BF16_GRAD_NORM_RTOL, BF16_PARAM_UPDATE_RTOL = 1e-1, 2.5e-1

TOLERANCES = {
    "fp32": dict(loss=(LOSS_RTOL, LOSS_ATOL), grad_elem=(GRAD_RTOL, GRAD_ATOL_FRAC),
                 grad_norm=GRAD_NORM_RTOL, param_elem=(PARAM_RTOL, PARAM_ATOL),
                 param_update=PARAM_UPDATE_RTOL),
    "bf16": dict(loss=(BF16_LOSS_RTOL, BF16_LOSS_ATOL), grad_elem=None,
                 grad_norm=BF16_GRAD_NORM_RTOL, param_elem=None,
                 param_update=BF16_PARAM_UPDATE_RTOL),
}

LR = 1e-2
GLOBAL_BATCH = 16
STEPS = 3
SEED = 0


def make_tx() -> optax.GradientTransformation:
    return optax.adamw(LR)


# -- the models -------------------------------------------------------------------------------


GPT_CONFIG = get_preset("tiny")  # d_model 64, heads 4, mlp 256, vocab 256, seq 32, 2 layers, remat


def make_gpt() -> GPT:
    return GPT(GPT_CONFIG, rngs=nnx.Rngs(SEED))


# MixerClassifier sizes: 8 tokens of 12 features -> width 32 -> 2 blocks -> 16 classes.
MIX_T, MIX_F, MIX_D, MIX_H, MIX_K, MIX_M, MIX_C = 8, 12, 32, 4, 8, 128, 16


def _param(rngs: nnx.Rngs | None, shape, names, std: float = 0.1, value: float | None = None):
    if value is not None:
        array = jnp.full(shape, value, jnp.float32)
    else:
        array = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(array, out_sharding=names)


class MixerBlock(nnx.Module):
    """Token mixing (replicated ``T x T``), a per-head projection and a channel MLP."""

    def __init__(self, rngs: nnx.Rngs):
        self.norm_scale = _param(None, (MIX_D,), ("embed",), value=1.0)
        self.token_mix = _param(rngs, (MIX_T, MIX_T), (None, None), std=0.3)
        self.w_heads = _param(rngs, (MIX_D, MIX_H, MIX_K), ("embed", "heads", None))
        self.w_merge = _param(rngs, (MIX_H, MIX_K, MIX_D), ("heads", None, "embed"))
        self.w_up = _param(rngs, (MIX_D, MIX_M), ("embed", "mlp"))
        self.b_up = _param(None, (MIX_M,), ("mlp",), value=0.01)
        self.w_down = _param(rngs, (MIX_M, MIX_D), ("mlp", "embed"))

    def __call__(self, x):  # x: [B, T, D]
        x = constrain(x, ("batch", None, "embed"))
        scale = constrain(self.norm_scale[...], ("embed",))
        h = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6) * scale
        h = jnp.einsum("ts,bsd->btd", self.token_mix[...], h)
        # Weights constrained to their compute layout (the ZeRO-3 gather) for the head matmuls;
        # the MLP weights are left to the partitioner, so both paths are exercised.
        heads = jnp.einsum("btd,dhk->bthk", h, constrain(self.w_heads[...], ("embed", "heads", None)))
        heads = constrain(jnp.tanh(heads), ("batch", None, "heads", None))
        x = x + constrain(
            jnp.einsum("bthk,hkd->btd", heads, constrain(self.w_merge[...], ("heads", None, "embed"))),
            ("batch", None, "embed"),
        )
        up = constrain(jax.nn.relu(x @ self.w_up[...] + self.b_up[...]), ("batch", None, "mlp"))
        return constrain(x + up @ self.w_down[...], ("batch", None, "embed"))


class MixerClassifier(nnx.Module):
    """Features ``[B, T, F]`` -> class logits ``[B, C]`` over the logical ``vocab`` axis."""

    def __init__(self, rngs: nnx.Rngs):
        self.w_in = _param(rngs, (MIX_F, MIX_D), (None, "embed"), std=0.3)
        self.blocks = nnx.List([MixerBlock(rngs) for _ in range(2)])
        self.w_cls = _param(rngs, (MIX_D, MIX_C), ("embed", "vocab"))
        self.b_cls = _param(None, (MIX_C,), ("vocab",), value=0.0)

    def __call__(self, x):
        h = constrain(jnp.asarray(x, self.w_in.dtype) @ self.w_in[...], ("batch", None, "embed"))
        for block in self.blocks:
            h = block(h)
        pooled = constrain(h.mean(axis=1), ("batch", "embed"))
        logits = pooled @ constrain(self.w_cls[...], ("embed", "vocab")) + self.b_cls[...]
        return constrain(logits.astype(jnp.float32), ("batch", "vocab"))


def make_mixer() -> MixerClassifier:
    return MixerClassifier(nnx.Rngs(SEED))


def mixer_loss(model: nnx.Module, batch) -> jax.Array:
    """Cross-entropy on random labels plus a small regression term on the logits' mean."""
    logits = model(batch["x"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return ce + 0.1 * jnp.mean(jnp.square(logits.mean(-1) - batch["target"]))


def mixer_batch(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((SEED, step))
    return {
        "x": rng.normal(size=(GLOBAL_BATCH, MIX_T, MIX_F)).astype(np.float32),
        "y": rng.integers(0, MIX_C, size=(GLOBAL_BATCH,)).astype(np.int32),
        "target": rng.normal(size=(GLOBAL_BATCH,)).astype(np.float32),
    }


_GPT_DATA = TokenBatches(batch_size=GLOBAL_BATCH, seq_len=GPT_CONFIG.seq_len, seed=SEED)

MODELS = {
    "gpt": (make_gpt, lm_loss, _GPT_DATA.batch),
    "mixer": (make_mixer, mixer_loss, mixer_batch),
}


# -- the matrix -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    strategy: str
    mesh: tuple[tuple[str, int], ...]
    microbatches: int = 1
    precision: str = "fp32"
    zero_stage: int | None = None  # override of the preset's stage

    @property
    def id(self) -> str:
        name = self.strategy + (f"+zero{self.zero_stage}" if self.zero_stage is not None else "")
        mesh = ",".join(f"{a}{n}" for a, n in self.mesh)
        return f"{self.model}-{name}-{mesh}-m{self.microbatches}-{self.precision}"

    def strategy_value(self) -> Strategy:
        return get_strategy(self.strategy, zero_stage=self.zero_stage)


def _case(model, strategy, mesh: str, m=1, precision="fp32", zero_stage=None) -> Case:
    return Case(model, strategy, mesh_axes(mesh), m, precision, zero_stage)


CASES = [
    # GPT: every preset, 1-D meshes
    _case("gpt", "dp", "data=8"),
    _case("gpt", "dp", "data=8", m=2),
    _case("gpt", "zero1", "fsdp=8"),
    _case("gpt", "zero2", "fsdp=8", m=2),
    _case("gpt", "zero3", "fsdp=8"),
    # GPT: 2-D and 3-D meshes
    _case("gpt", "zero3", "data=2,fsdp=4", m=2),
    _case("gpt", "zero1", "data=2,fsdp=4", m=2),
    _case("gpt", "tp", "data=2,tensor=4"),
    _case("gpt", "tp", "data=4,tensor=2", m=2),
    _case("gpt", "tp_sp", "fsdp=2,tensor=4"),
    _case("gpt", "tp_sp", "data=2,tensor=4", m=2),
    _case("gpt", "zero2", "fsdp=4,tensor=2", m=4),
    _case("gpt", "auto", "data=2,fsdp=2,tensor=2"),
    _case("gpt", "tp_sp", "data=2,fsdp=2,tensor=2", m=2, zero_stage=3),
    # GPT: mixed precision, against the single-device bf16 reference
    _case("gpt", "auto", "data=2,fsdp=2,tensor=2", m=2, precision="bf16"),
    # The mixer classifier: a representative subset
    _case("mixer", "dp", "data=8"),
    _case("mixer", "zero2", "fsdp=8", m=2),
    _case("mixer", "zero3", "data=2,fsdp=4"),
    _case("mixer", "tp", "data=2,tensor=4", m=2),
    _case("mixer", "auto", "data=2,fsdp=2,tensor=2", m=2),
    _case("mixer", "tp_sp", "data=2,fsdp=2,tensor=2", zero_stage=3),
]


# -- running ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    init_loss: float
    init_grads: dict[str, np.ndarray]
    losses: list[float]
    params: dict[str, np.ndarray]
    sharded: tuple[str, ...]  # parameters that the strategy actually split over devices


def train(model: str, *, mesh, strategy, config: TrainConfig) -> Result:
    make_model, loss_fn, batch_of = MODELS[model]
    trainer = Trainer(make_model, make_tx(), loss_fn, mesh=mesh, strategy=strategy, config=config)
    init_loss, init_grads, losses = run_steps(trainer, batch_of, STEPS)
    sharded = tuple(e.path for e in trainer.plan.entries if e.bytes_per_device < e.bytes_total)
    return Result(init_loss, init_grads, losses, flat(trainer.state.params), sharded)


@functools.cache
def reference(model: str, precision: str) -> Result:
    return train(model, mesh=single_device_mesh(), strategy="dp",
                 config=TrainConfig(precision=precision))


@functools.cache
def run_case(case: Case) -> Result:
    mesh = make_mesh(dict(case.mesh))
    config = TrainConfig(microbatches=case.microbatches, precision=case.precision,
                         row_separable=True)
    return train(case.model, mesh=mesh, strategy=case.strategy_value(), config=config)


def assert_matches(got: Result, ref: Result, init: dict[str, np.ndarray], precision: str) -> None:
    tol = TOLERANCES[precision]
    assert_losses_and_grads_match(got, ref, loss=tol["loss"], grad_elem=tol["grad_elem"],
                                  grad_norm=tol["grad_norm"])
    for key, p, p_ref in paired(got.params, ref.params):
        if tol["param_elem"] is not None:
            rtol, atol = tol["param_elem"]
            np.testing.assert_allclose(p, p_ref, rtol=rtol, atol=atol,
                                       err_msg=f"parameter {key} after {STEPS} steps")
        assert rel_norm(p, p_ref, p_ref - init[key]) <= tol["param_update"], (
            f"parameter {key} after {STEPS} steps (deviation relative to the update)")


@functools.cache
def reference_init_params(model: str) -> dict[str, np.ndarray]:
    return init_params(MODELS[model][0])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_single_device(case):
    got = run_case(case)
    ref = reference(case.model, case.precision)
    init = reference_init_params(case.model)
    # Every parameter leaf actually moved (by about lr per step), or the check would prove nothing.
    for key, p in ref.params.items():
        assert np.max(np.abs(p - init[key])) > LR, key
    # Parameters are split (ZeRO-3 or TP) exactly when the strategy says so: the case really runs
    # sharded weights, and the models' logical names are the ones the strategies know.
    shards_weights = case.strategy_value().zero_stage >= 3 and "fsdp" in dict(case.mesh)
    shards_weights |= "tensor" in dict(case.mesh)
    assert bool(got.sharded) == shards_weights, got.sharded
    assert_matches(got, ref, init, case.precision)


def test_reference_is_sane():
    """The reference run learns something: the GPT loss starts near ln 256 and drops."""
    ref = reference("gpt", "fp32")
    assert abs(ref.init_loss - math.log(256)) < 0.1
    assert ref.losses[0] == pytest.approx(ref.init_loss, rel=1e-6)  # same batch, same params
    assert ref.losses[-1] < ref.losses[0] - 0.1


# -- offload ----------------------------------------------------------------------------------


def test_offloaded_optimizer_gives_the_same_losses():
    """``offload_optimizer=True`` trains like the same run without offload.

    On CPU only the plumbing (the state is placed in ``pinned_host`` memory, moved to the device
    for the update and back) and the numerics can be checked; XLA lowers memory placement for TPU
    and GPU only.
    """
    case = _case("mixer", "zero2", "fsdp=8", m=2)
    assert case in CASES  # the run without offload is cached
    base = run_case(case)
    make_model, loss_fn, batch_of = MODELS["mixer"]
    trainer = Trainer(make_model, make_tx(), loss_fn, mesh=make_mesh(fsdp=8), strategy="zero2",
                      config=TrainConfig(microbatches=2, offload_optimizer=True))
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(trainer.state.opt_state)}
    assert kinds == {"pinned_host"}
    losses = [trainer.step(batch_of(s))["loss"] for s in range(STEPS)]
    assert {x.sharding.memory_kind for x in jax.tree.leaves(trainer.state.opt_state)} == kinds
    np.testing.assert_allclose(losses, base.losses, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    for key, p in flat(trainer.state.params).items():
        np.testing.assert_allclose(p, base.params[key], rtol=PARAM_RTOL, atol=PARAM_ATOL)


# -- bad inputs -------------------------------------------------------------------------------


@functools.cache
def _mesh8(**axes) -> Any:
    return make_mesh(**axes)


def _mixer_trainer(mesh=None, strategy="dp", **config) -> Trainer:
    return Trainer(make_mixer, make_tx(), mixer_loss, mesh=mesh or _mesh8(data=8),
                   strategy=strategy, config=TrainConfig(**config))


@pytest.mark.parametrize(
    "axes, microbatches, rows, pattern",
    [
        (dict(data=8), 1, 12, r"global batch size 12 is not divisible by the batch-sharding axes "
                              r"\(data=8\) times microbatches=1 = 8; use a batch size that is a "
                              r"multiple of 8"),
        (dict(data=2, fsdp=4), 4, 16, r"global batch size 16 is not divisible by the "
                                      r"batch-sharding axes \(data=2 x fsdp=4\) times "
                                      r"microbatches=4 = 32"),
        (dict(data=2, tensor=4), 3, 16, r"\(data=2\) times microbatches=3 = 6"),
    ],
    ids=["data8-rows12", "data2xfsdp4-m4", "data2-tensor4-m3"],
)
def test_batch_not_divisible_by_batch_axes_times_microbatches(axes, microbatches, rows, pattern):
    strategy = "zero1" if "fsdp" in axes else "dp"
    trainer = _mixer_trainer(_mesh8(**axes), strategy, microbatches=microbatches)
    batch = {k: v[:rows] for k, v in mixer_batch(0).items()}
    for call in (trainer.step, trainer.loss_and_grads):
        with pytest.raises(StrategyError, match=pattern):
            call(batch)
    assert int(trainer.state.step) == 0


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: get_strategy("zero4"), r"unknown strategy 'zero4'; presets are auto, dp, zero1"),
        (lambda: get_strategy("dp", zero_stage=4), r"unknown ZeRO stage 4; stages are 0, 1, 2 and 3"),
        (lambda: get_strategy(3), r"strategy must be a preset name or a Strategy, got 3"),
        (lambda: Strategy(zero_stage=5), r"zero_stage=5; ZeRO stages are 0, 1, 2 and 3"),
        (lambda: TrainConfig(microbatches=0), r"microbatches=0; expected an int >= 1"),
        (lambda: TrainConfig(microbatches=2.0), r"microbatches=2.0; expected an int >= 1"),
        (lambda: TrainConfig(precision="fp16"), r"precision='fp16'; expected 'fp32' or 'bf16'"),
        (lambda: TrainConfig(on_nonfinite="ignore"),
         r"on_nonfinite='ignore'; expected 'raise' or 'skip'"),
        (lambda: _mixer_trainer(_mesh8(data=8), "zero3"),
         r"strategy 'zero3' needs a 'fsdp' mesh axis, but the mesh has \{'data': 8\}"),
        (lambda: _mixer_trainer(_mesh8(data=8), "tp_sp"), r"strategy 'tp_sp' needs a 'tensor'"),
    ],
    ids=["unknown-preset", "unknown-zero-stage", "not-a-strategy", "strategy-bad-stage",
         "microbatches-0", "microbatches-float", "precision", "on-nonfinite", "zero3-without-fsdp",
         "tp_sp-without-tensor"],
)
def test_bad_configuration_raises(call, pattern):
    with pytest.raises(StrategyError, match=pattern):
        call()


# bool is a subclass of int; a True must not pass as 1 (or as ZeRO stage 1).
@pytest.mark.parametrize(
    "call", [lambda: TrainConfig(microbatches=True), lambda: get_strategy("dp", zero_stage=True),
             lambda: Strategy(zero_stage=True)],
    ids=["microbatches-True", "get_strategy-zero_stage-True", "Strategy-zero_stage-True"],
)
def test_bool_is_not_an_int(call):
    with pytest.raises(StrategyError):
        call()


def _poisonable_loss(model, batch):
    """``mixer_loss``, but NaN when any row of the batch has its ``poison`` flag set."""
    loss = mixer_loss(model, batch)
    return jnp.where(jnp.max(batch["poison"]) > 0, jnp.nan, loss)


def _poison_batch(step: int, poison: bool) -> dict[str, np.ndarray]:
    batch = mixer_batch(step)
    batch["poison"] = np.zeros((GLOBAL_BATCH,), np.float32)
    if poison:
        batch["poison"][5] = 1.0
    return batch


def _snapshot(trainer: Trainer) -> dict[str, np.ndarray]:
    return flat({"step": trainer.state.step, "params": trainer.state.params,
                 "rest": trainer.state.rest, "opt": trainer.state.opt_state})


def _assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key, strict=True)


@pytest.fixture(scope="module")
def poison_mesh():
    return _mesh8(data=2, fsdp=4)


def test_nan_loss_raises_naming_the_step_and_leaves_the_state_unchanged(poison_mesh):
    trainer = Trainer(make_mixer, make_tx(), _poisonable_loss, mesh=poison_mesh, strategy="zero3",
                      config=TrainConfig(microbatches=2))
    trainer.step(_poison_batch(0, poison=False))
    before = _snapshot(trainer)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 1; the update was "
                                            r"not applied"):
        trainer.step(_poison_batch(1, poison=True))
    _assert_bitwise_equal(_snapshot(trainer), before)
    # The state is usable (not a donated, deleted buffer) and training goes on from step 1.
    metrics = trainer.step(_poison_batch(1, poison=False))
    assert np.isfinite(metrics["loss"]) and not metrics["skipped"]
    assert int(trainer.state.step) == 2


def test_nan_loss_with_skip_drops_the_update(poison_mesh):
    trainer = Trainer(make_mixer, make_tx(), _poisonable_loss, mesh=poison_mesh, strategy="zero2",
                      config=TrainConfig(on_nonfinite="skip"))
    trainer.step(_poison_batch(0, poison=False))
    before = _snapshot(trainer)
    metrics = trainer.step(_poison_batch(1, poison=True))
    assert metrics["skipped"] is True and math.isnan(metrics["loss"])
    assert int(trainer.state.step) == 1
    _assert_bitwise_equal(_snapshot(trainer), before)
    metrics = trainer.step(_poison_batch(1, poison=False))
    assert metrics["skipped"] is False and int(trainer.state.step) == 2


def _unplaceable_tx() -> optax.GradientTransformation:
    """An optimizer whose state holds an array shaped like no parameter."""

    def init(params):
        return {"mystery": jnp.zeros((3, 5))}

    def update(updates, state, params=None):
        return updates, state

    return optax.GradientTransformation(init, update)


def test_optimizer_state_that_mirrors_no_parameter():
    with pytest.raises(StrategyError, match=r"optimizer state leaf \['mystery'\] with shape "
                                            r"\(3, 5\) mirrors no parameter"):
        Trainer(make_mixer, _unplaceable_tx(), mixer_loss, mesh=_mesh8(fsdp=8), strategy="zero1")


# -- printing the deviations ------------------------------------------------------------------


def main() -> None:
    """Print the largest deviation per case (``python tests/test_equivalence.py [REGEX]``)."""
    pattern = re.compile(sys.argv[1] if len(sys.argv) > 1 else "")
    names = ("init loss", "step loss", "grad/max", "grad nrm", "param abs", "param/upd")
    print(f"{'case':48s} " + " ".join(f"{n:>9s}" for n in names))
    for case in CASES:
        if not pattern.search(case.id):
            continue
        dev = deviations(run_case(case), reference(case.model, case.precision),
                         reference_init_params(case.model))
        print(f"{case.id:48s} " + " ".join(f"{v:9.1e}" for v in dev.values()), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import conftest  # noqa: F401  (8 emulated devices and the compile cache)

    main()
