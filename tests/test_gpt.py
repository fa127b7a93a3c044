"""The built-in GPT: parameter counts and annotations, numerics, scan/remat, and a sharded run."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshpar.backend import bf16
from meshpar.errors import MeshparError, StrategyError
from meshpar.mesh import make_mesh
from meshpar.models import GPT, PRESETS, GPTConfig, get_preset, lm_loss
from meshpar.parallel.layout import activate
from meshpar.parallel.remat import REMAT_POLICIES, maybe_remat, remat_policy
from meshpar.sharding.rules import Rules

TINY = get_preset("tiny")


def build(config: GPTConfig, seed: int = 0) -> GPT:
    with nnx.use_eager_sharding(False):
        return GPT(config, rngs=nnx.Rngs(seed))


@jax.jit
def _apply(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def forward(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """The model's logits, jitted (eager NNX forward passes are slow to dispatch)."""
    return _apply(*nnx.split(model), tokens)


def abstract(config: GPTConfig) -> GPT:
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))


def real_count(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def random_batch(batch: int, seq: int, seed: int = 0) -> dict[str, jax.Array]:
    tokens = np.random.default_rng(seed).integers(0, 256, (batch, seq + 1))
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
            "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


@pytest.fixture(scope="module")
def tiny() -> GPT:
    return build(TINY)


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_matches_model(name):
    config = PRESETS[name]
    model = abstract(config)  # nothing allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct)
               for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert real_count(model) == config.param_count()


def test_20m_preset_size():
    assert 18e6 < get_preset("20m").param_count() < 21e6


def test_untied_param_counts():
    config = TINY.replace(tie_embeddings=False, head_dim=8)
    model = abstract(config)
    assert real_count(model) == config.param_count()
    assert config.param_count() == TINY.replace(head_dim=8).param_count() + 64 * 256
    # The unembedding counts once either way; the position table and norms never.
    assert config.matmul_param_count() == TINY.replace(head_dim=8).matmul_param_count()
    d, m, l = 64, 256, 2
    assert TINY.matmul_param_count() == l * (4 * d * d + 2 * d * m) + d * 256


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(vocab_size=0), MeshparError, r"vocab_size=0 must be a positive int"),
        (dict(layers=2.5), MeshparError, r"layers=2.5 must be a positive int"),
        (dict(heads=True), MeshparError, r"heads=True must be a positive int"),
        (dict(heads=3), MeshparError, r"d_model=64 is not divisible by heads=3"),
        (dict(head_dim=0), MeshparError, r"head_dim=0 must be a positive int"),
        (dict(tie_embeddings="yes"), MeshparError, r"tie_embeddings='yes' must be a bool"),
        (dict(remat="sometimes"), StrategyError, r"GPTConfig.remat='sometimes'.*'full'"),
        (dict(dropout=1.0), MeshparError, r"dropout=1.0 must be a number in \[0, 1\)"),
        (dict(dropout=-0.1), MeshparError, r"dropout=-0.1 must be a number in \[0, 1\)"),
        (dict(dropout=float("nan")), MeshparError, r"dropout=nan must be a number"),
        (dict(dropout="0.1"), MeshparError, r"dropout='0.1' must be a number"),
        (dict(dropout=True), MeshparError, r"dropout=True must be a number"),
    ],
)
def test_config_errors(changes, error, match):
    with pytest.raises(error, match=match):
        TINY.replace(**changes)


def test_explicit_head_dim_allows_indivisible_heads():
    config = TINY.replace(heads=3, head_dim=16)
    assert config.head_size == 16 and TINY.head_size == 16


def test_get_preset():
    assert get_preset("small", remat="none").remat == "none"
    with pytest.raises(MeshparError, match=r"unknown GPT preset 'huge'.*'tiny'.*'20m'"):
        get_preset("huge")


# -- remat -------------------------------------------------------------------------------------


