"""What a loss function returns, and how meshpar adds it up over shards and microbatches.

A ``loss_fn(model, batch)`` returns ``loss`` or ``(loss, aux)``. meshpar may evaluate it on
*pieces* of the global batch: one microbatch of a gradient-accumulation loop, or one device's
rows where the step runs batch-local (ZeRO-2/3 with written-out collectives, DP/ZeRO-1
accumulation; see :attr:`meshpar.Trainer.fallbacks`). Every value is therefore carried as a
numerator and a denominator, each summed over the pieces, and divided once at the end:

* a plain scalar ``loss`` counts as the **mean over equal-sized pieces** (numerator ``loss``,
  denominator 1). That equals the full-batch value when the loss is a mean over the batch's rows
  (every row weighs the same), whatever the mesh and microbatching. A ratio whose denominator
  depends on the data, such as ``sum(mask * ce) / sum(mask)`` with padding, does *not* survive
  this: it becomes a mean of per-piece ratios. Return it as a :class:`Ratio` instead.
* ``Ratio(total, weight)``: the value is ``sum(total) / sum(weight)`` over all pieces, which is
  the full-batch value exactly (MaxText carries ``(loss sum, total weight)`` the same way). The
  weight is not differentiated. The gradient is ``sum(d total) / sum(weight)``.
* ``aux`` is a pytree whose leaves are arrays (averaged over pieces, like a plain loss),
  :class:`Ratio` values (accuracy over non-padding tokens) or :class:`Summed` values (token
  counts), each reduced accordingly and returned by :meth:`meshpar.Trainer.step`.

A step whose total loss weight is zero or not finite (a batch that is all padding) is a
non-finite step: the update is not applied (see ``TrainConfig.on_nonfinite``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from meshpar.errors import StrategyError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ratio:
    """A value meshpar reduces as ``sum(total) / sum(weight)`` over shards and microbatches.

    Attributes:
        total: the numerator of this piece, e.g. ``jnp.sum(mask * ce)``.
        weight: its denominator, e.g. ``jnp.sum(mask)``; never differentiated.

    Example:
        >>> import optax
        >>> import meshpar as mp
        >>> def loss_fn(model, batch):
        ...     ce = optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"])
        ...     return mp.Ratio(jnp.sum(batch["mask"] * ce), jnp.sum(batch["mask"]))
        >>> batch = {"x": jnp.zeros((2, 3, 4)), "y": jnp.zeros((2, 3), jnp.int32),
        ...          "mask": jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])}
        >>> ratio = loss_fn(lambda x: x, batch)         # uniform logits over 4 classes
        >>> float(ratio.weight), round(float(ratio.total / ratio.weight), 4)   # 3 tokens, ln 4
        (3.0, 1.3863)
    """

    total: Any
    weight: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Summed:
    """An aux value meshpar sums over shards and microbatches (a count), instead of averaging.

    Example:
        >>> import meshpar as mp
        >>> def loss_fn(model, batch):
        ...     loss = jnp.mean(model(batch["x"]))
        ...     return loss, {"tokens": mp.Summed(jnp.sum(batch["mask"]))}
        >>> batch = {"x": jnp.ones((2, 3)), "mask": jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])}
        >>> loss, aux = loss_fn(lambda x: x, batch)
        >>> aux["tokens"].value            # the step reports the sum over the global batch
        Array(3., dtype=float32)
    """

    value: Any


def _is_reduced(x: Any) -> bool:
    return isinstance(x, (Ratio, Summed))


@dataclasses.dataclass(frozen=True)
class OutputLayout:
    """The static shape of a loss function's output: whether the loss is a :class:`Ratio`, the
    aux pytree's structure and which of its leaves are summed rather than averaged."""

    weighted: bool
    treedef: Any
    summed: tuple[bool, ...]

    def finish(self, totals: list[jax.Array], weights: list[jax.Array]) -> Any:
        """The reduced aux values from their summed numerators and denominators."""
        return self.treedef.unflatten([
            t if s else t / w for t, w, s in zip(totals, weights, self.summed)
        ])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Piece:
    """One piece's contribution, or a sum of pieces: numerators and denominators.

    ``loss`` is what gets differentiated; everything else is carried alongside.
    """

    loss: jax.Array
    weight: jax.Array
    aux: list[jax.Array]
    aux_weight: list[jax.Array]

    def __add__(self, other: Piece) -> Piece:
        return jax.tree.map(jnp.add, self, other)


