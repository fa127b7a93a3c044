"""Sharded init of NNX and Linen models equals an unsharded init; plans record every placement."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import meshpar as mp
from meshpar.sharding.placement import Source, abstract_nnx
from meshpar.sharding.rules import Rules

RULES = Rules.table([("embed", "fsdp"), ("embed", None), ("mlp", "tensor"), ("mlp", None)])


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(16, 64, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                             bias_init=nnx.with_partitioning(nnx.initializers.normal(), ("mlp",)),
                             rngs=rngs)
        self.down = nnx.Linear(64, 16, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
                               rngs=rngs)  # its bias is left unannotated on purpose
        self.scale = nnx.Param(jnp.ones((16,)), out_sharding=("embed",))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(64, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.normal(), ("mlp",)))(x)
        return nn.Dense(16, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(x)


class Unannotated(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(64, name="up")(x)
        return nn.Dense(16, name="down")(x)


@pytest.fixture(scope="module")
def mesh():
    return mp.make_mesh(data=2, fsdp=2, tensor=2)


def test_nnx_sharded_init_equals_unsharded_init(mesh):
    model, plan = mp.init_nnx(lambda: NNXMLP(nnx.Rngs(3)), mesh=mesh, rules=RULES)
    # Reference: the same init compiled for one device (bit-exact), and run eagerly (op by op,
    # where XLA's fusion may change the last bit of the normal sampler: 1 ulp).
    one = mp.make_mesh(data=1, devices=jax.devices()[:1])
    ref_jit, _ = mp.init_nnx(lambda: NNXMLP(nnx.Rngs(3)), mesh=one, rules=Rules())
    with nnx.use_eager_sharding(False):
        ref_eager = NNXMLP(nnx.Rngs(3))
    got = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for ref, exact in ((ref_jit, True), (ref_eager, False)):
        want = nnx.to_flat_state(nnx.state(ref, nnx.Param))
        for (path, var), (ref_path, ref_var) in zip(got, want, strict=True):
            assert path == ref_path
            a, b = np.asarray(var.get_value()), np.asarray(ref_var.get_value())
            if exact:
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    assert model.up.kernel.get_value().sharding.spec == P("fsdp", "tensor")
    assert model.down.kernel.get_value().sharding.spec == P("tensor", "fsdp")
    assert model.up.bias.get_value().sharding.spec == P("tensor")
    assert plan["down/bias"].source == "unannotated"
    assert plan["down/bias"].source_kind is Source.UNANNOTATED
    assert any("down/bias" in f for f in plan.fallbacks)


def test_nnx_init_never_materialises_the_whole_model(mesh):
    # The compiled init writes only each device's shard: per-device output bytes equal the plan.
    graphdef, params, rest = abstract_nnx(lambda: NNXMLP(nnx.Rngs(3)))
    shardings, plan = mp.plan_nnx_state(params, mesh=mesh, rules=RULES)

    def build():
        with nnx.use_eager_sharding(False):
            return nnx.split(NNXMLP(nnx.Rngs(3)), nnx.Param, ...)[1]

    compiled = jax.jit(build, out_shardings=shardings).lower().compile()
    mem = compiled.memory_analysis()
    # XLA also counts the output tuple's table of pointers: 8 bytes per output buffer.
    assert mem.output_size_in_bytes == plan.bytes_per_device + 8 * len(plan.entries)
    assert plan.bytes_per_device < plan.bytes_total / 2


def test_linen_sharded_init_equals_unsharded_init(mesh):
    x = jnp.ones((4, 16))
    variables, plan = mp.init_linen(LinenMLP(), jax.random.key(1), x, mesh=mesh, rules=RULES)
    ref = nn.meta.unbox(jax.jit(LinenMLP().init)(jax.random.key(1), x))  # one device
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables, ref)
    eager = nn.meta.unbox(LinenMLP().init(jax.random.key(1), x))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8),
                 variables, eager)
    assert variables["params"]["Dense_0"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert plan["params/Dense_1/kernel"].spec == P("tensor", "fsdp")
    assert plan["params/Dense_1/bias"].source == "unannotated"


def test_path_rules_annotate_models_nobody_annotated(mesh):
    rules = RULES.merge(Rules.table(paths=[
        (r"up/kernel$", ("embed", "mlp")), (r"down/kernel$", ("mlp", "embed")), (r"bias$", (None,)),
    ]))
    variables, plan = mp.init_linen(Unannotated(), jax.random.key(0), jnp.ones((2, 16)), mesh=mesh, rules=rules)
    assert plan["params/up/kernel"].spec == P("fsdp", "tensor")
    assert plan["params/up/kernel"].source == "path rule 'up/kernel$'"
    assert plan["params/up/kernel"].source_kind is Source.PATH_RULE
    assert plan["params/up/kernel"].path_rule == "up/kernel$"
    assert plan["params/down/bias"].source == "path rule 'bias$'"
    assert plan.fallbacks == ()


def test_unannotated_parameter_is_an_error_under_strict(mesh):
    strict = Rules.table([("embed", "fsdp")], strict=True)
    with pytest.raises(mp.UnannotatedParameterError, match=r"params/down/bias \(shape \(16,\)\) has no logical axes"):
        mp.init_linen(Unannotated(), jax.random.key(0), jnp.ones((2, 16)), mesh=mesh, rules=strict)


def test_path_rule_with_wrong_rank(mesh):
    rules = Rules.table(paths=[(r"kernel$", ("embed",))])
    with pytest.raises(mp.RuleError, match=r"params/down/kernel has shape \(64, 16\) \(rank 2\) but 1 logical axes"):
        mp.init_linen(Unannotated(), jax.random.key(0), jnp.ones((2, 16)), mesh=mesh, rules=rules)


def test_indivisible_parameter_error_names_the_parameter(mesh):
    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jnp.zeros((6, 3)), out_sharding=("embed", "mlp"))

    with pytest.raises(mp.IndivisibleError, match=r"w \(shape \(6, 3\)\): dimension 1 \('mlp', size 3\) is not divisible by mesh axis 'tensor' of size 2"):
        mp.init_nnx(lambda: Odd(nnx.Rngs(0)), mesh=mesh, rules=RULES)
    relaxed = Rules.table([("embed", "fsdp"), ("mlp", "tensor")], on_indivisible="replicate")
    model, plan = mp.init_nnx(lambda: Odd(nnx.Rngs(0)), mesh=mesh, rules=relaxed)
    assert plan["w"].spec == P("fsdp")
    assert len(plan.fallbacks) == 1 and "not divisible" in plan.fallbacks[0]


def test_constrain_is_identity_without_layout_and_constrains_with_one(mesh):
    x = jnp.ones((8, 16))
    assert mp.constrain(x, ("batch", "embed")) is x

    @jax.jit
    def f(x):
        with mp.activate(mesh, Rules.table([("batch", ("data", "fsdp")), ("embed", "tensor")])):
            return mp.constrain(x * 2, ("batch", "embed"))

    assert f(x).sharding.spec == P(("data", "fsdp"), "tensor")
