"""Linen models through the Trainer (``mp.from_linen``): the plan, the call, and clear errors.

The numerics under every layout are in test_zoo.py (the ``linen`` model); here: the bridged
parameters carry their ``nn.with_logical_partitioning`` names into meshpar's plan, a call equals
the Linen module's own ``apply`` (same batch statistics, same dropout mask), other methods apply
that method, a checkpoint carries the batch statistics and RNG streams onto another mesh, and bad
input is refused by name.
"""

from __future__ import annotations

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import meshpar as mp
from meshpar.errors import StrategyError

from helpers.zoo import LinenNet, conv_batch, linen_loss, make_linen_net

X = np.zeros((1, 8, 8, 3), np.float32)


def _rngs():
    return nnx.Rngs(params=0, dropout=1)


# -- the plan --------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh,strategy,expected", [
    ("data=2,fsdp=2,tensor=2", "zero3", {
        "Conv_0/kernel": ((None, None, None, "embed"), P(None, None, None, "fsdp")),
        "Conv_1/kernel": ((None, None, "embed", "mlp"), P(None, None, "fsdp", "tensor")),
        "BatchNorm_1/scale": (("mlp",), P("tensor")),
        "Dense_0/kernel": (("mlp", "embed"), P("tensor", "fsdp")),
        "Dense_1/kernel": (("embed", "vocab"), P("fsdp", "tensor")),
        "Dense_1/bias": (("vocab",), P("tensor")),
    }),
    ("data=4,tensor=2", "tp", {
        "Conv_0/kernel": ((None, None, None, "embed"), P()),
        "Conv_1/kernel": ((None, None, "embed", "mlp"), P(None, None, None, "tensor")),
        "Dense_0/kernel": (("mlp", "embed"), P("tensor")),
        "Dense_1/kernel": (("embed", "vocab"), P(None, "tensor")),
    }),
])
def test_plan_places_linen_params_by_their_logical_axes(mesh, strategy, expected):
    trainer = mp.Trainer(make_linen_net, optax.adamw(1e-2), linen_loss,
                         mesh=mp.make_mesh(mesh), strategy=strategy)
    for path, (logical, spec) in expected.items():
        entry = trainer.plan[path]
        assert entry.logical == logical, path
        assert entry.source == "annotation", path
        assert entry.spec == spec, (path, entry.spec)
        module, name = path.split("/")
        assert trainer.state.params[module][name].get_value().sharding.spec == spec
    # Only parameters are in the plan; batch statistics and RNG streams are state.
    assert not [e.path for e in trainer.plan.entries if "mean" in e.path or "rngs" in e.path]
    assert trainer.plan.fallbacks == ()
    leaves = jax.tree_util.tree_flatten_with_path(trainer.state.rest)[0]
    rest = {jax.tree_util.keystr(p) for p, _ in leaves}
    assert any("BatchNorm_0" in k and "mean" in k for k in rest), rest
    assert any("dropout" in k and "key" in k for k in rest), rest


# -- the call is the Linen module's apply -----------------------------------------------------


def test_a_call_equals_linen_apply_with_mutable_batch_stats_and_a_fresh_dropout_key():
    with nnx.use_eager_sharding(False):
        model = make_linen_net()
    x = conv_batch(0)["image"]
    state = nnx.state(model)
    variables = {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    }
    # The keys the bridge will draw: one per stream, from a copy so the model's streams stay put.
    keys = {name: stream() for name, stream in nnx.clone(model.to_nnx__rngs).items()}
    want, updates = LinenNet().apply(variables, x, train=True, rngs=keys, mutable=["batch_stats"])

    got = model(x, train=True)
    np.testing.assert_array_equal(got, want)
    after = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, after, updates["batch_stats"])
    assert not np.array_equal(after["BatchNorm_0"]["mean"],
                              variables["batch_stats"]["BatchNorm_0"]["mean"])
    # The variables are the ones the model started with (metadata and all), now updated.
    assert nnx.graphdef(model) == nnx.graphdef(nnx.merge(nnx.graphdef(model), state))
    # A second training call draws a new dropout key: another mask.
    assert not np.array_equal(model(x, train=True), got)
    # Evaluation: running averages, no dropout, so two calls agree.
    np.testing.assert_array_equal(model(x, train=False), model(x, train=False))


class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)

    def twice(self, x):
        return 2 * self(x)


def test_other_methods_apply_that_method():
    with nnx.use_eager_sharding(False):
        model = mp.from_linen(Twice(), np.ones((2, 4), np.float32), rngs=0)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(model.twice(x), 2 * model(x), rtol=1e-6)


def test_resume_on_another_mesh_continues_exactly():
    """Batch statistics and the dropout stream are in the checkpoint: the next step is equal."""
    def trainer(mesh, strategy):
        return mp.Trainer(make_linen_net, optax.adamw(1e-2), linen_loss, mesh=mp.make_mesh(mesh),
                          strategy=strategy)

    a = trainer("fsdp=8", "zero3")
    for step in range(2):
        a.step(conv_batch(step))
    b = trainer("data=4,tensor=2", "tp")
    b.load_checkpoint_state(a.checkpoint_state())
    def rng(t):
        return np.asarray(jax.random.key_data(t.state.rest["to_nnx__rngs"]["dropout"]["key"][...]))

    np.testing.assert_array_equal(rng(b), rng(a))
    np.testing.assert_array_equal(b.state.rest["BatchNorm_1"]["var"].get_value(),
                                  a.state.rest["BatchNorm_1"]["var"].get_value())
    # The same next step on another layout: equal up to the order of fp32 reductions.
    np.testing.assert_allclose(b.step(conv_batch(2))["loss"], a.step(conv_batch(2))["loss"],
                               rtol=2e-5)


