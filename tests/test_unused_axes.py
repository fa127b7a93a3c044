"""A mesh axis of size > 1 that nothing uses is an error (or, opted in, recorded)."""

import numpy as np
import optax
import pytest
from flax import nnx

import meshpar as mp
from meshpar.train.plan import plan_training, unused_mesh_axes


class _MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        up, down = nnx.with_partitioning(init, ("embed", "mlp")), nnx.with_partitioning(init, ("mlp", None))
        self.up = nnx.Linear(8, 16, rngs=rngs, kernel_init=up)
        self.down = nnx.Linear(16, 1, rngs=rngs, kernel_init=down)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))[:, 0]


def _make():
    return _MLP(rngs=nnx.Rngs(0))


def _loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def _batch():
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(8, 8)).astype(np.float32), "y": np.zeros(8, np.float32)}


def _plan(mesh, strategy="auto"):
    return plan_training(_make, mesh=mesh, strategy=mp.get_strategy(strategy), tx=optax.sgd(0.1))


@pytest.mark.parametrize("axes, strategy", [
    ({"data": 8}, "dp"), ({"fsdp": 8}, "zero3"), ({"fsdp": 4, "tensor": 2}, "zero1"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "auto"), ({"data": 8, "foo": 1}, "auto"),
])
def test_every_axis_used_or_of_size_one_is_fine(axes, strategy):
    mesh = mp.make_mesh(**axes)
    assert unused_mesh_axes(_plan(mesh, strategy), mesh) == ()


def test_an_axis_only_a_user_rule_uses_counts_as_used():
    mesh = mp.make_mesh(data=2, foo=4)
    mine = mp.Strategy("mine", zero_stage=0, extra_param_rules=mp.Rules.table([("mlp", "foo")]))
    assert unused_mesh_axes(_plan(mesh, mine), mesh) == ()
    assert unused_mesh_axes(_plan(mesh, "dp"), mesh) == ("foo",)
    # An activation rule is a use too (the model decides whether it constrains with the name).
    acts = mp.Strategy("acts", zero_stage=0, extra_compute_rules=mp.Rules.table([("mlp", "foo")]))
    assert unused_mesh_axes(_plan(mesh, acts), mesh) == ()


def test_trainer_names_each_unused_axis_its_size_and_the_fixes():
    mesh = mp.make_mesh(foo=2, data=2, bar=2)
    with pytest.raises(mp.StrategyError) as err:
        mp.Trainer(_make, optax.sgd(0.1), _loss, mesh=mesh, strategy="auto")
    text = str(err.value)
    assert text.startswith("mesh axes foo=2, bar=2 are used by nothing")
    assert "every device along them would repeat the same work" in text
    assert "data=8" in text  # the suggested mesh keeps the device count
    assert "extra_param_rules=Rules.table([('embed', 'foo')])" in text
    assert "TrainConfig(allow_unused_axes=True)" in text and "\n" not in text


def test_opting_in_runs_and_records_the_axes():
    mesh = mp.make_mesh(data=2, foo=4)
    trainer = mp.Trainer(_make, optax.sgd(0.1), _loss, mesh=mesh, strategy="dp",
                         config=mp.TrainConfig(allow_unused_axes=True))
    assert trainer.unused_axes == ("foo",)
    assert np.isfinite(trainer.step(_batch())["loss"])
    used = mp.Trainer(_make, optax.sgd(0.1), _loss, mesh=mp.make_mesh(data=8), strategy="dp")
    assert used.unused_axes == ()


def test_allow_unused_axes_must_be_a_bool():
    with pytest.raises(mp.StrategyError, match=r"allow_unused_axes='yes'; expected True or False"):
        mp.TrainConfig(allow_unused_axes="yes")
