"""Models written for mesh axes: mesh-axis-name and PartitionSpec annotations, unmatched names,
strict rules, Explicit meshes and ``out_sharding=`` (issue 12, point 4 and "Loud, not silent").

Flax's Gemma example annotates parameters with mesh-axis names (``("tensor", "fsdp")``-style
metadata) and passes ``out_sharding=`` to its layers. meshpar reads the annotations as requests
for those axes, composed with the strategy; a mesh with Explicit axes is made Auto for training
(with a warning); ``out_sharding=`` under meshpar's Auto axes is one clear ``MeshError``.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import meshpar as mp
from meshpar.errors import MeshparWarning
from meshpar.models import GPT, get_preset
from meshpar.sharding.explicit import explain_trace_error
from meshpar.sharding.placement import abstract_nnx, path_str
from meshpar.sharding.rules import Rules
from meshpar.train.plan import plan_training

from helpers.compare import flat, init_params, paired, rel_norm, run_steps, single_device_mesh

VOCAB, D, HIDDEN, BATCH, SEQ = 64, 16, 32, 8, 4


class AxisNamed(nnx.Module):
    """A Gemma-shaped toy: parameters annotated with mesh-axis names (a tuple, a PartitionSpec,
    a tuple entry), activations constrained with mesh-axis names through ``mp.constrain`` — or,
    with ``out_sharding=True``, passed to the layers as ``out_sharding=`` the way Gemma does."""

    def __init__(self, rngs: nnx.Rngs, *, out_sharding: bool = False):
        init = nnx.initializers.lecun_normal()
        self.out_sharding = out_sharding
        self.embed = nnx.Embed(
            VOCAB, D, rngs=rngs,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("tensor", "fsdp")),
        )
        self.up = nnx.Linear(D, HIDDEN, use_bias=False, rngs=rngs,
                             kernel_init=nnx.with_partitioning(init, P("fsdp", "tensor")))
        self.down = nnx.Linear(HIDDEN, D, use_bias=False, rngs=rngs,
                               kernel_init=nnx.with_partitioning(init, ("tensor", "fsdp")))
        # A tuple entry: the first dimension split over fsdp and tensor together.
        self.mix = nnx.Param(init(rngs.params(), (D, D)), out_sharding=(("fsdp", "tensor"), None))

    def _out(self, y, spec):
        if self.out_sharding:
            return y
        return mp.constrain(y, tuple(spec))

    def __call__(self, ids):
        act_btd = P(("data", "fsdp"), None, None)
        act_btf = P(("data", "fsdp"), None, "tensor")
        kw = (lambda spec: {"out_sharding": spec}) if self.out_sharding else (lambda spec: {})
        x = self._out(self.embed(ids, **kw(act_btd)), act_btd)
        h = self._out(jax.nn.relu(self.up(x, **kw(act_btf))), act_btf)
        x = x + self._out(self.down(h, **kw(act_btd)), act_btd)
        x = x @ self.mix[...]
        return self._out(
            jnp.einsum("btd,vd->btv", x, self.embed.embedding[...], **kw(act_btf)), act_btf
        )


def loss_fn(model, batch):
    logits = model(batch["ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def batch_of(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"ids": rng.integers(0, VOCAB, (BATCH, SEQ)),
            "labels": rng.integers(0, VOCAB, (BATCH, SEQ))}


def make_model():
    return AxisNamed(nnx.Rngs(0))


def _plan(mesh, strategy):
    return plan_training(make_model, mesh=mesh, strategy=mp.get_strategy(strategy),
                         tx=optax.adamw(1e-2))


# -- point 1: mesh-axis names compose with the strategy --------------------------------------------


SHARDED = {"down/kernel": P("tensor", "fsdp"), "up/kernel": P("fsdp", "tensor"),
           "mix": P(("fsdp", "tensor"))}
NO_FSDP = {"down/kernel": P("tensor"), "up/kernel": P(None, "tensor"), "mix": P("tensor")}


@pytest.mark.parametrize("strategy, params, grads, opt", [
    # ZeRO-3: parameters, gradients and optimizer state all over fsdp (and tensor).
    ("zero3", SHARDED, SHARDED, SHARDED),
    # ZeRO-2: gradients and optimizer state over fsdp; parameters only over tensor.
    ("zero2", NO_FSDP, SHARDED, SHARDED),
    # ZeRO-1: only the optimizer state over fsdp.
    ("zero1", NO_FSDP, NO_FSDP, SHARDED),
    # DP: fsdp never splits a weight; tensor still does (the mesh has it).
    ("dp", NO_FSDP, NO_FSDP, NO_FSDP),
])
def test_mesh_axis_names_ask_for_their_axis_subject_to_the_strategy(strategy, params, grads, opt):
    # The tuple annotation (down), the PartitionSpec (up) and the tuple entry (mix) alike.
    mesh = mp.make_mesh(data=2, fsdp=2, tensor=2)
    plan = _plan(mesh, strategy)
    for want, got in ((params, plan.params), (grads, plan.gradients), (opt, plan.optimizer)):
        assert {path: got[path].spec for path in want} == want
    for entry in plan.params.entries:
        assert entry.source == "mesh-axis annotation", entry.path
        assert "data" not in str(entry.spec)  # data never splits a parameter
    assert plan.params.fallbacks == () and plan.params.unmatched == {}


def test_axis_names_the_mesh_lacks_are_replicated_not_unmatched():
    mesh = mp.make_mesh(data=8)
    plan = _plan(mesh, "dp")
    assert all(e.spec == P() for e in plan.params.entries)
    assert plan.params.unmatched == {} and plan.params.fallbacks == ()


def test_report_shows_the_source_of_mesh_axis_placements():
    plan = _plan(mp.make_mesh(fsdp=4, tensor=2), "zero3")
    text = mp.format_plan(plan.params)
    assert re.search(r"down/kernel .*\(tensor, fsdp\) .*tensor->tensor, fsdp->fsdp "
                     r"\[mesh-axis annotation\] .*P\('tensor', 'fsdp'\)", text), text
    assert "mix" in text and "P(('fsdp','tensor'))" in text
    assert mp.plan_to_dict(plan.params)["params"][0]["source"] == "mesh-axis annotation"


def test_partition_spec_metadata_in_nnx_and_linen():
    mesh = mp.make_mesh(fsdp=4, tensor=2)
    rules = mp.get_strategy("zero3").param_rules(mesh)

    class LinenAxisNamed(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.initializers.lecun_normal()
            x = nn.Dense(32, kernel_init=nn.with_partitioning(init, P("fsdp", "tensor")),
                         bias_init=nn.with_partitioning(nn.initializers.zeros, P("tensor")))(x)
            return nn.Dense(16, kernel_init=nn.with_partitioning(init, (("tensor", "fsdp"), None)),
                            use_bias=False)(x)

    variables, plan = mp.init_linen(LinenAxisNamed(), jax.random.key(0), jnp.ones((8, 16)),
                                    mesh=mesh, rules=rules)
    assert variables["params"]["Dense_0"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert variables["params"]["Dense_0"]["bias"].sharding.spec == P("tensor")
    assert variables["params"]["Dense_1"]["kernel"].sharding.spec == P(("tensor", "fsdp"))
    assert plan["params/Dense_0/kernel"].source == "mesh-axis annotation"
    assert plan["params/Dense_1/kernel"].logical == (("tensor", "fsdp"), None)

    model, plan = mp.init_nnx(make_model, mesh=mesh, rules=rules)
    assert model.up.kernel.get_value().sharding.spec == P("fsdp", "tensor")
    assert model.mix.get_value().sharding.spec == P(("fsdp", "tensor"))


def test_tuple_entry_indivisible_counts_the_axes_already_taken():
    mesh = mp.make_mesh(fsdp=4, tensor=2)
    rules = mp.get_strategy("zero3").param_rules(mesh)
    with pytest.raises(mp.IndivisibleError,
                       match=r"w \(shape \(4, 3\)\): dimension 0 \('tensor', size 4\) is not "
                             r"divisible by mesh axis 'tensor' of size 2 times the 4 ways"):
        rules.resolve((("fsdp", "tensor"), None), (4, 3), mesh, name="w")


# -- point 2: unmatched names reported, strict always applies ------------------------------------


class Unmatched(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jnp.zeros((4, 16)), out_sharding=("kv_heads", "embed"))


def test_a_name_without_rule_is_reported():
    mesh = mp.make_mesh(fsdp=8)
    _, params, _ = abstract_nnx(lambda: Unmatched(nnx.Rngs(0)))
    _, plan = mp.plan_nnx_state(params, mesh=mesh, rules=mp.get_strategy("zero3").param_rules(mesh))
    assert plan["w"].spec == P(None, "fsdp")
    assert plan.unmatched == {"kv_heads": ("w",)}
    assert any(re.search(r"w: logical axis 'kv_heads' \(annotation\) has no rule -> replicated; "
                         r"add a rule \('kv_heads', <mesh axis>\) or \('kv_heads', None\)", f)
               for f in plan.fallbacks), plan.fallbacks
    text = mp.format_plan(plan)
    assert "logical names no rule maps" in text and "kv_heads (1 params)" in text
    assert mp.plan_to_dict(plan)["unmatched"] == {"kv_heads": ["w"]}


STRICT_UNMATCHED = (r"w \(shape \(4, 16\)\): dimension 0 has logical axis 'kv_heads', which no "
                    r"rule maps .* add a rule \('kv_heads', <mesh axis>\) .* \('kv_heads', None\)")


def test_strict_rules_reject_a_name_without_rule():
    mesh = mp.make_mesh(fsdp=8)
    with pytest.raises(mp.UnannotatedParameterError, match=STRICT_UNMATCHED):
        mp.init_nnx(lambda: Unmatched(nnx.Rngs(0)), mesh=mesh,
                    rules=Rules.table([("embed", "fsdp")], strict=True))


@pytest.mark.parametrize("extra", [
    Rules.table([], strict=True),                       # no rows of its own: was dropped
    Rules.table([("embed", "fsdp")], strict=True),
])
def test_strict_reaches_the_strategy_tables_through_extra_rules(extra):
    mesh = mp.make_mesh(fsdp=8)
    strategy = mp.Strategy("zero3", zero_stage=3, extra_param_rules=extra,
                           extra_compute_rules=extra)
    for rules in (strategy.param_rules(mesh), strategy.gradient_rules(mesh),
                  strategy.optimizer_rules(mesh), strategy.compute_rules(mesh)):
        assert rules.strict
    with pytest.raises(mp.UnannotatedParameterError, match=STRICT_UNMATCHED):
        plan_training(lambda: Unmatched(nnx.Rngs(0)), mesh=mesh, strategy=strategy)
    with pytest.raises(mp.UnannotatedParameterError, match=r"activation \(shape \(8, 4\)\): "
                       r"dimension 1 has logical axis 'kv_heads', which no rule maps"):
        strategy.compute_rules(mesh).resolve(("batch", "kv_heads"), (8, 4), mesh,
                                             name="activation")


def test_on_indivisible_reaches_the_strategy_tables_with_no_rows():
    mesh = mp.make_mesh(fsdp=8)
    strategy = mp.Strategy(extra_param_rules=Rules.table([], on_indivisible="replicate"))
    res = strategy.param_rules(mesh).resolve(("embed",), (12,), mesh)
    assert res.spec == P() and len(res.fallbacks) == 1


@pytest.mark.parametrize("mesh_text, strategy", [
    ("data=8", "dp"), ("fsdp=8", "zero3"), ("data=2,fsdp=2,tensor=2", "auto"),
    ("fsdp=4,tensor=2", "tp_sp"), ("pipe=2,fsdp=2,tensor=2", "auto"), ("fsdp=2,tensor=4", "tp"),
])
def test_builtin_gpt_has_no_unmatched_names_and_passes_strict(mesh_text, strategy):
    # meshpar's own names that are replicated on purpose (head_dim, layers, seq, stages) have
    # explicit (name, None) rows, so the report holds no noise and strict accepts the GPT.
    mesh = mp.make_mesh(mesh_text)
    strict = Rules.table([], strict=True)
    strat = dataclasses.replace(mp.get_strategy(strategy), extra_param_rules=strict,
                                extra_compute_rules=strict)
    plan = plan_training(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)), mesh=mesh,
                         strategy=strat, tx=optax.adamw(1e-3))
    for p in (plan.params, plan.gradients, plan.optimizer):
        assert p.unmatched == {} and p.fallbacks == ()
    # Every activation name the GPT uses resolves under the strict compute rules too.
    compute = strat.for_mesh(mesh).compute_rules(mesh)
    for names in (("batch", "seq", "embed"), ("batch", None, "heads", "head_dim"),
                  ("embed", None, "heads", "head_dim"), ("batch", "heads", None, None),
                  ("batch", None, "mlp"), ("vocab", "embed"), ("seq", "embed"), ("embed",)):
        compute.resolve(names, (16,) * len(names), mesh)


# -- point 3: Explicit meshes and out_sharding= --------------------------------------------------


def test_trainer_makes_an_explicit_mesh_auto_and_says_so():
    explicit = jax.make_mesh((4, 2), ("fsdp", "tensor"))  # JAX's default: Explicit axes
    assert set(explicit.axis_types) == {AxisType.Explicit}
    with pytest.warns(MeshparWarning, match=r"Trainer: the mesh has Explicit axes \(fsdp=4 "
                      r"Explicit, tensor=2 Explicit\); meshpar trains on Auto axes .* "
                      r"mp\.make_mesh\(fsdp=4, tensor=2\) or jax\.make_mesh\(\.\.\., "
                      r"axis_types=\(AxisType\.Auto,\) \* 2\)"):
        trainer = mp.Trainer(make_model, optax.adamw(1e-2), loss_fn, mesh=explicit,
                             strategy="zero3", config=mp.TrainConfig(donate=False))
    assert set(trainer.mesh.axis_types) == {AxisType.Auto}
    assert trainer.mesh.devices.tolist() == explicit.devices.tolist()
    assert trainer.state.params["down"]["kernel"].get_value().sharding.spec == P("tensor", "fsdp")
    assert np.isfinite(trainer.step(batch_of(0))["loss"])


def test_mixed_mesh_warns_and_manual_mesh_is_a_mesh_error():
    mixed = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Explicit, AxisType.Auto))
    with pytest.warns(MeshparWarning, match=r"fsdp=4 Explicit, tensor=2 Auto"):
        trainer = mp.Trainer(make_model, optax.adamw(1e-2), loss_fn, mesh=mixed, strategy="zero1")
    assert set(trainer.mesh.axis_types) == {AxisType.Auto}
    manual = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Manual,))
    for call in (
        lambda: mp.Trainer(make_model, optax.adamw(1e-2), loss_fn, mesh=manual),
        lambda: mp.init_nnx(make_model, mesh=manual, rules=Rules()),
        lambda: mp.init_linen(nn.Dense(4), jax.random.key(0), jnp.ones((8, 4)), mesh=manual,
                              rules=Rules()),
    ):
        with pytest.raises(mp.MeshError, match=r"the mesh has Manual axes \(data=8 Manual\); .*"
                           r"mp\.make_mesh\(data=8\)"):
            call()


@pytest.mark.parametrize("types", [(AxisType.Explicit,) * 2, (AxisType.Explicit, AxisType.Auto)])
@pytest.mark.parametrize("in_context", [False, True])
def test_init_places_on_explicit_and_mixed_meshes(types, in_context):
    # Placement only hands out_shardings to jit: the arrays land on the mesh given, with its axis
    # types, also under the caller's jax.set_mesh (where nnx.eval_shape alone would reject
    # meshpar's logical names).
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=types)
    rules = Rules.table([("embed", "fsdp"), ("mlp", "tensor")])

    class Logical(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jnp.zeros((16, 32)), out_sharding=("embed", "mlp"))

    class LinenLogical(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(32, kernel_init=init, use_bias=False)(x)

    def run():
        model, _ = mp.init_nnx(lambda: Logical(nnx.Rngs(0)), mesh=mesh, rules=rules)
        variables, _ = mp.init_linen(LinenLogical(), jax.random.key(0), jnp.ones((8, 16)),
                                     mesh=mesh, rules=rules)
        return model.w.get_value().sharding, variables["params"]["Dense_0"]["kernel"].sharding

    if in_context:
        with jax.set_mesh(mesh):
            shardings = run()
    else:
        shardings = run()
    for sharding in shardings:
        assert sharding.spec == P("fsdp", "tensor")
        assert tuple(sharding.mesh.axis_types) == types


OUT_SHARDING_FIX = (r"Change that call: drop out_sharding= .* out_sharding=P\(\('data', "
                    r"'fsdp'\), None, (None|'tensor')\) becomes y = meshpar\.constrain\(y, "
                    r"\[\('data', 'fsdp'\), None, (None|'tensor')\]\)")


@pytest.mark.parametrize("mesh_text, strategy, in_context, cause", [
    # dot_general outside a mesh context: "Using PartitionSpec when you are not under a mesh
    # context is not allowed".
    ("data=2,fsdp=2,tensor=2", "dp", False,
     r"passes out_sharding=PartitionSpec\(\.\.\.\) to a layer or jnp operation at "
     r".*test_annotations\.py:\d+ \(AxisNamed\.__call__\) -> flax Linear\.__call__"),
    # Under jax.set_mesh(the Auto mesh): "PartitionSpec passed to dot_general cannot contain axis
    # names that are of type Auto or Manual".
    ("data=2,fsdp=2,tensor=2", "dp", True,
     r"passes out_sharding= to dot_general at .*test_annotations\.py:\d+ "
     r"\(AxisNamed\.__call__\) -> flax Linear\.__call__"),
    # Inside a shard_map of meshpar's (here: the local gradient accumulation of ZeRO-1 with 2
    # microbatches), nnx.Embed's auto_axes: "NotImplementedError: Going from `Manual` AxisType to
    # `Auto` or `Explicit` AxisType is not allowed. Please file a bug at ...".
    ("fsdp=4,tensor=2", "zero1", False,
     r"passes out_sharding= to a layer that wraps its operation in jax\.sharding\.auto_axes "
     r"\(nnx\.Embed does\) at .*test_annotations\.py:\d+ \(AxisNamed\.__call__\) "
     r"-> flax Embed\.__call__"),
])
def test_out_sharding_under_auto_axes_is_one_meshpar_error(mesh_text, strategy, in_context,
                                                          cause):
    mesh = mp.make_mesh(mesh_text)
    trainer = mp.Trainer(lambda: AxisNamed(nnx.Rngs(0), out_sharding=True), optax.adamw(1e-2),
                         loss_fn, mesh=mesh, strategy=strategy,
                         config=mp.TrainConfig(microbatches=2 if strategy == "zero1" else 1,
                                               row_separable=strategy == "zero1"))
    before = flat(trainer.state.params)
    with pytest.raises(mp.MeshError) as info:
        if in_context:
            with jax.set_mesh(trainer.mesh):
                trainer.step(batch_of(0))
        else:
            trainer.step(batch_of(0))
    message = str(info.value)
    assert re.search(cause, message), message
    axes = ", ".join(mesh_text.split(","))
    assert re.search(rf"meshpar traces the step on a mesh with Auto axes {axes}, and JAX accepts "
                     r"out_sharding= only on Explicit axes", message)
    assert re.search(OUT_SHARDING_FIX, message), message
    assert info.value.__cause__ is None  # one error, not a chain of raw JAX tracebacks
    for key, got, ref in paired(flat(trainer.state.params), before):
        np.testing.assert_array_equal(got, ref, err_msg=key)


def test_given_an_example_batch_out_sharding_is_refused_when_the_trainer_is_built():
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch_of(0))
    with pytest.raises(mp.MeshError, match=r"passes out_sharding=PartitionSpec\(\.\.\.\) to a "
                       r"layer or jnp operation at .*test_annotations\.py:\d+"):
        mp.Trainer(lambda: AxisNamed(nnx.Rngs(0), out_sharding=True), optax.adamw(1e-2), loss_fn,
                   mesh=mp.make_mesh("data=2,fsdp=2,tensor=2"), strategy="dp",
                   example_batch=example)


def test_explain_trace_error_leaves_other_errors_alone():
    assert explain_trace_error(ValueError("shapes (3,) and (4,) do not match")) is None
    assert explain_trace_error(TypeError("Cannot interpret 'key<fry>' as a data type")) is None


# -- point 4: the annotated model trains like one device -------------------------------------------
#
# Same math on both sides, only the order of fp32 reductions differs (see test_equivalence.py for
# the derivation); these are its fp32 tolerances, not loosened: the model here is smaller.
LOSS_RTOL, LOSS_ATOL = 2e-5, 2e-6
PARAM_ATOL, PARAM_UPDATE_RTOL = 5e-5, 1e-4


@pytest.fixture(scope="module")
def reference():
    trainer = mp.Trainer(make_model, optax.adamw(1e-2), loss_fn, mesh=single_device_mesh(),
                         strategy="dp")
    init_loss, _, losses = run_steps(trainer, batch_of, 3)
    return init_loss, losses, flat(trainer.state.params)


@pytest.mark.parametrize("mesh_text, strategy, specs", [
    ("fsdp=4,tensor=2", "zero3",
     {"down/kernel": P("tensor", "fsdp"), "up/kernel": P("fsdp", "tensor"),
      "embed/embedding": P("tensor", "fsdp"), "mix": P(("fsdp", "tensor"))}),
    ("data=2,fsdp=2,tensor=2", "zero1",
     {"down/kernel": P("tensor"), "up/kernel": P(None, "tensor"),
      "embed/embedding": P("tensor"), "mix": P("tensor")}),
])
def test_mesh_axis_annotated_model_trains_like_one_device(reference, mesh_text, strategy, specs):
    ref_init_loss, ref_losses, ref_params = reference
    trainer = mp.Trainer(make_model, optax.adamw(1e-2), loss_fn, mesh=mp.make_mesh(mesh_text),
                         strategy=strategy)
    placed = {path_str(k): v.get_value().sharding.spec
              for k, v in nnx.to_flat_state(trainer.state.params)}
    assert placed == specs
    init_loss, _, losses = run_steps(trainer, batch_of, 3)
    np.testing.assert_allclose(init_loss, ref_init_loss, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    init = init_params(make_model)
    for key, got, ref in paired(flat(trainer.state.params), ref_params):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=PARAM_ATOL, err_msg=key)
        assert rel_norm(got, ref, ref - init[key]) <= PARAM_UPDATE_RTOL, key


def test_einsum_out_sharding_under_an_auto_mesh_is_explained():
    # jnp.einsum(..., out_sharding=P(...)) under jax.set_mesh(an Auto mesh), as JAX itself sees
    # it: "PartitionSpec passed to einsum cannot contain axis names that are of type Auto".
    mesh = mp.make_mesh(fsdp=4, tensor=2)

    def f(x, w):
        return jnp.einsum("bd,df->bf", x, w, out_sharding=P("fsdp", "tensor"))

    with jax.set_mesh(mesh), pytest.raises(ValueError) as info:
        jax.jit(f)(jnp.ones((8, 4)), jnp.ones((4, 8)))
    explained = explain_trace_error(info.value, mesh=mesh)
    assert isinstance(explained, mp.MeshError)
    assert re.search(r"passes out_sharding= to einsum at .*test_annotations\.py:\d+ \(.*f\)\. "
                     r".*out_sharding=P\('fsdp', 'tensor'\) becomes y = meshpar\.constrain\(y, "
                     r"\['fsdp', 'tensor'\]\)", str(explained)), str(explained)
    # JAX's own words, not the note it attaches to errors out of jax.jit.
    said = str(explained).split("JAX said: ")[1]
    assert said.startswith("ValueError: ") and "einsum" in said, said


def test_trainer_under_the_callers_explicit_set_mesh(reference):
    # Flax's Gemma example sets its (Explicit) mesh for the whole run; meshpar's step then traces
    # under its own Auto mesh instead (JAX: "context mesh ... should match the aval mesh").
    explicit = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    with jax.set_mesh(explicit), pytest.warns(MeshparWarning, match=r"Explicit axes"):
        trainer = mp.Trainer(make_model, optax.adamw(1e-2), loss_fn, mesh=explicit,
                             strategy="zero3")
        loss = trainer.step(batch_of(0))["loss"]
    np.testing.assert_allclose(loss, reference[1][0], rtol=LOSS_RTOL, atol=LOSS_ATOL)