def test_remat_policy_names():
    assert REMAT_POLICIES == ("none", "full", "dots", "dots_no_batch", "offload")
    assert remat_policy("none") is None
    assert remat_policy("full") is jax.checkpoint_policies.nothing_saveable
    assert remat_policy("dots") is jax.checkpoint_policies.checkpoint_dots
    assert remat_policy("dots_no_batch") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    assert callable(remat_policy("offload"))
    fn = lambda x: x  # noqa: E731
    assert maybe_remat(fn, "none") is fn
    with pytest.raises(StrategyError, match=r"remat='bogus'.*'none', 'full', 'dots'"):
        remat_policy("bogus")
    with pytest.raises(StrategyError, match="bogus"):
        maybe_remat(fn, "bogus")


# -- annotations -----------------------------------------------------------------------------


def test_every_param_has_logical_axes(tiny):
    flat = nnx.to_flat_state(nnx.state(tiny, nnx.Param))
    assert len(flat) == 16  # 2 embeddings, 12 stacked block params, final norm
    allowed = {"batch", "seq", "embed", "heads", "head_dim", "mlp", "vocab", "layers"}
    for path, var in flat:
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.get_value().ndim, path
        assert set(axes) <= allowed, (path, axes)
        assert (axes[0] == "layers") == (path[0] == "blocks"), (path, axes)
        if path[0] == "blocks":
            assert var.get_value().shape[0] == TINY.layers
    axes = {"/".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in flat}
    assert axes["blocks/wq"] == ("layers", "embed", "heads", "head_dim")
    assert axes["blocks/wo"] == ("layers", "heads", "head_dim", "embed")
    assert axes["blocks/w_in"] == ("layers", "embed", "mlp")
    assert axes["tok_embed"] == ("vocab", "embed")
    assert axes["pos_embed"] == ("seq", "embed")


# -- forward numerics ------------------------------------------------------------------------


def test_logits_shape_dtype_and_short_sequences(tiny):
    for seq in (TINY.seq_len, 5):
        logits = forward(tiny, random_batch(2, seq)["inputs"])
        assert logits.shape == (2, seq, 256) and logits.dtype == jnp.float32
        assert bool(jnp.isfinite(logits).all())
    with pytest.raises(MeshparError, match=r"33 tokens but config.seq_len=32"):
        tiny(jnp.zeros((1, 33), jnp.int32))


def test_causality(tiny):
    tokens = random_batch(2, 16)["inputs"]
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 256)
    a, b = forward(tiny, tokens), forward(tiny, changed)
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-4


def test_loss_at_init_is_near_uniform(tiny):
    graphdef, state = nnx.split(tiny)
    batch = random_batch(4, 32)
    loss = jax.jit(lambda s: lm_loss(nnx.merge(graphdef, s), batch))(state)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert abs(float(loss) - np.log(256)) < 0.1


@pytest.fixture
def native_dots(monkeypatch):
    """The bf16 dot path of a CPU with bf16 instructions, whatever this CPU has."""
    monkeypatch.setenv(bf16.ENV, "native")


@pytest.fixture
def fp32_dots(monkeypatch):
    """The fp32 dots (the default on CPUs without bf16 instructions), whatever this CPU has."""
    monkeypatch.setenv(bf16.ENV, "fp32")


def test_bf16_params_give_float32_logits(tiny, native_dots):
    graphdef, state = nnx.split(tiny)
    state16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    tokens = random_batch(2, 16)["inputs"]
    logits = _apply(graphdef, state16, tokens)
    assert logits.dtype == jnp.float32
    # Matmuls ran on bf16 operands (the parameters' dtype), not silently promoted to float32:
    # bf16 x bf16 -> fp32 dots (the form XLA:CPU runs on its bf16 kernels), rounded to bf16.
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state16)
    dots = _dot_operand_dtypes(jaxpr.jaxpr)
    assert len(dots) == 7 and set(dots) == {("bfloat16", "bfloat16")}, dots
    assert "f32[2,16,3,4,16] = dot_general" in str(jaxpr)  # the fused q/k/v projection
    np.testing.assert_allclose(logits, forward(tiny, tokens), atol=0.05)


