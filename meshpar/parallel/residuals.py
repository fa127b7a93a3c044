"""Keeping a ``jax.vjp``'s residuals in buffers, and rebuilding the vjp from them.

The 1F1B loop (:mod:`meshpar.parallel.onef1b`) runs a chunk's forward in one tick and its
backward ticks later. Without stage remat the forward tick keeps what its ``jax.vjp`` needs and
the backward tick applies it. A vjp is a pytree (:class:`jax.tree_util.Partial`), so its leaves
can be stored in ring-buffer slots and the vjp rebuilt from its tree structure; what is worth
storing is decided once, from a jaxpr of the vjp, by :class:`VjpResiduals`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
# dce_jaxpr: which inputs an output of a jaxpr needs (no public API says so); jax is pinned.
from jax._src.interpreters import partial_eval as pe

from meshpar.errors import StrategyError

__all__ = ["VjpResiduals"]

PyTree = Any


class VjpResiduals:
    """The layout of a function's ``jax.vjp`` residuals, to keep them in buffer slots.

    A vjp is a pytree (:class:`jax.tree_util.Partial`) whose leaves are its residuals, of three
    kinds, told apart once on a jaxpr of ``chunk_vjp`` (an abstract trace: nothing of it enters
    the program):

    * the weights themselves (the same traced values as ``chunk``'s leaves): not stored,
      :meth:`vjp` puts the weights back in;
    * values computed from the weights alone (the GPT layer scan's per-layer copies of them
      under remat ``none``, scaled or cast weights): not stored either, :meth:`vjp` recomputes
      them from the weights (only the part of the jaxpr they need; a copy per slot would cost a
      chunk's weights per slot). Not where that part has side effects (host callbacks): then
      they are stored;
    * the rest (layer inputs, intermediates, dropout masks, RNG keys): *kept*, PRNG keys as
      their key data.

    Call it, :meth:`keep` and :meth:`vjp` inside one ``jit`` trace (weights are recognised as
    traced values).

    Args:
        chunk_vjp: ``chunk_vjp(chunk, x) -> (y, vjp)``, a ``jax.vjp`` of the function.
        chunk: the weights (a pytree of traced arrays).
        x: an input of the shape and dtype the function takes.

    Example:
        >>> @jax.jit
        ... def grads(w, x, dy):
        ...     f = lambda w, x: jax.vjp(lambda w, x: jnp.tanh(x @ (2 * w)), w, x)
        ...     layout = VjpResiduals(f, w, x)
        ...     kept = layout.keep(f(w, x)[1], w)        # what a buffer slot holds
        ...     return layout.vjp(kept, w)(dy)             # later: the same gradients
        >>> w, x = jnp.ones((4, 4)), jnp.ones((2, 4))
        >>> [g.shape for g in grads(w, x, x)]
        [(4, 4), (2, 4)]
    """

    def __init__(self, chunk_vjp: Callable, chunk: PyTree, x: jax.Array):
        def leaves_of(chunk, x):
            leaves, self.treedef = jax.tree.flatten(chunk_vjp(chunk, x)[1])
            self.weight_of = self._weights(leaves, chunk)
            self.impls = tuple(jax.random.key_impl(k) if _is_key(k) else None for k in leaves)
            return leaves

        closed = jax.make_jaxpr(leaves_of)(chunk, x)
        # Inputs: the jaxpr's constants (closed-over values: the layers' state), the chunk's
        # weights, x. An output none of whose inputs but weights are live is weight-derived.
        jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
        n_const, n_weights = len(closed.consts), len(jax.tree.leaves(chunk))
        outs = range(len(jaxpr.outvars))

        def weights_only(i):
            used = pe.dce_jaxpr(jaxpr, [j == i for j in outs])[1]
            return not any(used[:n_const]) and not any(used[n_const + n_weights:])

        self.derived = tuple(w is None and weights_only(i) for i, w in enumerate(self.weight_of))
        derived, used = pe.dce_jaxpr(jaxpr, list(self.derived))
        self.derived_fn, self.derived_inputs = None, ()
        if derived.effects:
            # DCE keeps effectful equations (host callbacks) and what they need: recomputing
            # would rerun them, and the chunk's forward with them. Keep everything instead.
            self.derived = (False,) * len(self.derived)
        elif any(self.derived):
            self.derived_fn = jax.extend.core.jaxpr_as_fun(
                jax.extend.core.ClosedJaxpr(derived, ()))
            self.derived_inputs = tuple(i - n_const for i, u in enumerate(used) if u)
        self.kept = tuple(w is None and not d for w, d in zip(self.weight_of, self.derived))
        offloaded = [a for a, k in zip(closed.out_avals, self.kept)
                     if k and getattr(getattr(a, "memory_space", None), "name", "Device")
                     != "Device"]
        if offloaded:
            raise StrategyError(
                f"1F1B without stage remat keeps each forward tick's residuals in device "
                f"buffers, but the remat policy puts {len(offloaded)} of them in host memory "
                f"({', '.join(map(str, offloaded[:3]))}); recompute the stages instead "
                "(PipelineConfig(remat=True), TrainConfig(pipeline_remat=True), "
                "--pipeline-remat) or choose a remat policy that does not offload")
        self.impls = tuple(impl for impl, k in zip(self.impls, self.kept) if k)
        self.avals = tuple(
            jax.eval_shape(_storable, jax.ShapeDtypeStruct(a.shape, a.dtype))
            for a, k in zip(closed.out_avals, self.kept) if k)

    @staticmethod
    def _weights(leaves, chunk) -> tuple[int | None, ...]:
        weights = jax.tree.leaves(chunk)
        return tuple(next((j for j, w in enumerate(weights) if leaf is w), None)
                     for leaf in leaves)

    def buffers(self, slots: int, fill: Any = None) -> tuple[jax.Array, ...]:
        """``[slots, ...]`` zero buffers for the kept leaves (``fill`` for float ones)."""
        def one(a):
            if fill is not None and jnp.issubdtype(a.dtype, jnp.inexact):
                return jnp.full((slots, *a.shape), fill, a.dtype)
            return jnp.zeros((slots, *a.shape), a.dtype)
        return tuple(map(one, self.avals))

    def placeholders(self) -> tuple[jax.Array, ...]:
        """Zeros in the kept leaves' shapes (an idle branch's output)."""
        return tuple(jnp.zeros(a.shape, a.dtype) for a in self.avals)

    def keep(self, vjp: Callable, chunk: PyTree) -> tuple[jax.Array, ...]:
        """The leaves of ``vjp`` (of the same function, on ``chunk``) worth storing.

        Raises:
            RuntimeError: ``vjp``'s residuals are not laid out as the probed ones (a bug).
        """
        leaves, treedef = jax.tree.flatten(vjp)
        kept = [_storable(leaf) for leaf, k in zip(leaves, self.kept) if k]
        got = tuple(jax.ShapeDtypeStruct(np.shape(k), k.dtype) for k in kept)
        if (treedef.num_leaves != self.treedef.num_leaves
                or self._weights(leaves, chunk) != self.weight_of
                or got != tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in self.avals)):
            raise RuntimeError(
                "meshpar internal error: a chunk's vjp residuals differ between two traces of "
                f"the same chunk ({got} against {self.avals}); please report this")
        return tuple(kept)

    def vjp(self, kept: tuple[jax.Array, ...], chunk: PyTree) -> Callable:
        """The vjp rebuilt from :meth:`keep`'s leaves and the weights ``chunk``."""
        weights = jax.tree.leaves(chunk)
        derived = iter(() if self.derived_fn is None else
                       self.derived_fn(*(weights[i] for i in self.derived_inputs)))
        stored = iter(zip(kept, self.impls))
        leaves = []
        for w, d in zip(self.weight_of, self.derived):
            if w is not None:
                leaves.append(weights[w])
            elif d:
                leaves.append(next(derived))
            else:
                value, impl = next(stored)
                leaves.append(value if impl is None else jax.random.wrap_key_data(value,
                                                                                  impl=impl))
        return jax.tree.unflatten(self.treedef, leaves)


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(x: jax.Array) -> jax.Array:
    return jax.random.key_data(x) if _is_key(x) else x