def test_mutable_false_leaves_the_state_alone():
    with nnx.use_eager_sharding(False):
        model = mp.from_linen(LinenNet(), X, train=True, rngs=_rngs(), mutable=False)
    before = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    model(conv_batch(0)["image"], train=False)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
                 before)
    # Linen's own error: the collection is immutable in this call.
    with pytest.raises(flax.errors.ModifyScopeVariableError,
                       match=r'collection "batch_stats" is immutable'):
        model(conv_batch(0)["image"], train=True)


# -- errors ----------------------------------------------------------------------------------


def test_rngs_made_outside_make_model_are_refused_by_name():
    rngs = _rngs()
    with pytest.raises(StrategyError, match=r"got an nnx\.Rngs created outside the function "
                                            r"that calls from_linen.*Create the streams inside "
                                            r"make_model"):
        mp.Trainer(lambda: mp.from_linen(LinenNet(), X, train=True, rngs=rngs),
                   optax.sgd(0.1), linen_loss, mesh=mp.make_mesh(data=8), strategy="dp")


class Sows(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        self.sow("losses", "activation_norm", jnp.mean(h ** 2))
        return h


class CountsInTraining(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        if train:   # created only by a training call: an eval-mode init never sees it
            count = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
            if not self.is_initializing():
                count.value += 1
        return nn.Dense(4)(x)


@pytest.mark.parametrize("module,match", [
    (LinenNet, r"needs a Linen module instance, got the class LinenNet; construct it first"),
    (nnx.Linear(3, 4, rngs=nnx.Rngs(0)), r"Linear is already an NNX module"),
    (lambda x: x, r"needs a flax\.linen\.Module instance, got function"),
])
def test_a_module_that_is_not_a_linen_module_instance_is_refused(module, match):
    with pytest.raises(StrategyError, match=match):
        mp.from_linen(module, X, rngs=_rngs())


def test_missing_example_inputs_are_refused():
    with pytest.raises(StrategyError, match=r"LinenNet\(\)\) needs example inputs"):
        mp.from_linen(LinenNet(), rngs=_rngs())


def test_rngs_must_be_nnx_rngs_or_a_seed():
    with pytest.raises(StrategyError, match=r"rngs=\.\.\.\) takes an nnx\.Rngs.*got str"):
        mp.from_linen(LinenNet(), X, train=True, rngs="seed")
    with pytest.raises(StrategyError, match=r"has the streams \['dropout'\] but no 'params' "
                                            r"\(or 'default'\) stream"):
        mp.from_linen(LinenNet(), X, train=True, rngs=nnx.Rngs(dropout=1))


@pytest.mark.parametrize("mutable,match", [
    (["batch_stats", "params"], r"collection 'params' cannot be carried as training state: "
                                r"parameters are updated by the optimizer"),
    ("intermediates", r"collection 'intermediates' cannot be carried as training state: values "
                      r"sown with self\.sow"),
    (["batch_stats", "cache"], r"names the Linen collection\(s\) \['cache'\], which LinenNet's "
                               r"init did not create \(it created \['batch_stats'\]\)"),
])
def test_a_collection_that_cannot_be_state_is_named(mutable, match):
    with pytest.raises(StrategyError, match=match):
        mp.from_linen(LinenNet(), X, train=True, rngs=_rngs(), mutable=mutable)


class SameName(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.ones, (x.shape[-1],))
        seen = self.variable("stats", "w", lambda: jnp.zeros(x.shape[-1]))
        return x * w + seen.value


def test_two_collections_at_one_path_are_named():
    with pytest.raises(StrategyError, match=r"SameName: two Linen collections hold a variable at "
                                            r"the same path.*\('w',\)"):
        mp.from_linen(SameName(), np.ones((2, 3), np.float32), rngs=0)


def test_a_collection_sown_during_init_is_named():
    with pytest.raises(StrategyError, match=r"collection 'losses' holds activation_norm = tuple, "
                                            r"not an array"):
        mp.from_linen(Sows(), np.zeros((2, 3), np.float32), rngs=_rngs())


def test_state_the_init_did_not_create_is_named():
    # The init ran in eval mode, so the 'counters' collection does not exist when the Trainer
    # builds its state: named when it is asked for, or at the first training step.
    x = np.zeros((1, 3), np.float32)
    with pytest.raises(StrategyError, match=r"names the Linen collection\(s\) \['counters'\], "
                                            r"which CountsInTraining's init did not create"):
        mp.from_linen(CountsInTraining(), x, train=False, rngs=_rngs(), mutable=["counters"])

    def loss(model, batch):
        return jnp.mean(model(batch["x"], train=True) ** 2)

    batch = {"x": np.ones((8, 3), np.float32)}
    trainer = mp.Trainer(lambda: mp.from_linen(CountsInTraining(), x, train=False, rngs=_rngs()),
                         optax.sgd(0.1), loss, mesh=mp.make_mesh(data=8), strategy="dp")
    with pytest.raises(StrategyError, match=r"CountsInTraining uses the Linen collection "
                                            r"'counters', which its init did not create"):
        trainer.step(batch)
    # Initialised as it trains, the same module trains and counts its calls.
    trainer = mp.Trainer(lambda: mp.from_linen(CountsInTraining(), x, train=True, rngs=_rngs()),
                         optax.sgd(0.1), loss, mesh=mp.make_mesh(data=8), strategy="dp")
    for _ in range(2):
        trainer.step(batch)
    assert int(trainer.state.rest["calls"].get_value()) == 2
