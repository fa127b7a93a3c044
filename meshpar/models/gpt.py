"""meshpar's built-in decoder-only GPT, in Flax NNX.

The model is an ordinary user of meshpar: it knows nothing of meshes or strategies. It only

* annotates every parameter with *logical* axis names (``out_sharding`` metadata), and
* passes activations, and every weight right before its use, through
  :func:`meshpar.parallel.layout.constrain` with their logical names.

Which mesh axes those names land on is the strategy's business. Constraining the weights inside
the layer loop is what makes ZeRO-3 work: the parameter rules shard a weight over ``fsdp`` and the
compute rules do not, so the constraint all-gathers one layer's weights inside the scan body.

Shapes in names follow nanodo: ``B`` batch, ``T`` sequence, ``D`` d_model (``embed``), ``H`` heads,
``K`` head_dim, ``M`` mlp_dim, ``V`` vocab, ``L`` layers.

Logical axes of the parameters::

    tok_embed            (vocab, embed)
    pos_embed            (seq, embed)
    blocks/ln1_scale     (layers, embed)            blocks/ln1_bias  (layers, embed)
    blocks/wq, wk, wv    (layers, embed, heads, head_dim)
    blocks/wo            (layers, heads, head_dim, embed)
    blocks/ln2_scale     (layers, embed)            blocks/ln2_bias  (layers, embed)
    blocks/w_in          (layers, embed, mlp)       blocks/b_in      (layers, mlp)
    blocks/w_out         (layers, mlp, embed)       blocks/b_out     (layers, embed)
    ln_f_scale, ln_f_bias (embed,)
    unembed              (embed, vocab)             only when tie_embeddings=False

Non-parameter state: none, unless ``config.dropout > 0``; then two RNG streams,
``embed_dropout/rngs`` and ``final_dropout/rngs`` (a key and a counter each), for the dropout
on the embedding output and on the last hidden state (see :class:`GPT`).

Length: about 560 lines, one concept (the built-in GPT): its config and presets, the bf16 einsum
it runs its matmuls through on XLA:CPU (most of it the reasons), the block and the model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from meshpar.backend.bf16 import BF16Dots, bf16_dots
from meshpar.errors import MeshparError, is_int
from meshpar.parallel.layout import constrain
from meshpar.parallel.remat import check_remat_name
from meshpar.parallel.stack import scan_layers

_INT_FIELDS = ("vocab_size", "seq_len", "layers", "d_model", "heads", "mlp_dim")

#: Logical axes of one block's parameters (without the stacked ``layers`` axis). The same table
#: annotates the parameters at creation and constrains the weight slices inside the scan body.
BLOCK_AXES: Mapping[str, tuple[str, ...]] = {
    "ln1_scale": ("embed",),
    "ln1_bias": ("embed",),
    "wq": ("embed", "heads", "head_dim"),
    "wk": ("embed", "heads", "head_dim"),
    "wv": ("embed", "heads", "head_dim"),
    "wo": ("heads", "head_dim", "embed"),
    "ln2_scale": ("embed",),
    "ln2_bias": ("embed",),
    "w_in": ("embed", "mlp"),
    "b_in": ("mlp",),
    "w_out": ("mlp", "embed"),
    "b_out": ("embed",),
}

_INIT_STD = 0.02
_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of :class:`GPT`.

    Attributes:
        vocab_size: number of token ids (256 for meshpar's byte-level corpus).
        seq_len: the longest sequence (size of the learned position table).
        layers: number of transformer blocks.
        d_model: width of the residual stream (logical axis ``embed``).
        heads: attention heads.
        mlp_dim: hidden width of the MLP.
        head_dim: width of one head; ``None`` means ``d_model // heads`` (see :attr:`head_size`).
        tie_embeddings: use the token embedding as the unembedding (no separate parameter).
        remat: the remat policy of the layer scan body, one of
            :data:`meshpar.parallel.remat.REMAT_POLICIES`.
        dropout: dropout rate in ``[0, 1)`` on the embedding output and on the last hidden
            state before the final LayerNorm, outside the layer stack (see :class:`GPT`).
            ``0.0`` (the default) builds the model without dropout and without RNG state.

    Raises:
        MeshparError: a size is not a positive int, ``d_model`` is not divisible by
            ``heads`` while ``head_dim`` is ``None``, or ``dropout`` is not a number in
            ``[0, 1)``.
        StrategyError: an unknown ``remat`` name.

    Example:
        >>> cfg = GPTConfig(vocab_size=256, seq_len=32, layers=2, d_model=64, heads=4, mlp_dim=256)
        >>> cfg.head_size, cfg.param_count()
        (16, 118016)
        >>> cfg.replace(layers=4).layers
        4
    """

    vocab_size: int
    seq_len: int
    layers: int
    d_model: int
    heads: int
    mlp_dim: int
    head_dim: int | None = None
    tie_embeddings: bool = True
    remat: str = "full"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for field in _INT_FIELDS:
            _check_positive_int(field, getattr(self, field))
        if self.head_dim is None:
            if self.d_model % self.heads:
                raise MeshparError(
                    f"GPTConfig: d_model={self.d_model} is not divisible by heads={self.heads}; "
                    "choose sizes that divide or set head_dim explicitly"
                )
        else:
            _check_positive_int("head_dim", self.head_dim)
        if not isinstance(self.tie_embeddings, bool):
            raise MeshparError(
                f"GPTConfig: tie_embeddings={self.tie_embeddings!r} must be a bool"
            )
        check_remat_name(self.remat, field="GPTConfig.remat")
        rate = self.dropout
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
            raise MeshparError(
                f"GPTConfig: dropout={rate!r} must be a number in [0, 1) (the probability of "
                "dropping an activation; 0 turns dropout off)"
            )
        object.__setattr__(self, "dropout", float(rate))  # 0 and 0.0 compare and save alike

    @property
    def head_size(self) -> int:
        """The width of one attention head: ``head_dim``, or ``d_model // heads`` if unset."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.heads

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with some fields changed (validated again).

        Example:
            >>> get_preset("tiny").replace(remat="none").remat
            'none'
        """
        return dataclasses.replace(self, **changes)

    def param_count(self) -> int:
        """The number of parameters of the model this config builds (analytic, exact).

        Example:
            >>> get_preset("20m").param_count()
            19165184
        """
        d, m, v = self.d_model, self.mlp_dim, self.vocab_size
        attn = 4 * d * self.heads * self.head_size  # q, k, v, o kernels; no attention biases
        mlp = 2 * d * m + m + d  # kernels and biases
        norms = 4 * d  # ln1 and ln2, scale and bias
        per_layer = attn + mlp + norms
        total = v * d + self.seq_len * d + self.layers * per_layer + 2 * d
        if not self.tie_embeddings:
            total += d * v
        return total

    def matmul_param_count(self) -> int:
        """Parameters that take part in matmuls: all kernels and the unembedding.

        The unembedding counts once, whether it is the tied token embedding or its own kernel;
        the token lookup (untied case), the position embedding, norms and biases do not count.
        ``6 * matmul_param_count()`` is the usual training FLOPs per token, attention scores aside.

        Example:
            >>> get_preset("tiny").matmul_param_count()
            114688
        """
        d = self.d_model
        per_layer = 4 * d * self.heads * self.head_size + 2 * d * self.mlp_dim
        return self.layers * per_layer + d * self.vocab_size


