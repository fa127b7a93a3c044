"""Values inside a ``shard_map``: casting to "varying" over manual axes, sums that XLA:CPU runs, the
stage slot of stage-layout trees.

Shared by the pipeline loops (:mod:`meshpar.parallel.pipeline`, :mod:`meshpar.parallel.onef1b`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

__all__ = ["cast_varying", "drop_stage_slot", "psum_wide", "restore_stage_slot"]

PyTree = Any


def _needs_wide_psum(dtype, mesh: Mesh) -> bool:
    # XLA:CPU (jaxlib 0.10.2) aborts the process ("Invalid binary instruction opcode copy") on a
    # bf16 psum in a partial-manual shard_map; f16 and full-manual are fine. Sum such values in
    # float32 there. Exact here: each psum adds one contribution to zeros (outputs) or sums
    # gradients that are then rounded once.
    return (jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4
            and mesh.devices.flat[0].platform == "cpu")


def psum_wide(x: jax.Array, axes: tuple[str, ...], mesh: Mesh) -> jax.Array:
    """``lax.psum(x, axes)``, in float32 for sub-32-bit floats on CPU (see above).

    Example:
        >>> total = psum_wide(grad, ("data",), mesh)      # inside a shard_map
    """
    if _needs_wide_psum(x.dtype, mesh):
        return jax.lax.psum(x.astype(jnp.float32), axes).astype(x.dtype)
    return jax.lax.psum(x, axes)


def cast_varying(tree: PyTree, axes: Sequence[str], mesh: Mesh) -> PyTree:
    """Cast every leaf to "varying" over those of ``axes`` it does not vary over yet.

    The cast's transpose is a sum over the axes (in float32 where :func:`psum_wide` needs it).

    Example:
        >>> params = cast_varying(params, ("pipe", "data"), mesh)   # inside a shard_map
    """
    # Mark values as varying over the manual axes *before* the loop. A loop carry must vary over
    # every axis its update varies over, and a value cast inside the loop would put the cast's
    # transpose (a psum) inside every backward iteration.
    def cast(a):
        have = jax.typeof(a).manual_axis_type.varying
        missing = tuple(ax for ax in axes if ax not in have)
        if not missing:
            return a
        if _needs_wide_psum(a.dtype, mesh):
            return _pvary_wide_transpose(a, missing, mesh)
        return jax.lax.pcast(a, missing, to="varying")

    return jax.tree.map(cast, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pvary_wide_transpose(a: jax.Array, axes: tuple[str, ...], mesh: Mesh) -> jax.Array:
    # pcast to varying whose transpose (the psum of the cotangent) runs in float32.
    return jax.lax.pcast(a, axes, to="varying")


def _pvary_fwd(a, axes, mesh):
    return jax.lax.pcast(a, axes, to="varying"), None


def _pvary_bwd(axes, mesh, _, ct):
    return (psum_wide(ct, axes, mesh),)


_pvary_wide_transpose.defvjp(_pvary_fwd, _pvary_bwd)


def drop_stage_slot(tree: PyTree, repeats: int) -> PyTree:
    """Inside the stage ``shard_map``: a stage-layout tree's size-1 stage slot dropped,
    ``[1, c, ...] -> [c, ...]`` or ``[v, 1, c, ...] -> [v, c, ...]`` (``repeats = v``).

    Example:
        >>> params = drop_stage_slot(params, config.repeats)     # inside a shard_map
    """
    return jax.tree.map(lambda a: a[0] if repeats == 1 else a[:, 0], tree)


def restore_stage_slot(tree: PyTree, repeats: int) -> PyTree:
    """The inverse of :func:`drop_stage_slot`, for what leaves the ``shard_map`` in stage layout.

    Example:
        >>> grads = restore_stage_slot(grads, config.repeats)    # inside a shard_map
    """
    return jax.tree.map(lambda a: a[None] if repeats == 1 else a[:, None], tree)
