"""``meshpar.parallel.zero``: ZeRO-2/3 gradients reduce-scattered by hand, and where GSPMD takes over."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import meshpar as mp
from meshpar.inspect.explain import explain_gpt
from meshpar.inspect.hlo import collectives
from meshpar.models import GPT, get_preset, lm_loss
from meshpar.parallel.layout import constrain
from meshpar.sharding.rules import Rules
from meshpar.sharding.strategy import Strategy
from meshpar.train.data import TokenBatches

CFG = get_preset("tiny")  # 2 layers, d_model 64: Ψ = 118016
PSI = CFG.param_count()
BATCH = TokenBatches(batch_size=16, seq_len=32, seed=0).batch(0)


def _trainer(mesh_text, strategy, *, microbatches=1, make=None, loss=lm_loss, example_batch=None,
             allocate=True):
    """``allocate=False`` for a test that only compiles the step: the abstract state lowers to
    the same program, without compiling the model's initialiser."""
    make = make or (lambda: GPT(CFG, rngs=nnx.Rngs(0)))
    mesh = mp.make_mesh(mesh_text) if isinstance(mesh_text, str) else mesh_text
    return mp.Trainer(make, optax.adamw(1e-3), loss, mesh=mesh,
                      strategy=strategy, config=mp.TrainConfig(microbatches=microbatches, row_separable=True),
                      example_batch=example_batch, allocate=allocate)


def _check(report, name):
    (row,) = [c for c in report["checks"] if c["name"] == name]
    return row


def test_zero3_with_tensor_parallel_sends_3psi_over_fsdp_and_gathers_nothing_over_tensor():
    # An explicit collective where `tensor` is automatic makes the partitioner replicate its
    # operand over `tensor` first; meshpar gathers in a nested shard_map manual over tensor.
    report = explain_gpt(CFG, mesh=mp.make_mesh("fsdp=4,tensor=2"), strategy="zero3",
                         batch_size=16, seq_len=32)
    ring = _check(report, "ring traffic over fsdp")  # 3 (N-1)/N G, G = the tensor-split bytes
    assert 0.9 < ring["ratio"] <= 1.0, ring
    kinds = set(report["measured"]["collectives"])
    assert "reduce-scatter@fsdp" in kinds
    assert not any(k.startswith("all-gather@tensor") for k in kinds), kinds
    # All-reduced over fsdp: only the MLP bias (its one dimension goes to tensor, so no rule
    # splits it over fsdp: [layers, mlp / tensor] fp32) and the loss/grad-norm scalars.
    bias_bytes = CFG.layers * CFG.mlp_dim // 2 * 4
    reduced = report["measured"]["collectives"]["all-reduce@fsdp"]["bytes_per_step"]
    assert bias_bytes <= reduced <= bias_bytes + 128


def test_zero2_reduce_scatters_every_microbatch_into_the_shard():
    trainer = _trainer("fsdp=8", "zero2", microbatches=2, allocate=False)
    assert trainer.explicit_zero
    ops = collectives(trainer.lower(BATCH).compile().as_text(), mesh=trainer.mesh)
    scatters = [op for op in ops if op.kind == "reduce-scatter"]
    assert scatters and all(op.in_loop and op.trip_count == 2 for op in scatters)
    # Each microbatch reduces every gradient once, into its shard (input = result x group).
    volume = sum(op.result_bytes * op.group_size * op.trip_count for op in scatters)
    assert volume == pytest.approx(2 * 4 * PSI, rel=0.001)
    # No parameter-sized all-reduce; the updated shards are all-gathered once.
    assert sum(op.result_bytes for op in ops if op.kind == "all-reduce") <= 128
    gathered = sum(op.result_bytes * op.trip_count for op in ops if op.kind == "all-gather")
    assert gathered == pytest.approx(4 * PSI, rel=0.001)


