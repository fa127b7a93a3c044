"""Values inside a ``shard_map``: casting to "varying" over manual axes, sums that XLA:CPU runs,
stage-to-stage moves of 16-bit floats as their bits, the stage slot of stage-layout trees, and
refusing stage functions that close over invariant traced values.

Shared by the pipeline loops (:mod:`meshpar.parallel.pipeline`, :mod:`meshpar.parallel.onef1b`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from meshpar.errors import StrategyError

__all__ = ["cast_varying", "drop_stage_slot", "enter_stage", "ppermute_bits", "psum_wide",
           "refuse_traced_closure", "restore_stage_slot", "select_chunk", "select_stage"]

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
        >>> from functools import partial
        >>> from jax.sharding import PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> mesh = make_mesh(data=8)
        >>> @jax.jit
        ... @partial(jax.shard_map, mesh=mesh, in_specs=P("data"), out_specs=P())
        ... def total(x):
        ...     return psum_wide(x, ("data",), mesh)
        >>> total(jnp.arange(8.0, dtype=jnp.bfloat16))     # summed in float32 on CPU
        Array([28], dtype=bfloat16)
    """
    if _needs_wide_psum(x.dtype, mesh):
        return jax.lax.psum(x.astype(jnp.float32), axes).astype(x.dtype)
    return jax.lax.psum(x, axes)


def _bits_dtype(dtype) -> Any:
    # XLA:CPU (jaxlib 0.10.2) upcasts bf16/f16 collectives (convert, fp32 collective, convert).
    # Their bits, as unsigned integers of the same width, travel as they are: half the bytes
    # and no converts; on accelerators the bitcasts are free. (Issue 13's pipe=2,fsdp=4 step
    # did not get faster: its 128 KB permutes cost their rendezvous on emulated devices, 11%
    # of op time either way; benchmarks/README.md, cause 10.)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2:
        return jnp.uint16
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def ppermute_bits(x: jax.Array, axis: str, perm: tuple[tuple[int, int], ...]) -> jax.Array:
    """``lax.ppermute(x, axis, perm)``; 16-bit floats move as their bits (exactly the same values).

    The gradient is the cotangent permuted back, moved the same way.

    Example:
        >>> from functools import partial
        >>> from jax.sharding import PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> mesh = make_mesh(pipe=2, data=4)
        >>> @jax.jit
        ... @partial(jax.shard_map, mesh=mesh, in_specs=P("pipe"), out_specs=P("pipe"))
        ... def swap(x):
        ...     return ppermute_bits(x, "pipe", ((0, 1), (1, 0)))
        >>> swap(jnp.array([1.0, 2.0], jnp.bfloat16))       # moved as uint16 bits
        Array([2, 1], dtype=bfloat16)
    """
    bits = _bits_dtype(x.dtype)
    if bits is None:
        return jax.lax.ppermute(x, axis, perm)
    moved = jax.lax.ppermute(jax.lax.bitcast_convert_type(x, bits), axis, perm)
    return jax.lax.bitcast_convert_type(moved, x.dtype)