def _as_array(x: Any, what: str) -> jax.Array:
    try:
        return jnp.asarray(x)
    except TypeError:
        raise StrategyError(
            f"loss_fn returned {what} of type {type(x).__name__}; expected an array"
        ) from None


def _float(x: jax.Array) -> jax.Array:
    # Sums of pieces run in float32 whatever the compute precision (a bf16 numerator would lose
    # the low bits of the per-piece values when added up); counts become float32 too.
    return x.astype(jnp.float32)


def split_output(out: Any) -> tuple[Piece, OutputLayout]:
    """A loss function's return value as a :class:`Piece`, and its static layout.

    Raises:
        StrategyError: the loss is not a scalar (or a :class:`Ratio` of scalars), the weight is
            not a scalar, or an aux leaf is not an array, :class:`Ratio` or :class:`Summed`.

    Example:
        >>> import meshpar as mp
        >>> piece, layout = split_output((mp.Ratio(jnp.float32(3.0), jnp.float32(2.0)), {}))
        >>> float(piece.loss), float(piece.weight), layout.weighted
        (3.0, 2.0, True)
        >>> aux = {"acc": jnp.float32(0.5), "tokens": mp.Summed(jnp.float32(7.0))}
        >>> piece, layout = split_output((jnp.float32(1.5), aux))
        >>> layout.weighted, layout.summed                   # per aux leaf, in key order
        (False, (False, True))
    """
    if isinstance(out, tuple):
        if len(out) != 2:
            raise StrategyError(
                f"loss_fn returned a tuple of {len(out)} values; expected loss or (loss, aux)"
            )
        loss, aux = out
    else:
        loss, aux = out, {}
    if isinstance(loss, Summed):
        raise StrategyError("loss_fn returned a Summed loss; a loss is a scalar or a Ratio")
    if isinstance(loss, Ratio):
        total = _as_array(loss.total, "a Ratio loss total")
        weight = _as_array(loss.weight, "a Ratio loss weight")
    else:
        total, weight = _as_array(loss, "a loss"), jnp.ones((), jnp.float32)
    for name, value in (("loss", total), ("loss weight", weight)):
        if value.shape != ():
            raise StrategyError(
                f"loss_fn returned a {name} of shape {value.shape}; expected a scalar. Reduce it "
                "(jnp.mean, or mp.Ratio(jnp.sum(...), jnp.sum(weights)) for a weighted mean)"
            )
    if not jnp.issubdtype(total.dtype, jnp.floating):
        raise StrategyError(f"loss_fn returned a loss of dtype {total.dtype}; expected a float")
    flat, treedef = jax.tree_util.tree_flatten_with_path(aux, is_leaf=_is_reduced)
    totals, weights, summed = [], [], []
    for path, leaf in flat:
        key = jax.tree_util.keystr(path) or "<aux>"
        if isinstance(leaf, Ratio):
            t, w = _as_array(leaf.total, f"aux {key} total"), _as_array(leaf.weight, f"aux {key} weight")
        elif isinstance(leaf, Summed):
            t, w = _as_array(leaf.value, f"aux {key}"), jnp.zeros((), jnp.float32)
        else:
            t, w = _as_array(leaf, f"aux {key}"), jnp.ones((), jnp.float32)
        totals.append(_float(t))
        weights.append(jax.lax.stop_gradient(_float(w)))
        summed.append(isinstance(leaf, Summed))
    piece = Piece(_float(total), jax.lax.stop_gradient(_float(weight)), totals, weights)
    return piece, OutputLayout(isinstance(loss, Ratio), treedef, tuple(summed))