# Layouts whose bf16 steps compile to different dot shapes and layouts (ZeRO-3 written out,
# GSPMD tensor parallel with microbatches, sequence parallel, a circular pipeline).
_BF16_LAYOUTS = [("fsdp=8", "auto", 1), ("data=2,fsdp=2,tensor=2", "auto", 2),
                 ("fsdp=2,tensor=4", "tp_sp", 1), ("pipe=2,data=4", "auto", 2)]


@pytest.mark.parametrize("mesh,strategy,m", _BF16_LAYOUTS, ids=[c[0] for c in _BF16_LAYOUTS])
def test_bf16_dots_all_run_on_the_library_kernels(mesh, strategy, m, native_dots):
    # A bf16 x bf16 -> fp32 dot that XLA:CPU leaves outside a YNNPACK fusion fails at run time
    # (DotThunk has no such kernel): every one must be inside a fusion (see gpt._einsum).
    import re

    import optax

    from meshpar.sharding.strategy import get_strategy
    from meshpar.train import TrainConfig, Trainer

    mesh_ = make_mesh(mesh)
    pipelined = "pipe" in mesh
    trainer = Trainer(lambda: GPT(TINY, rngs=nnx.Rngs(0)), optax.adamw(1e-2), lm_loss, mesh=mesh_,
                      strategy=get_strategy(strategy).for_mesh(mesh_),
                      config=TrainConfig(precision="bf16", microbatches=m, row_separable=True,
                                         **({"schedule": "circular"} if pipelined else {})),
                      allocate=False)  # only compiled, never run: no initialiser to compile
    text = trainer.lower(random_batch(16, 32)).compile().as_text()
    fused = set(re.findall(r"kind=kCustom, calls=%?([^\s,]+)", text))
    dtype = dict(re.findall(r"^\s+(?:ROOT )?%?(\S+) = ([a-z0-9]+)\[", text, re.M))
    bare, comp = [], None
    for line in text.splitlines():
        if head := re.match(r"^(?:ENTRY )?%?(\S+) \(.*\{$", line):
            comp = head.group(1)
        if (dot := re.search(r"dot\(%?([^,\s]+), %?([^,\s)]+)\)", line)) and comp not in fused:
            bare.append((line.strip()[:160], [dtype.get(o) for o in dot.groups()]))
    assert len(fused) > 0 and len(bare) < 10, bare
    assert not [b for b in bare if "bf16" in b[1]], bare


@pytest.mark.parametrize("spec", ["btd,dm->btm", "btm,md->btd", "btd,vd->btv", "bthk,hkd->btd",
                                  "bthk,bshk->bhts"])
def test_weight_gradient_form_gives_the_einsums_gradients(spec):
    # _weight_grad's matmul form (two operand orders), and the plain einsum where a dimension
    # is in all three terms (attention): the gradients of jnp.einsum, to fp32 rounding.
    from meshpar.models.gpt import _einsum

    sizes = dict(b=2, t=8, s=8, d=16, m=24, v=40, h=2, k=4)
    ins, _ = spec.split("->")
    a_shape, b_shape = ([sizes[i] for i in term] for term in ins.split(","))
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)

    def loss(f):
        return lambda a, b: jnp.sum(jnp.sin(f(a, b)))

    got = jax.grad(loss(lambda a, b: _einsum(spec, a, b, weight=True)), argnums=(0, 1))(a, b)
    want = jax.grad(loss(lambda a, b: jnp.einsum(spec, a, b)), argnums=(0, 1))(a, b)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh", ["fsdp=8", "data=8"])