def test_explicit_collectives_give_gspmd_gradients():
    explicit = _trainer("data=2,fsdp=2,tensor=2", "zero3", microbatches=2)
    gspmd = _trainer("data=2,fsdp=2,tensor=2", "zero3", microbatches=2)
    gspmd._manual_zero = None  # the path a pipeline or an unusual rule takes
    assert explicit.explicit_zero and not gspmd.explicit_zero
    (loss_a, grads_a), (loss_b, grads_b) = explicit.loss_and_grads(BATCH), gspmd.loss_and_grads(BATCH)
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-7)
    ops = collectives(explicit.lower(BATCH).compile().as_text(), mesh=explicit.mesh)
    kinds = {(op.kind, op.mesh_axes) for op in ops}
    assert ("reduce-scatter", ("fsdp",)) in kinds
    # Over data, the fsdp shards are summed once, after the microbatch loop.
    over_data = [op for op in ops if op.kind == "all-reduce" and op.mesh_axes == ("data",)]
    assert over_data and not any(op.in_loop for op in over_data)


def test_a_rule_that_splits_one_dimension_over_fsdp_and_tensor_falls_back_to_gspmd():
    strategy = Strategy("zero3", zero_stage=3,
                        extra_param_rules=Rules.table([("mlp", ("fsdp", "tensor"))]))
    trainer = _trainer("fsdp=4,tensor=2", strategy)
    assert not trainer.explicit_zero
    assert np.isfinite(trainer.step(BATCH)["loss"])


class _OwnScan(nnx.Module):
    """A model that scans its stacked layers itself instead of through meshpar.scan_layers."""

    def __init__(self, rngs):
        init = nnx.initializers.normal(0.3)
        self.w = nnx.Param(init(rngs.params(), (3, 16, 16)), out_sharding=("layers", "embed", "mlp"))
        self.out = nnx.Param(init(rngs.params(), (16, 4)), out_sharding=("embed", None))

    def __call__(self, x):
        x = constrain(x, ("batch", "embed"))
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, self.w[...])
        return h @ self.out[...]


def _own_scan_loss(model, batch):
    return jnp.mean(jnp.square(model(batch["x"]) - batch["y"]))


