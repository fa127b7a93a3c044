"""The paths a train step's gradients take: GSPMD's scan, manual ZeRO, local accumulation.

:class:`~meshpar.train.trainer.Trainer` decides at construction which path applies (and lists
every departure from the strategy's usual path as a :class:`Fallback`); :class:`GradientPaths`
holds the paths themselves, as methods the Trainer inherits, since each reads the decisions and
layouts the Trainer set up (``_manual_zero``, ``_local_accumulation``, ``_batch_spec``, the loss
piece ``_piece``):

* **GSPMD** (:meth:`GradientPaths._summed`): ``jax.value_and_grad`` of the loss, microbatches
  under ``lax.scan`` with the accumulator constrained to the gradient layout (under ZeRO-2 each
  microbatch's gradient lands in its shard);
* **manual ZeRO-2/3** (:meth:`GradientPaths._manual_zero_sums`): the written-out gathers and
  reduce-scatters of :mod:`meshpar.parallel.zero`, falling back to GSPMD (listed and warned) for
  a model that runs a layer stack without :func:`meshpar.scan_layers`;
* **local accumulation** (:meth:`GradientPaths._accumulate_locally`): DP/ZeRO-1 microbatches
  summed per device in a ``shard_map`` and reduced once after the loop; on CPU devices also for
  one microbatch (see :func:`reduce_once_pays`).

Every path returns summed pieces (:class:`~meshpar.train.loss.Piece`: numerators and weights),
summed gradients and the model's new non-parameter state; the Trainer divides once.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshpar.errors import StackNotScanned
from meshpar.parallel.zero import GatherAtUse
from meshpar.train.loss import Piece
from meshpar.train.state import TrainState


def _zeros_like_piece(make: Callable[[], Piece]) -> Piece:
    """Zeros shaped like the :class:`Piece` that ``make`` returns, traced abstractly only: the
    starting value of a loop that adds pieces up."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(make))


def reduce_once_pays(mesh: Mesh, /) -> bool:
    """Whether DP/ZeRO-1 gradients of a single microbatch should be summed per device and
    reduced once after the backward pass (the local path) rather than by GSPMD.

    GSPMD all-reduces each layer's gradient inside the backward layer scan and each use of a
    shared weight on its own (a tied embedding's lookup and unembedding gradients: two
    all-reduces of the whole table). On accelerators the per-layer reductions overlap the rest of
    the backward pass, so they stay. On CPU devices every collective is a rendezvous of all the
    device threads and their number, more than their bytes, sets its cost: one reduction of
    everything is faster (issue 13's model, ``data=8``, bf16, interleaved runs: step 0.93x).

    Example:
        >>> from meshpar.mesh import make_mesh
        >>> reduce_once_pays(make_mesh(data=8))   # on emulated CPU devices
        True
    """
    return all(d.platform == "cpu" for d in mesh.devices.flat)


@dataclasses.dataclass(frozen=True)
class Fallback:
    """A part of the step that takes another path than the strategy's usual one, and why.

    Decided when the :class:`Trainer` is built (for a ZeRO fallback of a model whose layer stack
    is not run by :func:`meshpar.scan_layers`, when the step is traced: at construction given
    ``example_batch``, else at the first step), listed in :attr:`Trainer.fallbacks` and printed by ``meshpar train``.
    """

    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: {self.detail}"