def test_fp32_mlp_weight_gradients_run_on_the_library_kernels(mesh):
    # XLA:CPU ran these two gradients as bare dots contracted on the lhs's first dimension
    # (Eigen, about half YNNPACK's speed); gpt._weight_grad gives it [M, K] x [K, N] dots, which
    # it fuses into YNNPACK calls.
    import re

    import optax

    from meshpar.train import TrainConfig, Trainer

    cfg = TINY.replace(d_model=256, mlp_dim=1024, seq_len=128, layers=2)
    trainer = Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-2), lm_loss,
                      mesh=make_mesh(mesh), config=TrainConfig(row_separable=True),
                      allocate=False)
    text = trainer.lower(random_batch(16, 128)).compile().as_text()
    fused = set(re.findall(r"kind=kCustom, calls=%?([^\s,]+)", text))
    bare, comp = [], None
    for line in text.splitlines():
        if head := re.match(r"^(?:ENTRY )?%?(\S+) \(.*\{$", line):
            comp = head.group(1)
        if " dot(" in line and comp not in fused and re.search(r"btd,dm->btm|btm,md->btd", line):
            bare.append(line.strip()[:200])
    assert len(fused) > 0 and not bare, bare


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, str]]:
    """The operand dtypes of every dot_general in ``jaxpr`` and its sub-jaxprs."""
    return [tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in _eqns(jaxpr)
            if eqn.primitive.name == "dot_general"]


def test_bf16_gradient_rounds_gelu_once_and_concatenates_qkv(tiny, native_dots):
    # In bf16 the MLP's bias and GELU run on the matmul's fp32 result and round once (written
    # in bf16, XLA:CPU rounds after each of GELU's elementwise steps, forward and backward);
    # q, k and v come from one split, so their gradients meet in one concatenate, not in three
    # padded [B, T, 3, H, K] arrays added up (a rounding pass per add in bf16).
    graphdef, state = nnx.split(tiny)
    state16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    tokens = random_batch(2, 16)["inputs"]
    grad = jax.grad(lambda s: nnx.merge(graphdef, s)(tokens).sum())
    eqns = list(_eqns(jax.make_jaxpr(grad)(state16).jaxpr))
    tanh_inputs = {str(v.aval.dtype) for e in eqns if e.primitive.name == "tanh" for v in e.invars}
    assert tanh_inputs == {"float32"}, tanh_inputs
    qkv = [e for e in eqns if len(e.outvars) == 1 and e.outvars[0].aval.shape == (2, 16, 3, 4, 16)]
    kinds = {e.primitive.name for e in qkv}
    assert "concatenate" in kinds and not kinds & {"pad", "add_any"}, kinds


def test_bf16_fp32_dots_widen_every_operand_and_keep_the_numbers(tiny, fp32_dots, monkeypatch):
    # The fp32 dots (the default on CPUs without bf16 dot instructions): every matmul is an
    # fp32 dot of the widened bf16 values (meshpar.backend.bf16). The products of bf16 values are
    # exact in fp32 and both paths accumulate in fp32, so logits and gradients equal the native
    # path's up to the order of the sums, and are as far from the fp32 model as the native path's.
    graphdef, state = nnx.split(tiny)
    state16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    tokens = random_batch(2, 16)["inputs"]
    loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(state16).jaxpr
    dots = _dot_operand_dtypes(jaxpr)
    assert len(dots) >= 20 and set(dots) == {("float32", "float32")}, dots
    converts = [e for e in _eqns(jaxpr) if e.primitive.name == "convert_element_type"
                and e.invars[0].aval.dtype == jnp.bfloat16]
    assert converts
    widened = jax.jit(jax.grad(loss))(state16)
    monkeypatch.setenv(bf16.ENV, "native")
    native = jax.jit(jax.grad(loss))(state16)
    reference = jax.jit(jax.grad(loss))(state)
    for w, n, r in zip(*(jax.tree.leaves(t) for t in (widened, native, reference))):
        w, n, r = (np.asarray(x, np.float32) for x in (w, n, r))
        scale = np.linalg.norm(r)
        assert np.linalg.norm(w - n) <= 0.02 * scale, np.linalg.norm(w - n) / scale
        assert np.linalg.norm(w - r) <= 1.25 * np.linalg.norm(n - r) + 1e-3 * scale


