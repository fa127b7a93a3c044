"""A zoo of differently shaped Flax NNX models, each with its loss and batches.

Every model here is what a user would bring, not a variant of meshpar's GPT:

* :class:`ConvNet`: a CNN with BatchNorm (training mode, running averages) and dropout, its
  residual blocks stacked with ``nnx.vmap`` and run by ``meshpar.scan_layers`` (so the stack
  itself holds batch statistics and RNG streams); a plain mean cross-entropy and an accuracy aux.
* :class:`Encoder`: a transformer encoder with embedding dropout and a padding-masked token loss
  (``mp.Ratio``) whose rows have different lengths, so shards and microbatches hold different
  token counts; aux: token accuracy (a Ratio) and the token count (``mp.Summed``).
* :class:`MoE`: a mixture-of-experts block with top-1 routing whose load-balancing loss (a
  product of batch-wide means) is added to the loss and returned through aux.
* :class:`LinenNet`: a Flax *Linen* CNN (``nn.BatchNorm`` in training mode, ``nn.Dropout``,
  ``nn.with_logical_partitioning`` on every kernel, scale and bias) brought in by
  ``mp.from_linen``; a plain mean cross-entropy and an accuracy aux.

Each :class:`ZooModel` has a factory, a loss and ``batch(step)`` giving the global batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import meshpar as mp

init = nnx.initializers


def _p(initializer, *axes):
    return nnx.with_partitioning(initializer, axes)


def _stack(make_block: Callable[[nnx.Rngs], nnx.Module], layers: int, rngs: nnx.Rngs):
    """``layers`` blocks stacked on a leading ``layers`` axis (each with its own RNG keys)."""

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return make_block(rngs)

    return make(rngs)


# -- (1) a CNN with BatchNorm and dropout ---------------------------------------------------


class ConvBlock(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, (3, 3), padding="SAME", use_bias=False,
                             kernel_init=_p(init.lecun_normal(), None, None, "embed", "mlp"),
                             rngs=rngs)
        self.bn = nnx.BatchNorm(channels, use_running_average=False, momentum=0.9,
                                scale_init=_p(init.ones, "mlp"), bias_init=_p(init.zeros, "mlp"),
                                rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, h):
        return h + self.drop(jax.nn.relu(self.bn(self.conv(h))))


class ConvNet(nnx.Module):
    """``stack_microbatches=M`` runs the block stack once per microbatch (rows ``k, k+M, ...``,
    in order) on the whole batch's stem output: on one device, what a pipeline of ``M``
    microbatches does with the stack's dropout streams and batch statistics."""

    def __init__(self, rngs: nnx.Rngs, *, channels: int = 16, classes: int = 10, layers: int = 2,
                 stack_microbatches: int = 1):
        self.stack_microbatches = stack_microbatches
        # No bias before a BatchNorm: its gradient is zero up to rounding, which Adam would turn
        # into full-size steps of noise (a comparison of nothing).
        self.stem = nnx.Conv(3, channels, (3, 3), padding="SAME", use_bias=False,
                             kernel_init=_p(init.lecun_normal(), None, None, None, "embed"),
                             rngs=rngs)
        self.bn = nnx.BatchNorm(channels, use_running_average=False, momentum=0.9,
                                scale_init=_p(init.ones, "embed"), bias_init=_p(init.zeros, "embed"),
                                rngs=rngs)
        self.blocks = _stack(lambda r: ConvBlock(channels, r), layers, rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.head = nnx.Linear(channels, classes, kernel_init=_p(init.lecun_normal(), "embed", "vocab"),
                               bias_init=_p(init.zeros, "vocab"), rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn(self.stem(x)))
        m = self.stack_microbatches
        if m == 1:
            h = mp.scan_layers(self.blocks, h, remat="none")
        else:
            rows = h.reshape(h.shape[0] // m, m, *h.shape[1:])
            h = jnp.stack([mp.scan_layers(self.blocks, rows[:, k], remat="none")
                           for k in range(m)], axis=1).reshape(h.shape)
        return self.head(self.drop(jnp.mean(h, axis=(1, 2))))


def conv_loss(model, batch):
    logits = model(batch["image"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return jnp.mean(ce), {"accuracy": accuracy}


def conv_batch(step: int, batch_size: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return {"image": rng.normal(size=(batch_size, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, 10, size=(batch_size,)).astype(np.int32)}


# -- (2) a transformer encoder with a padding-masked token loss -----------------------------

VOCAB, SEQ, WIDTH, HEADS = 64, 16, 32, 4


class EncoderBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        dense = lambda i, o, axes: nnx.Linear(  # noqa: E731
            i, o, kernel_init=_p(init.lecun_normal(), *axes), bias_init=_p(init.zeros, axes[1]),
            rngs=rngs)
        norm = lambda: nnx.LayerNorm(  # noqa: E731
            WIDTH, scale_init=_p(init.ones, "embed"), bias_init=_p(init.zeros, "embed"), rngs=rngs)
        self.ln1, self.ln2 = norm(), norm()
        self.q, self.v = dense(WIDTH, WIDTH, ("embed", "heads")), dense(WIDTH, WIDTH, ("embed", "heads"))
        # No key bias: softmax over keys ignores it, so its gradient is zero up to rounding.
        self.k = nnx.Linear(WIDTH, WIDTH, use_bias=False, rngs=rngs,
                            kernel_init=_p(init.lecun_normal(), "embed", "heads"))
        self.o = dense(WIDTH, WIDTH, ("heads", "embed"))
        self.up = dense(WIDTH, 4 * WIDTH, ("embed", "mlp"))
        self.down = dense(4 * WIDTH, WIDTH, ("mlp", "embed"))

    def __call__(self, h):
        b, t, _ = h.shape
        x = self.ln1(h)
        split = lambda y: y.reshape(b, t, HEADS, WIDTH // HEADS)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(WIDTH // HEADS), -1)
        h = h + self.o(jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, WIDTH))
        return h + self.down(jax.nn.gelu(self.up(self.ln2(h))))


class Encoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, *, layers: int = 2):
        self.embed = nnx.Embed(VOCAB, WIDTH, embedding_init=_p(init.normal(0.02), "vocab", "embed"),
                               rngs=rngs)
        self.pos = nnx.Param(_p(init.normal(0.02), None, "embed")(rngs.params(), (SEQ, WIDTH)))
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.blocks = _stack(EncoderBlock, layers, rngs)
        self.ln = nnx.LayerNorm(WIDTH, scale_init=_p(init.ones, "embed"),
                                bias_init=_p(init.zeros, "embed"), rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, kernel_init=_p(init.lecun_normal(), "embed", "vocab"),
                               bias_init=_p(init.zeros, "vocab"), rngs=rngs)

    def __call__(self, tokens):
        h = self.drop(self.embed(tokens) + self.pos[...])
        h = mp.scan_layers(self.blocks, h, remat="full")
        return self.head(self.ln(h))


def masked_token_loss(model, batch):
    logits = model(batch["tokens"])
    mask = batch["mask"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = (jnp.argmax(logits, -1) == batch["targets"]) * mask
    return mp.Ratio(jnp.sum(ce * mask), jnp.sum(mask)), {
        "accuracy": mp.Ratio(jnp.sum(correct), jnp.sum(mask)),
        "tokens": mp.Summed(jnp.sum(mask)),
    }


def encoder_batch(step: int, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Rows of lengths 1..SEQ: every shard and microbatch holds a different token count."""
    rng = np.random.default_rng(200 + step)
    lengths = rng.integers(1, SEQ + 1, size=(batch_size,))
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.float32)
    tokens = rng.integers(1, VOCAB, size=(batch_size, SEQ)).astype(np.int32)
    return {"tokens": np.where(mask > 0, tokens, 0).astype(np.int32),
            "targets": np.roll(tokens, -1, axis=1).astype(np.int32), "mask": mask}


# -- (3) a mixture of experts with a load-balancing loss ------------------------------------

EXPERTS, EXPERT_MLP = 4, 64


class MoE(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, embedding_init=_p(init.normal(0.02), "vocab", "embed"),
                               rngs=rngs)
        self.router = nnx.Linear(WIDTH, EXPERTS, use_bias=False,
                                 kernel_init=_p(init.lecun_normal(), "embed", None), rngs=rngs)
        self.w_in = nnx.Param(_p(init.lecun_normal(), "expert", "embed", "mlp")(
            rngs.params(), (EXPERTS, WIDTH, EXPERT_MLP)))
        self.w_out = nnx.Param(_p(init.lecun_normal(), "expert", "mlp", "embed")(
            rngs.params(), (EXPERTS, EXPERT_MLP, WIDTH)))
        self.head = nnx.Linear(WIDTH, VOCAB, kernel_init=_p(init.lecun_normal(), "embed", "vocab"),
                               use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        gates = jax.nn.softmax(self.router(h), -1)                       # [b, t, e]
        choice = jax.nn.one_hot(jnp.argmax(gates, -1), EXPERTS)          # top-1 routing
        weight = choice * gates
        inner = jax.nn.gelu(jnp.einsum("btd,edm->btem", h, self.w_in[...]))
        h = h + jnp.einsum("btem,emd,bte->btd", inner, self.w_out[...], weight)
        # Switch-Transformer balance loss: a product of two batch-wide means per expert.
        balance = EXPERTS * jnp.sum(jnp.mean(choice, (0, 1)) * jnp.mean(gates, (0, 1)))
        return self.head(h), balance


def moe_loss(model, batch):
    logits, balance = model(batch["tokens"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.mean(ce) + 0.01 * balance, {"balance": balance,
                                            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["targets"])}


def moe_batch(step: int, batch_size: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(300 + step)
    tokens = rng.integers(0, VOCAB, size=(batch_size, SEQ)).astype(np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1).astype(np.int32)}


# -- (4) a Linen CNN with batch_stats and dropout, through mp.from_linen ----------------------


def _lp(initializer, *axes):
    return nn.with_logical_partitioning(initializer, axes)


class LinenNet(nn.Module):
    """Conv, BatchNorm, relu, Conv, BatchNorm, relu, mean pool, Dropout, Dense, relu, Dense."""

    # 8 channels, not 16: with 16, one Conv_1 kernel entry's gradient is 7.7e-8 by chance, and
    # Adam's first step (slope lr/eps there) turns its fp32 noise into a 2.3e-5 parameter
    # deviation (within PARAM_ATOL) that moves a later BatchNorm mean by 3.5e-6, above STATE_ATOL.
    channels: int = 8
    hidden: int = 32
    classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        lecun = nn.initializers.lecun_normal()
        # No conv bias before a BatchNorm: its gradient is zero up to rounding (see ConvNet).
        h = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False,
                    kernel_init=_lp(lecun, None, None, None, "embed"))(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                 scale_init=_lp(nn.initializers.ones, "embed"),
                                 bias_init=_lp(nn.initializers.zeros, "embed"))(h))
        h = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False,
                    kernel_init=_lp(lecun, None, None, "embed", "mlp"))(h)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                 scale_init=_lp(nn.initializers.ones, "mlp"),
                                 bias_init=_lp(nn.initializers.zeros, "mlp"))(h))
        h = nn.Dropout(0.25, deterministic=not train)(jnp.mean(h, axis=(1, 2)))
        h = nn.relu(nn.Dense(self.hidden, kernel_init=_lp(lecun, "mlp", "embed"),
                             bias_init=_lp(nn.initializers.zeros, "embed"))(h))
        return nn.Dense(self.classes, kernel_init=_lp(lecun, "embed", "vocab"),
                        bias_init=_lp(nn.initializers.zeros, "vocab"))(h)


def make_linen_net() -> nnx.Module:
    # Example inputs in training mode, so the init creates what a training call uses; only
    # their shape matters.
    return mp.from_linen(LinenNet(), np.zeros((1, 8, 8, 3), np.float32), train=True,
                         rngs=nnx.Rngs(params=0, dropout=1))


def linen_loss(model, batch):
    logits = model(batch["image"], train=True)   # the bridge returns what LinenNet returns
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.mean(ce), {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


# -- the zoo --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    make: Callable[[], nnx.Module]
    loss: Callable[[nnx.Module, Any], Any]
    batch: Callable[[int], dict[str, np.ndarray]]
    scanned: bool  # has a layer stack run by scan_layers: pipelines run it
    # The model running its stack per microbatch on one device (the reference of a pipelined
    # run), for a model with state (dropout, batch statistics) in the stack; None: no state there.
    make_stack_microbatched: Callable[[int], nnx.Module] | None = None


ZOO: dict[str, ZooModel] = {
    "convnet": ZooModel("convnet", lambda: ConvNet(nnx.Rngs(0, dropout=1)), conv_loss, conv_batch,
                        scanned=True, make_stack_microbatched=lambda m: ConvNet(
                            nnx.Rngs(0, dropout=1), stack_microbatches=m)),
    "encoder": ZooModel("encoder", lambda: Encoder(nnx.Rngs(0, dropout=1)), masked_token_loss,
                        encoder_batch, scanned=True),
    "moe": ZooModel("moe", lambda: MoE(nnx.Rngs(0)), moe_loss, moe_batch, scanned=False),
    "linen": ZooModel("linen", make_linen_net, linen_loss, conv_batch, scanned=False),
}