ppermute_bits.defvjp(
    lambda x, axis, perm: (ppermute_bits(x, axis, perm), None),
    lambda axis, perm, _, g: (ppermute_bits(g, axis, tuple((b, a) for a, b in perm)),),
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def select_stage(x: jax.Array, keep: jax.Array, axis: str, mesh: Mesh) -> jax.Array:
    """On every device of ``axis``, ``x`` of the one device where ``keep`` is true.

    The psum of ``where(keep, x, 0)``: one device contributes, the others add zeros. A 16-bit
    float is summed as its bits (an integer psum: adding zeros to bits is exact), since XLA:CPU
    runs a bf16 psum as convert, fp32 psum, convert (see :func:`ppermute_bits`); other dtypes go
    through :func:`psum_wide`. The gradient is the cotangent where ``keep`` is true (no
    communication), as autodiff of the psum gives.

    Example:
        >>> from functools import partial
        >>> from jax.sharding import PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> mesh = make_mesh(pipe=2, data=4)
        >>> @jax.jit
        ... @partial(jax.shard_map, mesh=mesh, in_specs=P("pipe"), out_specs=P())
        ... def from_first(x):
        ...     return select_stage(x, jax.lax.axis_index("pipe") == 0, "pipe", mesh)
        >>> from_first(jnp.array([10.0, 20.0]))              # stage 0's value, on every stage
        Array([10.], dtype=float32)
    """
    bits = _bits_dtype(x.dtype)
    if bits is None:
        return psum_wide(jnp.where(keep, x, jnp.zeros_like(x)), (axis,), mesh)
    mine = jnp.where(keep, jax.lax.bitcast_convert_type(x, bits), jnp.zeros(x.shape, bits))
    return jax.lax.bitcast_convert_type(jax.lax.psum(mine, axis), x.dtype)


def _select_stage_bwd(axis, mesh, keep, g):
    g = jax.lax.pcast(g, (axis,), to="varying")
    return jnp.where(keep, g, jnp.zeros_like(g)), None


select_stage.defvjp(lambda x, keep, axis, mesh: (select_stage(x, keep, axis, mesh), keep),
                    _select_stage_bwd)


def cast_varying(tree: PyTree, axes: Sequence[str], mesh: Mesh) -> PyTree:
    """Cast every leaf to "varying" over those of ``axes`` it does not vary over yet.

    The cast's transpose is a sum over the axes (in float32 where :func:`psum_wide` needs it).

    Example:
        >>> from functools import partial
        >>> from jax.sharding import PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> mesh = make_mesh(pipe=2, data=4)
        >>> varying = lambda a: sorted(jax.typeof(a).manual_axis_type.varying)
        >>> @jax.jit
        ... @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("pipe")), out_specs=P("pipe"))
        ... def scale(w, x):
        ...     print(varying(w), varying(cast_varying(w, ("pipe", "data"), mesh)))
        ...     return w * x
        >>> scale(jnp.ones(()), jnp.ones(2))
        [] ['data', 'pipe']
        Array([1., 1.], dtype=float32)
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


def enter_stage(params: PyTree, state: PyTree, xs: jax.Array, *, repeats: int,
                manual: Sequence[str], mesh: Mesh, axis: str, bubble_fill: float | None):
    """A pipeline loop's prologue inside its ``shard_map``.

    Returns ``(params, state, xs, stage, fill)``: this stage's parameters and state with their
    stage slot dropped (:func:`drop_stage_slot`), the parameters and ``xs`` cast to varying over
    the ``manual`` axes, this stage's index on ``axis``, and ``bubble_fill`` as an ``xs``-typed
    scalar (``None`` without).

    Example:
        >>> from functools import partial
        >>> from jax.sharding import PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> mesh = make_mesh(pipe=2, data=4)
        >>> @jax.jit
        ... @partial(jax.shard_map, mesh=mesh, in_specs=(P("pipe"), P()), out_specs=P("pipe"))
        ... def prologue(params, xs):                   # params: [P, c, ...], stage layout
        ...     params, state, xs, stage, fill = enter_stage(params, None, xs, repeats=1,
        ...         manual=("pipe",), mesh=mesh, axis="pipe", bubble_fill=None)
        ...     print(params.shape, state, fill)        # this stage's [c, ...]
        ...     return jnp.full((1,), stage)
        >>> prologue(jnp.zeros((2, 3, 4)), jnp.ones((4, 8)))
        (3, 4) None None
        Array([0, 1], dtype=int32)
    """
    params, state = drop_stage_slot((params, state), repeats)
    params, xs = cast_varying((params, xs), manual, mesh)
    fill = None if bubble_fill is None else jnp.asarray(bubble_fill, xs.dtype)
    return params, state, xs, jax.lax.axis_index(axis), fill


def refuse_traced_closure(stage_fn: Callable, *example_args) -> None:
    """Raise if ``stage_fn`` closes over traced floating-point values; call inside a ``shard_map``.

    A traced float value from outside the ``shard_map`` is invariant over the manual axes; if
    autodiff reaches it, the transpose sums its gradient over the stages with a psum at the point
    of use: inside every backward iteration of a pipeline loop, and inside the bubble ``cond``
    that only some stages enter -- a deadlock. It cannot be re-typed after the fact, so it is
    refused with the way out.

    Raises:
        StrategyError: ``stage_fn`` closes over traced values.

    Example:
        >>> w, x = jnp.ones((4, 4)), jnp.ones((2, 4))
        >>> refuse_traced_closure(lambda w, s, x: (x @ w, s), w, None, x)   # weights as args
        >>> @jax.jit
        ... def step(scale):
        ...     try:
        ...         refuse_traced_closure(lambda w, s, x: (x @ w * scale, s), w, None, x)
        ...     except StrategyError as err:
        ...         print(str(err).split(". ")[0])
        ...     return scale
        >>> _ = step(2.0)
        pipeline_apply: stage_fn closes over 1 traced value(s) (float32[])
    """
    consts = jax.closure_convert(stage_fn, *example_args)[1]
    if consts:
        raise StrategyError(
            f"pipeline_apply: stage_fn closes over {len(consts)} traced value(s) "
            f"({', '.join(f'{c.dtype}{list(c.shape)}' for c in consts)}). Inside the "
            "pipeline loop their gradient would need a sum over the stages in every "
            "iteration (a deadlock inside the bubble-skipping cond). Pass weights in "
            "stage_params (stacked per layer), compute constants inside stage_fn, or close "
            "over NumPy arrays instead of traced ones"
        )


def select_chunk(tree: PyTree, r: Any, repeats: int) -> PyTree:
    """Chunk ``r`` of a stage's tree whose stage slot is dropped (:func:`drop_stage_slot`):
    ``[v, c, ...] -> [c, ...]``; with one chunk a stage (``repeats == 1``) the tree itself.

    Example:
        >>> select_chunk({"w": jnp.zeros((2, 3, 4))}, 1, 2)["w"].shape
        (3, 4)
    """
    return tree if repeats == 1 else jax.tree.map(lambda a: a[r], tree)


def drop_stage_slot(tree: PyTree, repeats: int) -> PyTree:
    """Inside the stage ``shard_map``: a stage-layout tree's size-1 stage slot dropped,
    ``[1, c, ...] -> [c, ...]`` or ``[v, 1, c, ...] -> [v, c, ...]`` (``repeats = v``).

    Example:
        >>> drop_stage_slot({"w": jnp.zeros((1, 3, 4))}, 1)["w"].shape        # repeats=1
        (3, 4)
        >>> drop_stage_slot({"w": jnp.zeros((2, 1, 3, 4))}, 2)["w"].shape     # repeats=2
        (2, 3, 4)
    """
    return jax.tree.map(lambda a: a[0] if repeats == 1 else a[:, 0], tree)


def restore_stage_slot(tree: PyTree, repeats: int) -> PyTree:
    """The inverse of :func:`drop_stage_slot`, for what leaves the ``shard_map`` in stage layout.

    Example:
        >>> restore_stage_slot({"w": jnp.zeros((3, 4))}, 1)["w"].shape
        (1, 3, 4)
        >>> restore_stage_slot({"w": jnp.zeros((2, 3, 4))}, 2)["w"].shape
        (2, 1, 3, 4)
    """
    return jax.tree.map(lambda a: a[None] if repeats == 1 else a[:, None], tree)