def test_bf16_dot_path_follows_the_cpu_and_the_override(monkeypatch):
    assert bf16.cpu_has_bf16_dots("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n") is False
    assert bf16.cpu_has_bf16_dots("flags\t\t: avx2 avx512f avx512_bf16\n") is True
    assert bf16.cpu_has_bf16_dots("flags\t\t: avx2 amx_bf16 amx_tile\n") is True
    assert bf16.cpu_has_bf16_dots("Features\t: fp asimd bf16 i8mm\n") is True  # Arm
    assert bf16.cpu_has_bf16_dots("machdep.cpu.brand_string: Apple M2") is None
    monkeypatch.setenv(bf16.ENV, "fp32")
    assert bf16.bf16_dots() is bf16.BF16Dots.FP32
    assert bf16.describe_bf16_dots() == (
        "bf16 matmuls: fp32 dots of the bf16 values (MESHPAR_BF16_DOTS=fp32)")
    monkeypatch.setenv(bf16.ENV, "Native")
    assert bf16.bf16_dots() is bf16.BF16Dots.NATIVE
    assert bf16.describe_bf16_dots() == "bf16 matmuls: bf16 dots (MESHPAR_BF16_DOTS=native)"
    monkeypatch.delenv(bf16.ENV)
    # Unset: fp32 dots on a CPU backend whose CPU has no bf16 dot instructions, else bf16 dots.
    monkeypatch.setattr(bf16, "_host_cpu_has_bf16_dots", lambda: False)
    assert bf16.bf16_dots() is bf16.BF16Dots.FP32
    assert bf16.describe_bf16_dots() == (
        "bf16 matmuls: fp32 dots of the bf16 values (this CPU has no bf16 dot instructions; "
        "MESHPAR_BF16_DOTS=native for bf16 dots)")
    monkeypatch.setattr(bf16, "_host_cpu_has_bf16_dots", lambda: True)
    assert bf16.bf16_dots() is bf16.BF16Dots.NATIVE
    assert bf16.describe_bf16_dots() == "bf16 matmuls: bf16 dots"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(bf16, "_host_cpu_has_bf16_dots", lambda: False)
    assert bf16.bf16_dots() is bf16.BF16Dots.NATIVE   # the CPU's instructions matter on CPU only
    # A bf16_dots_as block wins over the host and the variable, and ends with the block.
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setenv(bf16.ENV, "fp32")
    with bf16.bf16_dots_as(bf16.BF16Dots.NATIVE):
        assert bf16.bf16_dots() is bf16.BF16Dots.NATIVE
    assert bf16.bf16_dots() is bf16.BF16Dots.FP32
    monkeypatch.setenv(bf16.ENV, "bf16")
    with pytest.raises(MeshparError,
                       match="MESHPAR_BF16_DOTS='bf16'; expected auto, native or fp32"):
        bf16.bf16_dots()


def test_untied_model_runs():
    config = TINY.replace(tie_embeddings=False, layers=1)

    @jax.jit
    def init_and_apply(tokens):  # built inside jit: one compile instead of one per initializer
        with nnx.use_eager_sharding(False):
            return GPT(config, rngs=nnx.Rngs(0))(tokens)

    logits = init_and_apply(random_batch(1, 8)["inputs"])
    assert logits.shape == (1, 8, 256) and bool(jnp.isfinite(logits).all())


# -- dropout -----------------------------------------------------------------------------------


def test_dropout_is_active_in_training_and_off_in_eval():
    plain = build(TINY)
    model = build(TINY.replace(dropout=0.1))
    assert TINY.dropout == 0.0 and TINY.replace(dropout=0).dropout == 0.0
    # The dropout keys are drawn after the weights: the same seed gives the same weights.
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param),
                 nnx.state(plain, nnx.Param))
    tokens = random_batch(2, 16)["inputs"]
    call = nnx.jit(lambda m, t: m(t))  # advances the model's RNG counters, as a train step does
    a, b = call(model, tokens), call(model, tokens)
    assert float(jnp.abs(a - b).max()) > 1e-3  # a new mask every call
    reference = forward(plain, tokens)
    assert float(jnp.abs(a - reference).max()) > 1e-3
    model.eval()
    np.testing.assert_array_equal(call(model, tokens), reference)
    np.testing.assert_array_equal(forward(nnx.view(plain, deterministic=True), tokens), reference)
    model.train()
    assert float(jnp.abs(call(model, tokens) - reference).max()) > 1e-3