def test_a_model_that_scans_its_own_stack_trains_under_zero3_through_gspmd():
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(16, 16)).astype(np.float32),
             "y": rng.normal(size=(16, 4)).astype(np.float32)}
    make = lambda: _OwnScan(nnx.Rngs(0))  # noqa: E731
    zero3 = _trainer("fsdp=8", "zero3", make=make, loss=_own_scan_loss)
    assert zero3.explicit_zero  # decided from the layout; the first trace finds out
    loss, grads = zero3.loss_and_grads(batch)
    assert not zero3.explicit_zero
    ref_loss, ref_grads = _trainer(mp.make_mesh(data=1, devices=jax.devices()[:1]), "dp", make=make, loss=_own_scan_loss).loss_and_grads(batch)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_given_an_example_batch_the_own_scan_fallback_is_decided_when_the_trainer_is_built():
    # The same model as above: with example_batch the step is traced at construction, so the
    # ZeRO fallback is listed (and warned about) before any step, and the first step does not
    # warn again.
    make = lambda: _OwnScan(nnx.Rngs(0))  # noqa: E731
    example = {"x": jax.ShapeDtypeStruct((16, 16), jnp.float32),
               "y": jax.ShapeDtypeStruct((16, 4), jnp.float32)}
    with pytest.warns(UserWarning, match="GSPMD gathers the parameters and reduces the gradients"):
        zero3 = _trainer("fsdp=8", "zero3", make=make, loss=_own_scan_loss, example_batch=example)
    assert not zero3.explicit_zero
    assert [f.what for f in zero3.fallbacks] == ["ZeRO-3 up-front gathers", "ZeRO-3 collectives"]
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(16, 16)).astype(np.float32),
             "y": rng.normal(size=(16, 4)).astype(np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(zero3.step(batch)["loss"])
    # A batch that cannot be split over the mesh is refused when the trainer is built.
    with pytest.raises(mp.StrategyError, match="12"):
        _trainer("fsdp=8", "zero3", make=make, loss=_own_scan_loss,
                 example_batch={"x": np.zeros((12, 16), np.float32),
                                "y": np.zeros((12, 4), np.float32)})


@pytest.mark.parametrize("mesh_text", ["data=8", "data=2,tensor=4"])
def test_grad_norm_metric_reads_each_device_share_and_equals_the_global_norm(mesh_text):
    # Under data=8 every gradient is replicated 8 ways and each device sums the squares of its
    # 1/8; under data=2,tensor=4 (2 ways) the leaves are read whole. Same number either way.
    trainer = _trainer(mesh_text, "auto")
    _, grads = trainer.loss_and_grads(BATCH)
    expected = float(optax.tree.norm(jax.tree.map(np.asarray, grads)))
    assert trainer.step(BATCH)["grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_bf16_zero3_next_to_a_size_one_automatic_axis_compiles_and_matches_gspmd():
    # XLA:CPU aborts on a bf16 reduce-scatter beside any automatic mesh axis, even of size 1;
    # meshpar's gathers run in a shard_map manual over those axes too.
    def make(m):
        return mp.Trainer(lambda: GPT(CFG, rngs=nnx.Rngs(0)), optax.adamw(1e-3), lm_loss,
                          mesh=mp.make_mesh("fsdp=8,tensor=1"), strategy="zero3",
                          config=mp.TrainConfig(precision="bf16", microbatches=m,
                                                 row_separable=True))
    explicit, gspmd = make(2), make(2)
    gspmd._manual_zero = None
    (loss_a, grads_a), (loss_b, grads_b) = explicit.loss_and_grads(BATCH), gspmd.loss_and_grads(BATCH)
    assert explicit.explicit_zero
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-3)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        # bf16 backward passes summed in different orders: agree to bf16 precision.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0.05, atol=2e-3)


def test_an_error_in_meshpars_own_gathers_surfaces_instead_of_a_silent_fallback(monkeypatch):
    # The fallback to GSPMD is for models that use a stacked shard outside scan_layers; a bug in
    # the up-front gathers (which run before the stack is reached, so the stack is "unused")
    # must not be mistaken for that and hidden.
    from meshpar.parallel import zero

    def broken(*args, **kwargs):
        raise RuntimeError("gather bug")

    # (The tiny preset's up-front leaves are small: gathered together, by _gather_all.)
    monkeypatch.setattr(zero, "_gather", broken)
    monkeypatch.setattr(zero, "_gather_all", broken)
    trainer = _trainer("fsdp=8", "zero3")
    with pytest.raises(RuntimeError, match="gather bug"):
        trainer.loss_and_grads(BATCH)
    assert trainer.explicit_zero


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_gathers_and_reduce_scatters_run_along_the_major_dimension(strategy):
    # A collective along a minor dimension makes XLA:CPU copy the whole operand (or result)
    # into a transposed layout, a layer's gradient per reduce-scatter; meshpar moves the split
    # dimension first instead (a shard-sized transpose XLA folds into the neighbouring dot).
    trainer = _trainer("fsdp=8", strategy, microbatches=2, allocate=False)
    assert trainer.explicit_zero
    text = trainer.lower(BATCH).compile().as_text()
    # meshpar's own collectives (JAX's all_gather / reduce_scatter primitives); ZeRO-2's gather
    # of the updated parameters after the optimizer step is GSPMD's, once per step.
    found = re.findall(r"= \S+ (all-gather|reduce-scatter)\(.*?dimensions=\{(\d+)\}"
                       r".*?op_name=\"[^\"]*/(?:all_gather|reduce_scatter)\"", text)
    kinds = {k for k, _ in found}
    assert "reduce-scatter" in kinds and (strategy == "zero2" or "all-gather" in kinds), found
    # The GPT splits w_out [mlp, embed] and wo [heads, head, embed] over fsdp on embed, the
    # last dimension: before this, their collectives ran along it.
    assert {d for _, d in found} == {"0"}, found