class GradientPaths:
    """The gradient paths of a train step (see the module docstring); a base of
    :class:`~meshpar.train.trainer.Trainer`, which sets the attributes they read."""

    def _summed(self, state: TrainState, batch) -> tuple[Piece, Any, nnx.State]:
        """Summed pieces, summed gradients (in their strategy layout) and the new rest."""
        if self._manual_zero is not None:
            return self._manual_zero_sums(state, batch)
        # In a pipelined layout the microbatches belong to the pipeline, not to accumulation.
        m = 1 if self.pipeline is not None else self.config.microbatches
        if self._local_accumulation:  # never pipelined: m is config.microbatches, maybe 1
            return self._accumulate_locally(state, self._microbatches(batch))
        grad_fn = jax.value_and_grad(self._piece, has_aux=True)
        if m == 1:
            (_, (piece, rest)), grads = grad_fn(state.params, state.rest, batch)
            return piece, self._constrain_grads(grads), rest
        micro = self._microbatches(batch)
        zeros = self._constrain_grads(
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        )

        def body(carry, mb):
            sums, acc, rest = carry
            (_, (piece, rest)), grads = grad_fn(state.params, rest, mb)
            # Under ZeRO-2 the constraint makes each microbatch's gradient land in its shard.
            acc = self._constrain_grads(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads))
            return (sums + piece, acc, rest), None

        first = jax.tree.map(lambda x: x[0], micro)
        sums0 = _zeros_like_piece(lambda: grad_fn(state.params, state.rest, first)[0][1][0])
        (sums, acc, rest), _ = jax.lax.scan(body, (sums0, zeros, state.rest), micro)
        return sums, acc, rest

    def _microbatches(self, batch):
        # Microbatch k takes rows k, k+M, k+2M, ...: every device keeps its own rows.
        m = self.config.microbatches
        micro_spec = NamedSharding(self.mesh, PartitionSpec(None, *self._batch_spec))
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1), micro_spec
            ),
            batch,
        )

    def _manual_zero_sums(self, state: TrainState, batch):
        """ZeRO-2/3 with explicit reduce-scatters (see :mod:`meshpar.parallel.zero`)."""
        try:
            sums, grads, rest = self._manual_zero.loss_and_grads(
                self._piece, state.params, state.rest, self._microbatches(batch),
                microbatches=self.config.microbatches,
            )
        except StackNotScanned as err:
            # The model runs a layer stack without meshpar.scan_layers, so nothing can gather
            # it one layer at a time: GSPMD places the gathers (and all-reduces the gradients).
            self._manual_zero = None
            self._gather_at_use = GatherAtUse.build(
                mesh=self.mesh, zero_stage=self.strategy.zero_stage,
                abs_params=self.layout.abs_params, param_shardings=self.layout.param_shardings,
            )
            fallback = Fallback(
                f"ZeRO-{self.strategy.zero_stage} collectives",
                f"GSPMD gathers the parameters and reduces the gradients: {err}",
            )
            if fallback not in self.fallbacks:
                self._fallbacks.append(fallback)
                warnings.warn(str(fallback), stacklevel=2)
            return self._summed(state, batch)
        return sums, self._constrain_grads(grads), rest

    def _accumulate_locally(self, state: TrainState, micro):
        """DP / ZeRO-1 accumulation: sum local gradients, reduce once after the loop.

        Under GSPMD a replicated accumulator forces an all-reduce of every microbatch's
        gradient inside the loop (M times the traffic). Here the loop runs inside a
        ``shard_map`` that is manual over the batch axes: the parameters are cast to *varying*
        before the loop, so their gradients stay per-device partial sums (no collective in the
        transpose), and one ``psum`` after the loop reduces them. Only for models without
        non-parameter state (see :attr:`Trainer.fallbacks`).
        """
        axes = self.batch_axes

        def local(params, rest, micro):
            varying = lambda t: jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), t)  # noqa: E731
            params = varying(params)
            zeros = varying(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
            grad_fn = jax.value_and_grad(self._piece, has_aux=True)
            first = jax.tree.map(lambda x: x[0], micro)
            sums0 = varying(_zeros_like_piece(lambda: grad_fn(params, rest, first)[0][1][0]))

            def local_body(carry, mb):
                sums, acc, rest = carry
                (_, (piece, rest)), grads = grad_fn(params, rest, mb)
                acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
                return (sums + piece, acc, rest), None

            (sums, acc, rest), _ = jax.lax.scan(local_body, (sums0, zeros, rest), micro)
            return jax.lax.psum(sums, axes), jax.lax.psum(acc, axes), rest

        sums, grads, rest = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(None, axes)),
            out_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec()),
            axis_names=set(axes),
        )(state.params, state.rest, micro)
        return sums, self._constrain_grads(grads), rest