def test_dropout_streams_come_from_the_seed_or_a_dropout_stream():
    config = TINY.replace(dropout=0.1)
    keys = lambda m: jax.random.key_data(m.embed_dropout.rngs.key[...])  # noqa: E731
    with nnx.use_eager_sharding(False):
        seeded = GPT(config, rngs=nnx.Rngs(0))
        again = GPT(config, rngs=nnx.Rngs(0))
        split = GPT(config, rngs=nnx.Rngs(params=0, dropout=1))
        with pytest.raises(MeshparError, match=r"dropout=0.1 needs a 'dropout' RNG stream, but "
                           r"rngs has only 'params'; pass nnx.Rngs\(seed\)"):
            GPT(config, rngs=nnx.Rngs(params=0))
        GPT(TINY, rngs=nnx.Rngs(params=0))  # no dropout, no dropout stream needed
    np.testing.assert_array_equal(keys(seeded), keys(again))
    assert not np.array_equal(keys(seeded), keys(split))
    assert not np.array_equal(keys(seeded), jax.random.key_data(seeded.final_dropout.rngs.key[...]))


# -- scan and remat --------------------------------------------------------------------------


def lowered_forward_text(config: GPTConfig) -> str:
    graphdef, state = nnx.split(abstract(config))
    tokens = jax.ShapeDtypeStruct((2, config.seq_len), jnp.int32)
    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tokens).as_text()


def test_layers_run_in_a_scan_and_hlo_is_flat_in_depth():
    two = lowered_forward_text(TINY.replace(layers=2))
    eight = lowered_forward_text(TINY.replace(layers=8))
    assert "stablehlo.while" in two
    assert len(eight) / len(two) < 1.5


def loss_and_grads(config: GPTConfig, batch):
    graphdef, state = nnx.split(build(config))

    @jax.jit
    def fn(state):
        return jax.value_and_grad(lambda s: lm_loss(nnx.merge(graphdef, s), batch))(state)

    return fn(state)


def test_remat_policies_agree():
    batch = random_batch(4, 16)
    ref_loss, ref_grads = loss_and_grads(TINY.replace(remat="none"), batch)
    for name in ("full", "dots", "offload"):
        loss, grads = loss_and_grads(TINY.replace(remat=name), batch)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        # atol: entries of ~3e-4 differ by ~1e-9 where the policies' programs fuse (and so
        # round) differently (1.4e-9 under the suite's compile flags, tests/helpers/env.py);
        # rtol: how they round depends on the host's vector units too (an AVX-512 Xeon,
        # 2026-12-03: 1.9e-8 on an entry of 4.7e-3, 4e-6 relative, where an AVX2 EPYC stayed
        # within 1e-6). The gradients are ~1e-3, and a policy that saved or recomputed the
        # wrong value is off by their own size.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-8),
                     grads, ref_grads)


# -- under a layout --------------------------------------------------------------------------


def test_sharded_loss_matches_unsharded(tiny):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rules = Rules.table([("batch", ("data", "fsdp")), ("heads", "tensor"), ("mlp", "tensor"),
                         ("vocab", "tensor")])
    graphdef, state = nnx.split(tiny)
    batch = random_batch(8, 32)

    def loss(state, batch, sharded):
        model = nnx.merge(graphdef, state)
        if not sharded:
            return lm_loss(model, batch)
        with activate(mesh, rules):
            return lm_loss(model, batch)

    grad = lambda sharded: jax.jit(  # noqa: E731
        jax.value_and_grad(lambda s, b: loss(s, b, sharded)))
    ref_loss, ref_grads = grad(False)(state, batch)
    compiled = grad(True).lower(state, batch).compile()
    sharded_loss, sharded_grads = compiled(state, batch)
    np.testing.assert_allclose(sharded_loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 sharded_grads, ref_grads)
    # The constraints took effect: the partitioned program communicates.
    assert "all-reduce" in compiled.as_text()