def _check_positive_int(field: str, value: object) -> None:
    if not is_int(value, minimum=1, numpy=False):
        raise MeshparError(f"GPTConfig: {field}={value!r} must be a positive int")


#: Ready-made sizes. ``tiny`` for unit tests, ``small`` for quick runs (the design notes' timing
#: model), ``20m`` (19.2M parameters) for the demonstration run.
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab_size=256, seq_len=32, layers=2, d_model=64, heads=4, mlp_dim=256),
    "small": GPTConfig(vocab_size=256, seq_len=128, layers=4, d_model=256, heads=8, mlp_dim=1024),
    "20m": GPTConfig(vocab_size=256, seq_len=256, layers=6, d_model=512, heads=8, mlp_dim=2048),
}


def get_preset(name: str, /, **overrides: Any) -> GPTConfig:
    """A preset config by name, optionally with some fields changed.

    Args:
        name: a key of :data:`PRESETS`.
        **overrides: fields to change, e.g. ``remat="none"``.

    Raises:
        MeshparError: an unknown name (the message lists the presets), or an invalid override.

    Example:
        >>> get_preset("small", layers=2).layers
        2
    """
    try:
        config = PRESETS[name]
    except (KeyError, TypeError):
        raise MeshparError(
            f"unknown GPT preset {name!r}; presets are " + ", ".join(repr(n) for n in PRESETS)
        ) from None
    return config.replace(**overrides) if overrides else config


# -- layers ------------------------------------------------------------------------------------


