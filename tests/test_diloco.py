"""DiLoCo over a ``diloco`` mesh axis (:mod:`meshpar.train.diloco`).

* H = 1 with outer SGD (lr 1, no momentum) is data parallelism: against a one-device Trainer, on
  the tiny GPT (replica groups sharded ZeRO-3 x TP) and on a plain MLP.
* Streaming DiLoCo with Adam inside and Nesterov outside matches a hand-written DiLoCo loop.
* The compiled programs: no collective over ``diloco`` in the inner step; one reduction of the
  parameters' size per round in the outer step (bf16 halves it); bytes per step 1/H of DP's,
  analytic against the HLO of both.
* Checkpoints: resume mid-round is bitwise exact; resume on 3 replicas from 4 (a lost worker); a
  plain restore names the conversion; ``plain_checkpoint_state`` is that conversion.
* Errors for bad input, and ``meshpar train`` with the flags.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers.compare import flat, single_device_mesh

import meshpar as mp
from meshpar.cli import main as cli_main
from meshpar.errors import CheckpointError, StrategyError
from meshpar.inspect.diloco import explain_diloco, format_diloco
from meshpar.inspect.hlo import collectives
from meshpar.models import GPT, get_preset, lm_loss
from meshpar.train.checkpoint import Checkpointer
from meshpar.train.data import TokenBatches
from meshpar.train.diloco import DiLoCoConfig, DiLoCoTrainer

init = nnx.initializers


class MLP(nnx.Module):
    """A two-layer regression net: a model that is not the GPT, without state."""

    def __init__(self, rngs: nnx.Rngs, width: int = 64):
        p = lambda *axes: nnx.with_partitioning(init.lecun_normal(), axes)  # noqa: E731
        self.l1 = nnx.Linear(16, width, kernel_init=p("embed", "mlp"), rngs=rngs)
        self.l2 = nnx.Linear(width, 16, kernel_init=p("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def mlp_loss(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def mlp_batch(step: int, rows: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7 + step)
    x = rng.normal(size=(rows, 16)).astype(np.float32)
    return {"x": x, "y": np.sin(x[:, ::-1] * 1.5).astype(np.float32)}


make_mlp = lambda: MLP(nnx.Rngs(0))  # noqa: E731
GPT_CFG = get_preset("tiny", seq_len=16)
make_gpt = lambda: GPT(GPT_CFG, rngs=nnx.Rngs(0))  # noqa: E731
gpt_data = TokenBatches(batch_size=8, seq_len=16, seed=0)
H1_DP = DiLoCoConfig(inner_steps=1, outer_optimizer=optax.sgd(1.0))
INNER_SGD = optax.sgd(0.05, momentum=0.9)  # linear in the gradient: a mean of updates is DP's


def _params(model) -> dict[str, np.ndarray]:
    return flat(nnx.state(model, nnx.Param))


# -- H = 1 is data parallelism ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_h1():
    mesh = mp.make_mesh(diloco=2, fsdp=2, tensor=2)
    trainer = DiLoCoTrainer(make_gpt, INNER_SGD, lm_loss, mesh=mesh, strategy="zero3",
                            diloco=H1_DP)
    losses = [trainer.step(gpt_data.batch(s)).loss for s in range(3)]
    return trainer, losses


@pytest.mark.parametrize("model", ["gpt", "mlp"])
def test_h1_with_outer_sgd_lr1_is_data_parallel(model, gpt_h1):
    if model == "gpt":
        trainer, losses = gpt_h1
        make, loss_fn, batch = make_gpt, lm_loss, gpt_data.batch
    else:
        trainer = DiLoCoTrainer(make_mlp, INNER_SGD, mlp_loss, diloco=H1_DP,
                                mesh=mp.make_mesh(diloco=4, data=2))
        make, loss_fn, batch = make_mlp, mlp_loss, mlp_batch
        losses = [trainer.step(batch(s)).loss for s in range(3)]
    ref = mp.Trainer(make, INNER_SGD, loss_fn, mesh=single_device_mesh(), strategy="dp")
    ref_losses = [ref.step(batch(s)).loss for s in range(3)]
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    got, want = _params(trainer.model()), _params(ref.model())
    for r in range(trainer.replicas):  # every replica starts the next round from them
        for key, value in _params(trainer.model(replica=r)).items():
            np.testing.assert_array_equal(value, got[key])
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


# -- the compiled programs ----------------------------------------------------------------------


def _over(ops, axis):
    return [c for c in ops if axis in c.mesh_axes]


def test_inner_step_has_no_collective_over_diloco_and_a_round_reduces_the_params_once(gpt_h1):
    trainer, _ = gpt_h1
    mesh = trainer.mesh
    inner = collectives(trainer.lower_inner(gpt_data.batch(0)).compile().as_text(), mesh=mesh)
    assert inner and not _over(inner, "diloco"), [(c.kind, c.mesh_axes) for c in inner]
    outer = collectives(trainer.lower_outer().compile().as_text(), mesh=mesh)
    # Only the pseudo-gradient's reduction, only over diloco, of the parameters' per-device size.
    assert {(c.kind, c.mesh_axes, c.in_loop) for c in outer} == {("all-reduce", ("diloco",), False)}
    shard_bytes = sum(
        int(np.prod(s.shard_shape(x.shape))) * 4 for x, s in zip(
            jax.tree.leaves(trainer.inner.state.params),
            jax.tree.leaves(trainer.inner.state_shardings.params)))
    assert sum(c.result_bytes for c in outer) == shard_bytes
    assert trainer.communication().per_sync == (shard_bytes * 2 * (2 - 1) / 2,)
    # What `meshpar inspect --inner-steps H --compiled` prints says the same.
    report = explain_diloco(trainer, gpt_data.batch(0))
    assert report["checks"]["inner_collectives_over_diloco"] == 0
    assert report["checks"]["outer_result_bytes"] == shard_bytes
    text = format_diloco(report)
    assert "collectives over diloco in the inner step: 0 (OK)" in text
    assert re.search(r"all-reduce@diloco +1 op\(s\)", text), text


@pytest.mark.parametrize("reduce_dtype", ["fp32", "bf16"])
def test_bytes_per_step_are_one_over_h_of_data_parallel(reduce_dtype):
    h = 4
    batch = mlp_batch(0)
    dp = mp.Trainer(make_mlp, INNER_SGD, mlp_loss, mesh=mp.make_mesh(data=8), strategy="dp")
    dp_ops = collectives(dp.lower(batch).compile().as_text(), mesh=dp.mesh)
    dp_bytes = sum(c.traffic_per_step for c in _over(dp_ops, "data"))
    trainer = DiLoCoTrainer(make_mlp, INNER_SGD, mlp_loss, mesh=mp.make_mesh(diloco=8),
                            diloco=DiLoCoConfig(inner_steps=h, reduce_dtype=reduce_dtype))
    inner = collectives(trainer.lower_inner(batch).compile().as_text(), mesh=trainer.mesh)
    assert not _over(inner, "diloco")
    lowered = trainer.lower_outer()
    outer = collectives(lowered.compile().as_text(), mesh=trainer.mesh)
    per_step = sum(c.traffic_per_step for c in _over(outer, "diloco")) / h
    comm = trainer.communication()
    shrink = 2 if reduce_dtype == "bf16" else 1
    assert comm.per_step == comm.dp_per_step / (h * shrink)           # analytic
    if reduce_dtype == "bf16":
        # The program meshpar emits reduces bf16 pseudo-gradients; XLA:CPU promotes bf16
        # all-reduces to f32 (its "_promoted" reduction), so on CPU the bytes stay fp32-sized.
        types = re.findall(r"\}\) : \((tensor<[^>]*>)\) -> tensor", lowered.as_text())
        assert len(types) == 4 and all(t.endswith("xbf16>") for t in types), types
        assert per_step == pytest.approx(2 * comm.per_step, rel=1e-9)
        return
    assert per_step == pytest.approx(comm.per_step, rel=1e-9)         # the HLO says the same
    # DP's step also all-reduces the loss and the gradient norm's scalars: within 1 %.
    assert dp_bytes == pytest.approx(comm.dp_per_step, rel=1e-2)
    assert per_step / dp_bytes == pytest.approx(1 / h, rel=1e-2)


# -- the algorithm against a hand-written loop ---------------------------------------------------


def _reference_diloco(make, loss_fn, tx, config: DiLoCoConfig, fragments, replicas, batches):
    """DiLoCo written out: R copies of the parameters (by leaf name, in the trainer's leaf
    order), each with its own inner optimizer; fragment f's outer step after the steps
    ``config.due`` names."""
    names = [n for f in fragments for n in f]   # fragments are contiguous runs of leaves
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(make(), nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    named = dict(zip(names, leaves))

    def loss_of(p, batch):
        return loss_fn(nnx.merge(graphdef, jax.tree.unflatten(treedef, [p[n] for n in names])), batch)

    grad = jax.jit(jax.value_and_grad(loss_of))
    outer = dict(named)
    reps = [dict(named) for _ in range(replicas)]
    inner_opt = [tx.init(r) for r in reps]
    outer_tx = config.outer_optimizer
    outer_opt = [outer_tx.init({n: outer[n] for n in f}) for f in fragments]
    losses = []
    for t, batch in enumerate(batches):
        rows = len(batch["x"]) // replicas
        step_losses = []
        for r in range(replicas):
            share = {k: v[r * rows:(r + 1) * rows] for k, v in batch.items()}
            loss, g = grad(reps[r], share)
            updates, inner_opt[r] = tx.update(g, inner_opt[r], reps[r])
            reps[r] = optax.apply_updates(reps[r], updates)
            step_losses.append(float(loss))
        losses.append(float(np.mean(step_losses)))
        for f in config.due(t + 1):
            frag = fragments[f]
            delta = {n: sum(outer[n] - rep[n] for rep in reps) / replicas for n in frag}
            updates, outer_opt[f] = outer_tx.update(delta, outer_opt[f], {n: outer[n] for n in frag})
            for n in frag:
                outer[n] = outer[n] + updates[n]
                for rep in reps:
                    rep[n] = outer[n]
    return losses, outer, reps


def test_streaming_diloco_with_adam_and_nesterov_matches_the_written_out_loop():
    config = DiLoCoConfig(inner_steps=2, streaming_fragments=2)   # Nesterov 0.7 / 0.9 outside
    tx = optax.adam(1e-2)
    trainer = DiLoCoTrainer(make_mlp, tx, mlp_loss, mesh=mp.make_mesh(diloco=2, fsdp=2, data=2),
                            diloco=config, strategy="zero1")
    assert len(trainer.fragments) == 2 and all(trainer.fragments)
    assert config.due(1) == (1,) and config.due(2) == (0,) and config.due(3) == (1,)
    batches = [mlp_batch(s) for s in range(5)]
    losses = [trainer.step(b).loss for b in batches]
    names = [n for f in trainer.fragments for n in f]
    ref_losses, outer, reps = _reference_diloco(make_mlp, mlp_loss, tx, config, trainer.fragments,
                                                2, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    state = trainer.state
    for f, frag in enumerate(trainer.fragments):
        for n in frag:
            np.testing.assert_allclose(state.outer_params[f][n], outer[n], rtol=1e-5, atol=1e-6)
    leaves = jax.tree.leaves(state.inner.params)
    for i, n in enumerate(names):
        for r in range(2):
            np.testing.assert_allclose(leaves[i][r], reps[r][n], rtol=1e-4, atol=1e-5, err_msg=n)


# -- checkpoints --------------------------------------------------------------------------------


def _mlp_trainer(replicas: int, devices=None, **mesh):
    return DiLoCoTrainer(make_mlp, optax.adam(1e-2), mlp_loss,
                         mesh=mp.make_mesh(diloco=replicas, devices=devices, **mesh),
                         diloco=DiLoCoConfig(inner_steps=2))


def test_checkpoints_resume_mid_round_exactly_and_on_another_number_of_replicas(tmp_path):
    a = _mlp_trainer(4, data=2)
    for s in range(3):
        a.step(mlp_batch(s))
    with Checkpointer(tmp_path / "ck") as ck:     # after step 3 of H = 2: mid-round
        ck.save(3, a.checkpoint_state(), meta={"step": 3, **a.checkpoint_meta()})
    a_losses = [a.step(mlp_batch(s)).loss for s in (3, 4)]

    b = _mlp_trainer(4, data=2)
    with Checkpointer(tmp_path / "ck") as ck:
        assert b.restore(ck)[0] == 3
    assert [b.step(mlp_batch(s)).loss for s in (3, 4)] == a_losses
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(x, y)

    # A worker lost (3 replica groups on the 6 devices left): every replica restarts from the
    # shared parameters of the last synchronisation, the step count goes on.
    c = _mlp_trainer(3, devices=jax.devices()[:6], data=2)
    with Checkpointer(tmp_path / "ck") as ck:
        c.restore(ck)
        saved, _ = ck.restore(a.checkpoint_target())
    assert c.step_count == 3
    outer = saved["outer"]["params"][0]
    for i, n in enumerate(c.fragments[0]):
        for r in range(3):
            np.testing.assert_array_equal(jax.tree.leaves(c.state.inner.params)[i][r], outer[n])
    # The inner optimizer state is the saved replicas' mean.
    adam = lambda t: jax.tree.leaves(t.state.inner.opt_state)  # noqa: E731
    for got, want in zip(adam(c), jax.tree.leaves(saved["inner"]["opt_state"])):
        if jnp.issubdtype(want.dtype, jnp.floating):
            np.testing.assert_allclose(got[1], np.mean(want, axis=0), rtol=1e-6, atol=1e-9)
    assert np.isfinite(c.step(mlp_batch(3, rows=12)).loss) and c.step_count == 4

    # A plain Trainer is told what the checkpoint is and how to convert it.
    plain = mp.Trainer(make_mlp, optax.adam(1e-2), mlp_loss, mesh=mp.make_mesh(data=8))
    with Checkpointer(tmp_path / "ck") as ck:
        with pytest.raises(CheckpointError, match=r"is of a DiLoCo run .*plain_checkpoint_state"):
            ck.restore(plain.checkpoint_target())
    plain.load_checkpoint_state(jax.device_get(c.plain_checkpoint_state()))  # 6 devices -> 8
    got = _params(plain.model())
    for key, value in _params(c.model()).items():
        np.testing.assert_array_equal(got[key], value)


def test_a_plain_checkpoint_starts_every_replica_and_h1_then_continues_like_data_parallel(tmp_path):
    # A data-parallel warm-up, checkpointed after 2 steps, then continued two ways: by the plain
    # Trainer, and by DiLoCo (H = 1, outer SGD 1, inner SGD: DP exactly) started from it.
    ref = mp.Trainer(make_mlp, INNER_SGD, mlp_loss, mesh=mp.make_mesh(data=8), strategy="dp")
    for s in range(2):
        ref.step(mlp_batch(s))
    with Checkpointer(tmp_path / "plain") as ck:
        ck.save(2, ref.checkpoint_state(), meta={"step": 2})
    at_checkpoint = _params(ref.model())
    momentum = [np.asarray(x) for x in jax.tree.leaves(ref.state.opt_state)]
    ref_losses = [ref.step(mlp_batch(s)).loss for s in (2, 3)]

    d = DiLoCoTrainer(make_mlp, INNER_SGD, mlp_loss, diloco=H1_DP,
                      mesh=mp.make_mesh(diloco=4, data=2))
    with Checkpointer(tmp_path / "plain") as ck:
        assert d.restore(ck)[0] == 2
    assert d.step_count == 2
    for r in range(d.replicas):
        for key, value in _params(d.model(replica=r)).items():
            np.testing.assert_array_equal(value, at_checkpoint[key])
    for key, value in _params(d.model()).items():      # the shared parameters
        np.testing.assert_array_equal(value, at_checkpoint[key])
    for got, want in zip(jax.tree.leaves(d.state.inner.opt_state), momentum):
        for r in range(d.replicas):
            np.testing.assert_array_equal(got[r], want)
    np.testing.assert_allclose([d.step(mlp_batch(s)).loss for s in (2, 3)], ref_losses, rtol=2e-6)
    for key, value in _params(ref.model()).items():
        np.testing.assert_allclose(_params(d.model())[key], value, rtol=1e-5, atol=1e-6)
    # A DiLoCo state is not a plain one.
    with pytest.raises(CheckpointError, match=r"a DiLoCo checkpoint state .*load_checkpoint_state"):
        d.load_plain_checkpoint_state(jax.device_get(d.checkpoint_state()))


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, pattern", [
    ({"inner_steps": 0}, r"inner_steps=0; expected an int H >= 1"),
    ({"inner_steps": 2.0}, r"inner_steps=2.0; expected an int H >= 1"),
    ({"inner_steps": 4, "outer_optimizer": optax.sgd}, r"outer_optimizer is a function, not an "
                                                       r"optax GradientTransformation"),
    ({"inner_steps": 2, "streaming_fragments": 3}, r"streaming_fragments=3; expected an int in "
                                                   r"\[1, inner_steps=2\]"),
    ({"inner_steps": 2, "reduce_dtype": "fp8"}, r"reduce_dtype='fp8'"),
])
def test_bad_diloco_config(kwargs, pattern):
    with pytest.raises(StrategyError, match=pattern):
        DiLoCoConfig(**kwargs)


@pytest.mark.parametrize("mesh, kind, pattern", [
    ({"diloco": 2, "pipe": 2, "data": 2}, "diloco", r"does not compose with a pipeline \(pipe=2\)"),
    ({"data": 8}, "diloco", r"needs a 'diloco' mesh axis"),
    ({"diloco": 2, "data": 4}, "plain", r"the mesh has diloco=2: .*mp.DiLoCoTrainer"),
])
def test_meshes_diloco_cannot_train_on(mesh, kind, pattern):
    with pytest.raises(StrategyError, match=pattern):
        if kind == "plain":
            mp.Trainer(make_mlp, INNER_SGD, mlp_loss, mesh=mp.make_mesh(**mesh))
        else:
            DiLoCoTrainer(make_mlp, INNER_SGD, mlp_loss, mesh=mp.make_mesh(**mesh),
                          diloco=DiLoCoConfig(inner_steps=2))


# -- meshpar train ------------------------------------------------------------------------------


#: Also the one-process run of tests/test_multiprocess_train.py's DiLoCo test (run in-process
#: there with these arguments, so that it compiles nothing this test has not compiled).
CLI_DILOCO = ["train", "--preset", "tiny", "--seq-len", "16", "--steps", "4", "--batch-size", "8",
              "--no-progress", "--mesh", "diloco=2,fsdp=2,tensor=2", "--inner-steps", "2",
              "--outer-lr", "0.7", "--outer-momentum", "0.9"]


def test_cli_trains_diloco_and_writes_bytes_over_diloco_per_step(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    argv = [*CLI_DILOCO, "--metrics-file", str(path)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "DiLoCo 2 replicas x 2 inner steps" in out
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    sent = [r["diloco_bytes"] for r in rows]
    assert sent[0] == sent[2] == 0 and sent[1] == sent[3] > 0
    assert rows[0]["diloco_bytes_per_step"] == sent[1] / 2 == rows[0]["dp_bytes_per_step"] / 2
    status = cli_main(["train", "--preset", "tiny", "--steps", "1", "--no-progress",
                       "--mesh", "diloco=2,fsdp=4"])
    err = capsys.readouterr().err
    assert status == 2 and re.search(r"--inner-steps H and a diloco mesh axis go together", err)