def test_embedding_gradient_gathers_rows_when_the_batch_has_fewer_tokens_than_the_table():
    """``gpt._lookup``: with fewer tokens than table rows, the lookup's gradient is scattered from
    the gathered rows on every device instead of reduced as a whole partial table. In a
    pipelined layout (GSPMD outside the stack) the compiled step then reduces one table-sized
    gradient (the tied unembedding's), not two, gathers the rows with their token ids in one
    all-gather, and trains like one device."""
    import re

    import optax

    from meshpar.inspect.hlo import collectives
    from meshpar.train import TrainConfig, Trainer
    from meshpar.train.data import TokenBatches

    cfg = get_preset("tiny").replace(vocab_size=2048)  # 8 x 32 = 256 tokens < 2048 rows
    batch = TokenBatches(batch_size=8, seq_len=32, seed=0).batch(0)

    def trainer(mesh, strategy, **config):
        return Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adam(1e-3), lm_loss, mesh=mesh,
                       strategy=strategy, config=TrainConfig(**config))

    piped = trainer(make_mesh(pipe=2, fsdp=4), "auto", microbatches=2)
    one = trainer(make_mesh(data=1, devices=jax.devices()[:1]), "dp")
    table_bytes = 2048 * cfg.d_model * 4
    text = piped.lower(batch).compile().as_text()
    reduced = [op for op in collectives(text, mesh=piped.mesh)
               if op.kind in ("all-reduce", "reduce-scatter") and op.result_bytes >= table_bytes]
    # One tuple all-reduce may carry several leaves: count the table-sized results in its bytes.
    assert sum(op.result_bytes // table_bytes for op in reduced) == 1, reduced
    # The token ids travel with the rows' gradients, in the same all-gather (as their bits).
    assert not re.search(r"= s32\[[\d,]*\]\S* all-gather\(", text)
    assert re.search(rf"= u32\[8,32,{cfg.d_model + 1}\]\S* all-gather\(", text)
    (loss, grads), (ref_loss, ref_grads) = piped.loss_and_grads(batch), one.loss_and_grads(batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    g, r = (np.asarray(t["tok_embed"]) for t in (grads, ref_grads))
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * np.abs(r).max())


def test_tied_table_gradient_is_one_scatter_into_the_unembeddings_gradient():
    """``gpt._lookup`` passes the table through to the tied unembedding, so in a bf16 step the
    lookup's rows are scattered into the unembedding's table gradient: no zero-filled table, one
    table-sized fp32 buffer less at the peak than with ``embed`` and ``unembed_logits`` used
    apart (the public methods), and the same gradient."""
    import re

    import optax

    from meshpar.train import TrainConfig, Trainer
    from meshpar.train.data import TokenBatches

    cfg = get_preset("tiny").replace(vocab_size=2048)
    batch = TokenBatches(batch_size=8, seq_len=32, seed=0).batch(0)

    class Apart(GPT):
        def __call__(self, tokens):
            return self.unembed_logits(self.run_layers(self.embed(tokens)))

    def trainer(cls, mesh, precision):
        return Trainer(lambda: cls(cfg, rngs=nnx.Rngs(0)), optax.adam(1e-3), lm_loss, mesh=mesh,
                       strategy="auto", config=TrainConfig(precision=precision))

    table_bytes = cfg.vocab_size * cfg.d_model * 4
    shape = rf"f32\[{cfg.vocab_size},{cfg.d_model}\]"
    zero_table = re.compile(shape + r"\S* (fusion|broadcast)\(%constant")
    temps = {}
    for cls in (GPT, Apart):
        compiled = trainer(cls, make_mesh(fsdp=8), "bf16").lower(batch).compile()
        zeros = [line for line in compiled.as_text().splitlines() if zero_table.search(line)]
        assert len(zeros) == (cls is Apart), zeros
        temps[cls] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[GPT] <= temps[Apart] - 0.75 * table_bytes, temps

    one = make_mesh(data=1, devices=jax.devices()[:1])
    grads = [trainer(cls, one, "fp32").loss_and_grads(batch)[1]["tok_embed"]
             for cls in (GPT, Apart)]
    np.testing.assert_allclose(*(np.asarray(g) for g in grads), rtol=1e-6, atol=1e-9)