def _dropout_stream(rngs: nnx.Rngs, rate: float) -> nnx.RngStream:
    """The stream the dropout layers fork theirs from: ``rngs.dropout``, else the default one."""
    try:
        return rngs["dropout"]
    except KeyError:
        streams = ", ".join(repr(n) for n, v in vars(rngs).items() if isinstance(v, nnx.RngStream))
        raise MeshparError(
            f"GPT: config.dropout={rate} needs a 'dropout' RNG stream, but rngs has only "
            f"{streams or 'no streams'}; pass nnx.Rngs(seed) (the dropout keys then come from "
            "the seed) or nnx.Rngs(params=..., dropout=...)"
        ) from None


def _layer_norm(x_BTD: jax.Array, scale_D: jax.Array, bias_D: jax.Array) -> jax.Array:
    """LayerNorm with statistics in float32; the result has the dtype of ``x``."""
    x = x_BTD.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + _LN_EPS)
    y = y * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)
    return y.astype(x_BTD.dtype)


# -- the embedding lookup ----------------------------------------------------------------------


@jax.custom_vjp
def _lookup(table_VD: jax.Array, tokens_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(jnp.take(table, tokens, axis=0), table)``: the rows, and the table passed through.

    Two things about the gradient, both measured on issue 13's model (vocabulary 32000):

    * Autodiff's gradient of ``take`` is a scatter-add of each device's own rows into a whole
      zero table, a partial sum that the layout then reduces over the batch axes: an all-reduce
      (or reduce-scatter) of the whole ``[vocab, embed]`` table, beside the tied unembedding's own
      (``pipe=2,fsdp=4``: two all-reduces of ``f32[32000,256]``, 14% of the step's op time). So
      where the batch has fewer tokens than the table has rows, the backward pass gathers the
      rows and their token ids instead (``B x T x D`` values, 32x fewer there). Inside a
      ``shard_map`` that is manual over the batch axes (the batch-local paths) that gather is a
      no-op and the partial table is reduced with the other gradients, once.
    * A tied unembedding that uses the *passed-through* table hands its gradient to this
      backward pass as the second cotangent, and the rows are scattered straight into it. Used
      apart, in bf16 (where XLA does not fold the add into the scatter, as it does in fp32) the
      rows went into a zero-filled fp32 table that was then added to the unembedding's
      gradient, both alive at once: the small model's bf16 step held 16-32 MB more temporaries
      (``fsdp=8`` 85 -> 69 MB, ``fsdp=4,tensor=2`` 70 -> 45, ``pipe=2,fsdp=4`` 105 -> 73), and
      its step took 0.86-0.93x the time on the last two (``fsdp=8``: unchanged). Untied, the
      second cotangent is zeros and the scatter goes into those, as before.
    """
    return jnp.take(table_VD, tokens_BT, axis=0), table_VD


def _lookup_fwd(table_VD, tokens_BT):
    return _lookup(table_VD, tokens_BT), tokens_BT


def _lookup_bwd(tokens_BT, cotangents):
    g_BTD, g_VD = cotangents
    if tokens_BT.size < g_VD.shape[0]:
        g_BTD, tokens_BT = _gathered_rows(g_BTD, tokens_BT)
    return g_VD.at[tokens_BT].add(g_BTD.astype(g_VD.dtype)), None


def _gathered_rows(g_BTD: jax.Array, tokens_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The rows' gradients and their token ids on every device, in one all-gather: both as the
    unsigned integers of the gradient's width, side by side along ``D``, so the bits come back
    exactly (a float all-gather on XLA:CPU goes through fp32, which need not keep a NaN's bits).
    Two gathers cost two rendezvous (issue 13's ``pipe=2,fsdp=4``: the 4 KB token gather alone
    was 3.1% of the step's op time)."""
    bits = jnp.dtype(f"uint{8 * g_BTD.dtype.itemsize}")
    g_bits = jax.lax.bitcast_convert_type(g_BTD, bits)
    ids = jax.lax.bitcast_convert_type(tokens_BT.astype(jnp.int32), bits)
    ids = ids.reshape(*tokens_BT.shape, -1)   # [B, T, 4 / itemsize]
    both = constrain(jnp.concatenate([g_bits, ids], axis=-1), (None, None, None))
    d = g_BTD.shape[-1]
    ids = jax.lax.bitcast_convert_type(both[..., d:].reshape(ids.shape), jnp.int32)
    return jax.lax.bitcast_convert_type(both[..., :d], g_BTD.dtype), ids.reshape(tokens_BT.shape)


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


# -- matmuls -----------------------------------------------------------------------------------
#
# Every matmul of the model goes through `_einsum`. In fp32 it is `jnp.einsum`. In bf16 it is,
# where the dot is in canonical form (below), a bf16 x bf16 -> fp32 dot
# (`preferred_element_type=float32`) rounded to bf16, in the forward AND the backward pass:
# XLA:CPU (jaxlib 0.10.2) hands only that form to its fast bf16 (YNNPACK) kernels. A bf16 -> bf16
# dot is upcast whole to fp32 by its float normalization (two operand converts, an fp32 dot, a
# result convert): 1.1-2.6x an fp32 dot, against 0.2-0.7x for the bf16 -> fp32 form
# (benchmarks/README.md, "bf16 matmuls on XLA:CPU"). Plain autodiff of the bf16 -> fp32 form
# would not do: its cotangent is fp32, so the backward dots would be fp32 x fp32. The numbers are
# those of a bf16 dot: fp32 accumulation, one rounding to bf16. (Those ratios are of a CPU with
# AVX512-BF16. On a CPU without bf16 dot instructions, by default, every bf16 matmul is instead an
# fp32 dot of the widened operands, same numbers: `meshpar.backend.bf16`.)
#
# Canonical form: a dot without batch dims (XLA transposes its operands into a plain matmul),
# or, batch dims aside, an lhs [free..., contracted...] and an rhs [contracted..., free...] or
# [free..., contracted...], contracted dims in the same order. Other bf16 -> fp32 dots (in
# attention, the gradients of k and v) are NOT safe on this XLA: its operand
# upcaster may leave them bf16 while the YNNPACK fusion then declines them, and the fallback dot
# fails at run time ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"). They
# stay bf16 -> bf16 dots, which XLA runs in fp32 (as before; the same numbers).


def _canonical(spec: str) -> bool:
    """Whether the dot of einsum ``spec`` ("x,y->z") has the canonical form described above."""
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    if len(set(sa) | set(sb)) != len(set(spec) - set(",->")):
        return False
    # XLA moves batch dims to the front itself; the other dims keep their order.
    lhs = [i for i in sa if not (i in sb and i in out)]
    rhs = [i for i in sb if not (i in sa and i in out)]
    contract = [i for i in lhs if i in rhs]
    nc = len(contract)
    if not nc:
        return False
    if len(lhs) == len(sa):
        # No batch dims: XLA's dot decomposer transposes the operands of a plain matmul into
        # [M, K] x [K, N] itself, and YNNPACK takes the result (the weight gradients).
        return True
    if [i for i in rhs if i in contract] != contract:
        return False
    return lhs[len(lhs) - nc:] == contract and contract in (rhs[:nc], rhs[len(rhs) - nc:])


def _cotangent_specs(spec: str) -> tuple[str, str]:
    """The einsum specs of the two operands' gradients of ``einsum(spec, a, b)``: ``(g, b) ->
    da`` and ``(a, g) -> db``."""
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    return f"{out},{sb}->{sa}", f"{sa},{out}->{sb}"


def _weight_grad(spec: str, a: jax.Array, g: jax.Array) -> jax.Array:
    """The gradient of ``b`` in ``einsum(spec, a, b)`` from the result's cotangent ``g``
    (``einsum("{a},{out}->{b}", a, g)``), written as an ``[M, K] x [K, N]`` matmul.

    A weight's gradient contracts the batch and token dimensions, which lead both operands.
    Left to itself, XLA:CPU (jaxlib 0.10.2, fp32) transposes one operand and keeps the other
    contracted on its first dimension: a form YNNPACK declines, so the dot runs on Eigen
    (oneDNN's sgemm), 3.1 ms against YNNPACK's 1.6 ms with the transposed copy for a
    ``[256, 256] x [256, 1024]`` gradient on one core. Here the operand whose free dimensions
    lead the result is transposed to ``[free..., contracted...]`` and kept so by an
    optimisation barrier (XLA's simplifier folds a bare transpose back into the dot). Same
    products, same sums. A spec with a dimension in all three terms, or whose result is not
    one operand's free dimensions followed by the other's, takes the plain einsum.
    """
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    contract = [i for i in sa if i in out and i not in sb]
    a_free = [i for i in sa if i in sb]
    g_free = [i for i in out if i in sb]
    if not contract or set(sa) & set(sb) & set(out):
        return jnp.einsum(_cotangent_specs(spec)[1], a, g)
    if sb == "".join(a_free + g_free):
        lhs, ls, free, rhs, rs = a, sa, a_free, g, out
    elif sb == "".join(g_free + a_free):
        lhs, ls, free, rhs, rs = g, out, g_free, a, sa
    else:
        return jnp.einsum(_cotangent_specs(spec)[1], a, g)
    lhs_t = jax.lax.optimization_barrier(
        jnp.transpose(lhs, [ls.index(i) for i in free + contract]))
    nf = len(free)
    dims = ((tuple(range(nf, nf + len(contract))), tuple(rs.index(i) for i in contract)), ((), ()))
    return jax.lax.dot_general(lhs_t, rhs, dims)


def _einsum_plain(spec: str, a: jax.Array, b: jax.Array, out_dtype: Any) -> jax.Array:
    # jnp.einsum, result in out_dtype (None: the operands' dtype).
    out = jnp.einsum(spec, a, b, preferred_element_type=out_dtype)
    return out if out_dtype is None else out.astype(out_dtype)


def _custom_einsum(impl: Callable, bwd: Callable) -> Callable:
    """``impl(spec, a, b, out_dtype)``, differentiated by ``bwd(spec, out_dtype, (a, b), g)``."""
    f = jax.custom_vjp(impl, nondiff_argnums=(0, 3))
    f.defvjp(lambda spec, a, b, out_dtype: (impl(spec, a, b, out_dtype), (a, b)), bwd)
    return f


def _einsum_w_bwd(spec, out_dtype, res, g):
    # What autodiff of the einsum gives, the weight's gradient in the matmul form above.
    a, b = res
    g = g.astype(jnp.result_type(a, b))
    da = jnp.einsum(_cotangent_specs(spec)[0], g, b).astype(a.dtype)
    return da, _weight_grad(spec, a, g).astype(b.dtype)


#: An fp32 einsum whose second operand is a weight (see :func:`_weight_grad`).
_einsum_w = _custom_einsum(_einsum_plain, _einsum_w_bwd)


def _einsum_bf16_impl(spec: str, a: jax.Array, b: jax.Array, out_dtype: Any) -> jax.Array:
    if bf16_dots() is BF16Dots.FP32:
        # A CPU without bf16 dot instructions (or MESHPAR_BF16_DOTS=fp32): XLA's fp32 dot of
        # the widened operands, the same numbers (meshpar.backend.bf16), faster there than any
        # bf16 form.
        f32 = jnp.float32
        return jnp.einsum(spec, a.astype(f32), b.astype(f32)).astype(out_dtype)
    if _canonical(spec):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)
    return jnp.einsum(spec, a, b).astype(out_dtype)


def _einsum_bf16_bwd(spec, out_dtype, res, g):
    a, b = res
    da_spec, db_spec = _cotangent_specs(spec)
    # The cotangent of a bf16 result is bf16 already; that of the fp32 logits is rounded here,
    # as in a bf16 unembedding.
    g = g.astype(jnp.bfloat16)
    return (_einsum_bf16_impl(da_spec, g, b, a.dtype),
            _einsum_bf16_impl(db_spec, a, g, b.dtype))


_einsum_bf16 = _custom_einsum(_einsum_bf16_impl, _einsum_bf16_bwd)


def _einsum(spec: str, a: jax.Array, b: jax.Array, *, out_dtype: Any = None,
            weight: bool = False) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` (result in ``out_dtype``, default the operands' dtype).

    bf16 operands take the bf16 x bf16 -> fp32 form above. ``spec`` is ``"x,y->z"`` with no
    index that is summed within one operand (each index is in two of x, y, z). ``weight``: ``b``
    is a weight whose fp32 gradient XLA:CPU would otherwise compute on Eigen
    (:func:`_weight_grad`); the bf16 path's widened dots already reach YNNPACK.
    """
    if a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16:
        return _einsum_bf16(spec, a, b, jnp.dtype(out_dtype or jnp.bfloat16))
    return (_einsum_w if weight else _einsum_plain)(spec, a, b, out_dtype)


class Block(nnx.Module):
    """One pre-LayerNorm transformer block: causal self-attention, then a GELU MLP.

    :class:`GPT` creates ``layers`` of these at once with ``nnx.vmap`` (stacked parameters with a
    leading ``layers`` axis) and runs them with ``lax.scan``; a single block also works alone.

    Example:
        >>> with nnx.use_eager_sharding(False):
        ...     block = Block(get_preset("tiny"), rngs=nnx.Rngs(0))
        >>> block(jnp.zeros((2, 8, 64))).shape
        (2, 8, 64)
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        d, h, k, m = config.d_model, config.heads, config.head_size, config.mlp_dim
        normal = nnx.initializers.normal(_INIT_STD)
        # GPT-2: residual-branch output projections scaled down by sqrt(2 * layers).
        normal_out = nnx.initializers.normal(_INIT_STD / math.sqrt(2 * config.layers))

        def param(name: str, value: jax.Array) -> nnx.Param:
            return nnx.Param(value, out_sharding=BLOCK_AXES[name])

        self.ln1_scale = param("ln1_scale", jnp.ones((d,), jnp.float32))
        self.ln1_bias = param("ln1_bias", jnp.zeros((d,), jnp.float32))
        self.wq = param("wq", normal(rngs.params(), (d, h, k), jnp.float32))
        self.wk = param("wk", normal(rngs.params(), (d, h, k), jnp.float32))
        self.wv = param("wv", normal(rngs.params(), (d, h, k), jnp.float32))
        self.wo = param("wo", normal_out(rngs.params(), (h, k, d), jnp.float32))
        self.ln2_scale = param("ln2_scale", jnp.ones((d,), jnp.float32))
        self.ln2_bias = param("ln2_bias", jnp.zeros((d,), jnp.float32))
        self.w_in = param("w_in", normal(rngs.params(), (d, m), jnp.float32))
        self.b_in = param("b_in", jnp.zeros((m,), jnp.float32))
        self.w_out = param("w_out", normal_out(rngs.params(), (m, d), jnp.float32))
        self.b_out = param("b_out", jnp.zeros((d,), jnp.float32))

    def _w(self, name: str) -> jax.Array:
        # The weight, constrained to its compute layout: gathers ZeRO-3 shards here, per layer.
        return constrain(getattr(self, name)[...], BLOCK_AXES[name])

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        """Apply the block to the residual stream ``x`` of shape ``[B, T, D]``."""
        x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
        x_BTD = x_BTD + self._attention(_layer_norm(x_BTD, self._w("ln1_scale"), self._w("ln1_bias")))
        x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
        x_BTD = x_BTD + self._mlp(_layer_norm(x_BTD, self._w("ln2_scale"), self._w("ln2_bias")))
        return constrain(x_BTD, ("batch", "seq", "embed"))

    def _attention(self, h_BTD: jax.Array) -> jax.Array:
        # The sequence dimension of q/k/v is deliberately unnamed (None): under sequence parallel
        # the rules map `seq` to the mesh axis that `heads` uses, and attention needs all of it.
        qkv_axes = ("batch", None, "heads", "head_dim")
        # One matmul for q, k and v: under tensor parallel the backward pass then reduces one
        # summed input gradient over `tensor` instead of three (-27% of its traffic).
        w_DCHK = constrain(
            jnp.stack([self._w("wq"), self._w("wk"), self._w("wv")], axis=1),
            ("embed", None, "heads", "head_dim"),
        )
        # [B, T, 3, H, K]: the input gradient then contracts trailing dims (a fast bf16 dot).
        qkv_BTCHK = _einsum("btd,dchk->btchk", h_BTD, w_DCHK)
        # Split, not indexed three times: the backward pass then concatenates the three
        # gradients, where indexing padded each to [B, T, 3, H, K] and added them up (in bf16 a
        # rounding pass per add; 20m preset, fsdp=8: 5% of op time).
        q_BTHK, k_BTHK, v_BTHK = (constrain(part[:, :, 0], qkv_axes)
                                  for part in jnp.split(qkv_BTCHK, 3, axis=2))
        t = h_BTD.shape[1]
        q_BTHK = q_BTHK * jnp.asarray(1.0 / math.sqrt(q_BTHK.shape[-1]), q_BTHK.dtype)
        scores_BHTS = _einsum("bthk,bshk->bhts", q_BTHK, k_BTHK).astype(jnp.float32)
        scores_BHTS = constrain(scores_BHTS, ("batch", "heads", None, None))
        causal_TS = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
        scores_BHTS = jnp.where(causal_TS, scores_BHTS, jnp.finfo(jnp.float32).min)
        probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BTHK.dtype)
        out_BTHK = _einsum("bhts,bshk->bthk", probs_BHTS, v_BTHK)
        out_BTHK = constrain(out_BTHK, qkv_axes)
        out_BTD = _einsum("bthk,hkd->btd", out_BTHK, self._w("wo"))
        return constrain(out_BTD, ("batch", "seq", "embed"))

    def _mlp(self, h_BTD: jax.Array) -> jax.Array:
        # The bias and GELU run on the matmul's float32 result and are rounded once, to the
        # compute dtype. Written in bf16, every one of GELU's ten elementwise steps is rounded
        # to bf16 (XLA:CPU computes each in fp32 and converts back and forth in between), in
        # the forward pass, the recompute and the backward pass (20m preset, fsdp=8: those
        # convert chains were 8% of the step's op time). Float32: the same operations.
        # `weight=True`: in fp32 these two weights' gradients were XLA:CPU's only dots outside
        # YNNPACK (issue 13's small model, fsdp=8 and data=8; those of wq/wk/wv and wo were in).
        hidden_BTM = _einsum("btd,dm->btm", h_BTD, self._w("w_in"), out_dtype=jnp.float32,
                             weight=True)
        hidden_BTM = jax.nn.gelu(hidden_BTM + self._w("b_in").astype(jnp.float32))
        hidden_BTM = constrain(hidden_BTM.astype(h_BTD.dtype), ("batch", None, "mlp"))
        out_BTD = (_einsum("btm,md->btd", hidden_BTM, self._w("w_out"), weight=True)
                   + self._w("b_out"))
        return constrain(out_BTD, ("batch", "seq", "embed"))


class GPT(nnx.Module):
    """A decoder-only transformer language model (GPT-2 style, learned positions, pre-LN).

    Parameters are created in float32; the forward pass computes in the dtype of the parameters
    (cast them to bfloat16 for mixed precision), except LayerNorm statistics, the softmax and
    the MLP's bias and GELU, which run in float32 (rounded once to the compute dtype). Logits
    are always float32.

    Dropout (``config.dropout > 0``) is applied twice, both times *outside* the layer stack: to
    the embedding output (token plus position) and to the last hidden state before the final
    LayerNorm and the unembedding. So every layout runs it, pipelines included, and trains like
    one device (JAX's threefry is partitionable: the global mask is the same whatever the
    sharding). There is no residual dropout inside the scanned blocks: a pipeline runs the stack
    once per microbatch, so RNG state there would draw per-microbatch masks (exact against a
    one-device run with the same microbatching, see :mod:`meshpar.parallel.pipeline`, but not
    against an unpipelined run). Each dropout layer owns an RNG stream that
    advances on every call: a new mask every step, saved and restored with the checkpoint.

    Dropout is active by default (training mode). ``model.eval()`` makes the model deterministic
    (for evaluation and sampling), ``model.train()`` turns dropout back on; ``nnx.view(model,
    deterministic=True)`` gives a deterministic view without changing ``model``. With
    ``dropout=0.0`` the model holds no RNG state at all (only parameters), so
    meshpar may run its step batch-local (``TrainConfig(row_separable=True)``).

    Args:
        config: the model's sizes.
        rngs: random streams; ``rngs.params`` initialises the weights. With dropout,
            ``rngs.dropout`` seeds the dropout streams: ``nnx.Rngs(seed)`` works (``params`` and
            ``dropout`` both fall back to its default stream, and the dropout keys are drawn
            after all weights, so the weights do not depend on the dropout rate), as does
            ``nnx.Rngs(params=seed, dropout=other_seed)``. ``nnx.Rngs(params=seed)`` alone is
            an error when ``dropout > 0``.

    Raises:
        MeshparError: ``config`` is not a :class:`GPTConfig`, or ``dropout > 0`` and ``rngs`` has
            neither a ``dropout`` nor a default stream.

    Example:
        >>> cfg = get_preset("tiny")
        >>> with nnx.use_eager_sharding(False):
        ...     model = GPT(cfg, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 16), jnp.int32)).shape
        (2, 16, 256)
        >>> with nnx.use_eager_sharding(False):
        ...     model = GPT(cfg.replace(dropout=0.1), rngs=nnx.Rngs(0))
        >>> model.eval()   # no dropout: evaluation, sampling; model.train() turns it back on
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, GPTConfig):
            raise MeshparError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        d, v = config.d_model, config.vocab_size
        normal = nnx.initializers.normal(_INIT_STD)
        self.tok_embed = nnx.Param(
            normal(rngs.params(), (v, d), jnp.float32), out_sharding=("vocab", "embed")
        )
        self.pos_embed = nnx.Param(
            normal(rngs.params(), (config.seq_len, d), jnp.float32), out_sharding=("seq", "embed")
        )

        @nnx.split_rngs(splits=config.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.ln_f_scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("embed",))
        self.ln_f_bias = nnx.Param(jnp.zeros((d,), jnp.float32), out_sharding=("embed",))
        if not config.tie_embeddings:
            self.unembed = nnx.Param(
                normal(rngs.params(), (d, v), jnp.float32), out_sharding=("embed", "vocab")
            )
        # Last: the dropout keys are drawn after every weight, so that the weights of a given
        # seed are the same whatever the dropout rate. Rate 0: identity layers without RNG state.
        stream = _dropout_stream(rngs, config.dropout) if config.dropout > 0 else None
        self.embed_dropout = nnx.Dropout(config.dropout, rngs=stream)
        self.final_dropout = nnx.Dropout(config.dropout, rngs=stream)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """Logits ``float32[B, T, vocab]`` for int tokens ``[B, T]`` (``T <= seq_len``)."""
        x_BTD, table_VD = self._embed(tokens_BT)
        x_BTD = self.run_layers(self._dropout(self.embed_dropout, x_BTD))
        return self._unembed(self._dropout(self.final_dropout, x_BTD), table_VD)

    @staticmethod
    def _dropout(layer: nnx.Dropout, x_BTD: jax.Array) -> jax.Array:
        # Outside the layer stack, on the global [B, T, D] activation: under jit the mask is drawn
        # for the global shape, so it is the same bits on every layout.
        if layer.rate == 0 or layer.deterministic:
            return x_BTD
        return constrain(layer(x_BTD), ("batch", "seq", "embed"))

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        """Token plus position embedding: the residual stream ``[B, T, D]`` entering block 0."""
        return self._embed(tokens_BT)[0]

    def _embed(self, tokens_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        # The embedding and the token table as the lookup passes it through, for a tied
        # unembedding to use (so that its gradient meets the lookup's in one scatter: _lookup).
        if tokens_BT.ndim != 2:
            raise MeshparError(f"GPT: tokens must have shape [batch, seq], got {tokens_BT.shape}")
        if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
            raise MeshparError(f"GPT: tokens must be integers, got dtype {tokens_BT.dtype}")
        t = tokens_BT.shape[1]
        if t > self.config.seq_len:
            raise MeshparError(
                f"GPT: the sequence has {t} tokens but config.seq_len={self.config.seq_len} "
                "(the size of the position table); use shorter sequences or a larger seq_len"
            )
        table_VD = constrain(self.tok_embed[...], ("vocab", "embed"))
        pos_SD = constrain(self.pos_embed[...], ("seq", "embed"))
        rows_BTD, table_VD = _lookup(table_VD, tokens_BT)
        return constrain(rows_BTD + pos_SD[:t][None], ("batch", "seq", "embed")), table_VD

    def run_layers(self, x_BTD: jax.Array) -> jax.Array:
        """All blocks, as one ``lax.scan`` over the stacked block parameters.

        The scan body is wrapped with the config's remat policy, so under ZeRO-3 each layer's
        weights are gathered in the forward pass and again in the backward pass, never all kept.
        """
        return scan_layers(self.blocks, x_BTD, remat=self.config.remat)

    def unembed_logits(self, x_BTD: jax.Array) -> jax.Array:
        """Final LayerNorm and the projection to ``float32`` logits ``[B, T, V]``."""
        return self._unembed(x_BTD, self.tok_embed[...])

    def _unembed(self, x_BTD: jax.Array, table_VD: jax.Array) -> jax.Array:
        # table_VD: the token table, used when the embeddings are tied.
        scale = constrain(self.ln_f_scale[...], ("embed",))
        bias = constrain(self.ln_f_bias[...], ("embed",))
        h_BTD = _layer_norm(x_BTD, scale, bias)
        if self.config.tie_embeddings:
            table_VD = constrain(table_VD, ("vocab", "embed"))
            logits = _einsum("btd,vd->btv", h_BTD, table_VD, out_dtype=jnp.float32)
        else:
            kernel_DV = constrain(self.unembed[...], ("embed", "vocab"))
            logits = _einsum("btd,dv->btv", h_BTD, kernel_DV, out_dtype=jnp.float32)
        return constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))


def lm_loss(model: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy in float32.

    Args:
        model: a module mapping int tokens ``[B, T]`` to logits ``[B, T, V]`` (e.g. :class:`GPT`).
        batch: ``{"inputs": int32[B, T], "targets": int32[B, T]}``.

    Returns:
        A float32 scalar: the mean over all ``B * T`` target tokens.

    Example:
        >>> from meshpar.train.data import TokenBatches
        >>> with nnx.use_eager_sharding(False):
        ...     model = GPT(get_preset("tiny"), rngs=nnx.Rngs(0))
        >>> loss = lm_loss(model, TokenBatches(batch_size=4, seq_len=32).batch(0))
        >>> loss.dtype, 5.0 < float(loss) < 6.0        # untrained: about ln 256
        (dtype('float32'), True)
    """
    logits_BTV = model(batch["inputs"]).astype(jnp.float32)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    return losses_BT.mean()
