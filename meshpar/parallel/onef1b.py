"""1F1B and interleaved 1F1B pipelines in one SPMD program: the pipeline's own state flat in M.

GPipe and circular (:mod:`meshpar.parallel.pipeline`) get their backward pass from autodiff of
the forward loop, so the loop keeps one stage input per iteration: ``(v+1) x |x|`` of activations
per extra microbatch. PipeDream-flush (1F1B) starts the backward pass of a microbatch as soon as
it has left the last stage, so a stage never holds more than about ``P`` microbatches in flight.
Here that schedule is meshpar's own backward loop, run inside one ``jax.shard_map``.

Structure: a ``jax.custom_vjp`` of the whole pipeline.

* Forward (primal) pass: the forward-only loop of :func:`~meshpar.parallel.pipeline.pipeline_apply`
  (GPipe's table for ``1f1b``, the circular one for ``interleaved-1f1b``); nothing is saved but
  the custom VJP's residuals, the stage parameters and the stack's input ``xs`` -- and, for layers
  with RNG streams or batch statistics, the state each chunk had before each microbatch
  (``M`` copies of that small state), so that the backward loop reruns every chunk with what its
  forward pass saw (the same dropout mask). The state itself is not differentiated.
* Backward pass: the 1F1B loop of :func:`meshpar.parallel.schedule.onef1b_table`, a
  ``lax.scan`` over *ticks*; at each tick each stage runs one forward **or** one backward of one
  microbatch on one chunk of its layers:

  1. What arrived from the neighbours at the end of the previous tick is written into this
     stage's buffers: a forward activation (the input of one of its chunks) into the *stash*
     ``[S, mb, ...]``, a gradient into the *cotangent buffer* ``[C, mb, ...]``, at the slots the
     table assigned. ``S`` and ``C`` are the most values ever live at once on a stage: they
     depend on ``P`` and ``v``, not on ``M``.
  2. Backward, under a ``lax.switch`` (idle / recompute / from residuals): the chunk's
     ``jax.vjp`` applied to its output's gradient (the cotangent buffer, or the incoming
     ``dys[m]`` for the last chunk); the weight gradient is added to this stage's accumulator,
     the input gradient goes to the previous stage (or, for chunk 0, into ``dxs[m]``). Which
     vjp depends on :attr:`~meshpar.parallel.schedule.PipelineConfig.remat`:

     * ``remat=False`` (the Trainer's default for these schedules): the vjp the forward tick
       built, rebuilt from its residuals, which the forward tick left in a *residual slot*
       (``res``; :class:`~meshpar.parallel.schedule.OneFOneBTable` sets ``res_slots`` of
       them, flat in ``M``). Residuals that are the chunk's own weights are not copied (the
       weights are put back in), nor those the weights alone make (recomputed:
       :class:`~meshpar.parallel.residuals.VjpResiduals`). The chunk's forward runs twice per
       microbatch (the forward loop, the forward tick), as GPipe's does with its stage remat.
       Residuals a remat policy offloads to host memory cannot sit in the slots: that is
       refused (use ``remat=True``).
     * ``remat=True``: ``jax.vjp`` of the chunk on its stashed input: the forward is recomputed
       (three forwards per microbatch), and only stage inputs are kept.

     The last chunk always takes the second kind: it has no forward tick (its backward follows
     its forward at once). ``xs``, ``dys`` and ``dxs`` share one ``[M, mb, ...]`` buffer per
     device: only stage 0 reads ``xs`` and writes ``dxs`` (``dxs[m]`` over ``xs[m]``, in the
     tick of chunk 0's backward of ``m``, after its last read), only stage ``P-1`` reads
     ``dys``.
  3. Forward, under ``lax.cond``: the chunk on its input (the stash, or ``xs[m]`` for chunk 0);
     the result goes to the next stage (without remat: with its vjp's residuals, written into
     their slot).
  4. Two ``ppermute``s: activations one stage forward, gradients one stage back (a ring for the
     interleaved schedule, a line for 1f1b).

  Each ``cond`` carries only what it changes (the backward one: the weight-gradient
  accumulator; the buffers are read and written outside it): issue 16's feasibility study found
  that a single ``lax.switch`` over all the state made XLA copy the buffers at every tick (+30%
  time; not re-measured here). Idle ticks compute nothing (``cond``, not ``where``), so no
  garbage (NaN) reaches a result.

Why a custom VJP and not a loop at train-step level: the layer stack is one call inside the
user's model (:func:`meshpar.parallel.stack.scan_layers`), with the embedding before it and the
head and loss after it; a loop that also ran the loss head per microbatch would need the model
cut into three parts. A custom VJP keeps the model unchanged and any loss. The price: the stack's
boundary values, its input ``xs``, its output and the output's gradient ``dys`` (``M`` activations
each, the model's own batch, as on one device), are whole arrays on every stage, and the forward
pass runs once before the loop: each chunk's forward runs twice per microbatch, as under GPipe
with its stage remat (three times with ``remat=True``: about 25% more work for a stage whose
backward costs two forwards; ``tests/test_onef1b.py`` counts them).

Memory (per device, beyond those boundary values): the stash and cotangent buffer, ``S + C``
activations of one microbatch (:attr:`~meshpar.parallel.schedule.PipelineConfig.activation_slots`;
with ``remat``, ``P + 1`` for 1f1b and about ``(v+1)*P`` for interleaved 1f1b, the inputs then
living until their backward; without, fewer), without ``remat`` the residual slots (each one
chunk forward's residuals: under the layer scan's ``full`` remat its layers' inputs, ``c``
activations; under ``none`` all their intermediates), one chunk's intermediates inside a
backward tick, and the weight-gradient accumulator. Flat in ``M`` either way;
``tests/test_onef1b.py`` checks it in ``memory_analysis``.

What that buys against meshpar's GPipe, honestly: GPipe here already rematerialises each
iteration, so it keeps one stage input per iteration (``(v+1) x |x|`` per microbatch with the
ring buffer's cotangent), not every intermediate of every microbatch as textbook GPipe does.
The custom VJP keeps the stack's input ``xs`` as a residual until its backward, whose loop then
holds ``xs``, ``dys`` and ``dxs`` in one buffer: ``1 x |x|`` per microbatch inside the loop,
against GPipe's 2 and circular's 3 (measured on a d = 256 GPT's whole step, ``pipe=4,data=2``:
+0.13 MB per microbatch from M = 8 to 32 against GPipe's +0.26; with three separate buffers it was
+0.39, more than GPipe, benchmarks/README.md "1F1B"; ``tests/test_onef1b.py``
``test_stack_boundary_costs_one_activation_per_microbatch``). What stays ``M``-sized is that
buffer and the model's own batch outside the stack (embedding, head, loss). A flat *step* needs
the loss head inside the loop (a train-step-level loop), which this design does not do.

Collectives: inside the loop only the two ``ppermute``s (plus what ``tensor`` parallelism puts
inside a stage). The weights are cast to "varying" over the batch axes before the loop and their
gradient summed over them once after it; the input gradient is summed over the stages once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from meshpar.parallel.residuals import VjpResiduals
from meshpar.parallel.schedule import PipelineConfig, onef1b_table
from meshpar.parallel.varying import (cast_varying, drop_stage_slot, ppermute_bits, psum_wide,
                                      restore_stage_slot, select_stage)

__all__ = ["onef1b_apply"]

PyTree = Any


def _write(buf: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    # buf[slot] = value where slot >= 0, else unchanged (a select: garbage in `value` stays out).
    i = jnp.maximum(slot, 0)
    return buf.at[i].set(jnp.where(slot >= 0, value, buf[i]))


def _read(buf: jax.Array, slot: jax.Array, other: jax.Array, index: jax.Array) -> jax.Array:
    # buf[slot] where slot >= 0, else other[index].
    return jnp.where(slot >= 0, buf[jnp.maximum(slot, 0)], other[jnp.maximum(index, 0)])


def _backward(run_chunk: Callable, mesh: Mesh, config: PipelineConfig, param_spec, act_spec,
              bubble_fill: float | None) -> Callable:
    table = onef1b_table(config)
    n_stages, v, axis = config.stages, config.repeats, config.axis
    manual = (axis, *config.batch_axes)
    # Per-tick columns [T, P]; each stage picks its entry.
    columns = tuple(np.ascontiguousarray(a.T) for a in (
        table.forward_mb, table.forward_rep, table.forward_slot, table.forward_res,
        table.backward_mb, table.backward_rep, table.backward_slot, table.backward_res,
        table.backward_cot, table.recv_forward, table.recv_backward))
    if v == 1:   # 1f1b: nothing wraps round from the last stage to the first
        fwd_perm = tuple((i, i + 1) for i in range(n_stages - 1))
        bwd_perm = tuple((i + 1, i) for i in range(n_stages - 1))
    else:
        fwd_perm = tuple((i, (i + 1) % n_stages) for i in range(n_stages))
        bwd_perm = tuple(((i + 1) % n_stages, i) for i in range(n_stages))

    def chunk_of(params, r):
        return params if v == 1 else jax.tree.map(lambda a: a[r], params)

    def acc_dtype(dtype):
        # Sum sub-32-bit weight gradients in float32 across the M microbatches; round once.
        return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype

    # One [M, mb, ...] buffer per device for the stack's input, its output gradient and its
    # input gradient (`io` below), not three. Each device holds all three whole (they are
    # replicated over the stages), but only stage 0 reads xs (chunk 0 is its own) and writes dxs,
    # and only stage P-1 reads dys (the last chunk): so on stage P-1 the buffer starts as dys, on
    # the others as xs, and stage 0 writes dxs[m] over xs[m] in the tick of chunk 0's backward of
    # m, the last read of xs[m]. Three separate arrays were 3 x |x| per microbatch inside the
    # loop, one more than GPipe's 2 (its stage inputs and the ring buffer's cotangent): the
    # whole step's temporaries grew faster in M than GPipe's (benchmarks/README.md, "1F1B").
    # The tables must agree (a chunk-0 input only on stage 0, a last-chunk cotangent only on
    # stage P-1); P = 1 keeps dys apart, as stage 0 is both.
    shared = n_stages > 1
    if shared:
        busy_f = table.forward_mb >= 0
        busy_b = (table.backward_mb >= 0) & (table.backward_res < 0)    # recomputing backwards
        reads_xs = np.any(busy_f & (table.forward_slot < 0), axis=1) | np.any(
            busy_b & (table.backward_slot < 0), axis=1)
        reads_dys = np.any(busy_b & (table.backward_cot < 0), axis=1)
        if reads_xs[1:].any() or reads_dys[:-1].any():
            raise RuntimeError(
                f"meshpar internal error: the {config.schedule.value} tables read the stack's "
                f"input on stages {np.flatnonzero(reads_xs).tolist()} and its output gradient on "
                f"stages {np.flatnonzero(reads_dys).tolist()}; the shared buffer needs stage 0 "
                f"and stage {n_stages - 1} alone (please report this)"
            )

    def local(params, xs, dys, hist):
        # hist: the state each chunk had before each microbatch ([(v,) M, c, ...]; None for
        # stateless layers), so that every rerun of a chunk sees what its forward pass saw.
        params, hist = drop_stage_slot((params, hist), v)
        params = cast_varying(params, manual, mesh)
        xs, dys = cast_varying((xs, dys), manual, mesh)
        stage = jax.lax.axis_index(axis)
        # xs and dys are dead after this select: the loop carries one [M, mb, ...] buffer.
        io = jnp.where(stage == n_stages - 1, dys, xs) if shared else xs
        fill = None if bubble_fill is None else jnp.asarray(bubble_fill, xs.dtype)

        def empty(n):
            shape = (n, *xs.shape[1:])
            return jnp.zeros(shape, xs.dtype) if fill is None else jnp.full(shape, fill)

        def idle_value(x):
            return jnp.zeros_like(x) if fill is None else jnp.full_like(x, fill)

        stash, cot = cast_varying((empty(table.stash_slots), empty(table.cot_slots)), manual, mesh)
        acc = cast_varying(jax.tree.map(lambda a: jnp.zeros(a.shape, acc_dtype(a.dtype)), params),
                           manual, mesh)
        msg = cast_varying(jnp.zeros_like(xs[0]), manual, mesh)

        def state_of(r, m):
            return jax.tree.map(lambda a: a[m] if v == 1 else a[r, m], hist)

        def chunk_vjp(chunk, r, m, x):
            st = state_of(r, m)
            return jax.vjp(lambda c, x: run_chunk(c, st, x)[0], chunk, x)

        def accumulate(acc, r, d_chunk):
            if v == 1:
                return jax.tree.map(lambda a, d: a + d.astype(a.dtype), acc, d_chunk)
            return jax.tree.map(lambda a, d: a.at[r].add(d.astype(a.dtype)), acc, d_chunk)

        # Without remat, each forward tick keeps its vjp's residuals (those that are neither the
        # chunk's weights nor made from the weights alone) in `res` slots until its backward;
        # their layout is read off an abstract trace of the chunk's vjp.
        residuals = None
        if table.res_slots:
            residuals = VjpResiduals(lambda c, x: chunk_vjp(c, 0, 0, x), chunk_of(params, 0),
                                     xs[0])
        res = () if residuals is None else cast_varying(
            residuals.buffers(table.res_slots, fill), manual, mesh)

        def forward(params, r, m, x):
            if residuals is None:
                return run_chunk(chunk_of(params, r), state_of(r, m), x)[0], ()
            chunk = chunk_of(params, r)
            y, vjp = chunk_vjp(chunk, r, m, x)
            return y, cast_varying(residuals.keep(vjp, chunk), manual, mesh)

        def skip_forward(params, r, m, x):
            if residuals is None:
                return idle_value(x), ()
            return idle_value(x), cast_varying(residuals.placeholders(), manual, mesh)

        def backward(acc, params, r, m, x, dy, kept):
            # Recompute the chunk's forward from its input x, then apply dy.
            d_chunk, dx = chunk_vjp(chunk_of(params, r), r, m, x)[1](dy)
            return accumulate(acc, r, d_chunk), dx

        def backward_kept(acc, params, r, m, x, dy, kept):
            # The forward tick's residuals: no recomputation.
            d_chunk, dx = residuals.vjp(kept, chunk_of(params, r))(dy)
            return accumulate(acc, r, d_chunk), dx

        def skip_backward(acc, params, r, m, x, dy, kept):
            return acc, idle_value(x)

        # Backward branches by index: idle, recompute, from the forward tick's residuals.
        backwards = (skip_backward, backward) + (() if residuals is None else (backward_kept,))

        def tick(carry, col):
            f_in, b_in, stash, cot, res, acc, io = carry
            fm, fr, fslot, fres, bm, br, bslot, bres, bcot, recv_f, recv_b = (
                c[stage] for c in col)
            stash = _write(stash, recv_f, f_in)
            cot = _write(cot, recv_b, b_in)
            xb = _read(stash, bslot, io, bm)
            dy = _read(cot, bcot, io if shared else dys, bm)
            kept = tuple(b[jnp.maximum(bres, 0)] for b in res)
            branch = jnp.where(bm < 0, 0, jnp.where(bres >= 0, 2, 1))
            acc, dx = jax.lax.switch(branch, backwards, acc, params, jnp.maximum(br, 0),
                                     jnp.maximum(bm, 0), xb, dy, kept)
            # Chunk 0 (read from xs) hands its input gradient out, over xs[m] (read for the last
            # time by now); the others send it back.
            first = (stage == 0) & (br == 0)
            io = _write(io, jnp.where((bm >= 0) & first, bm, -1), dx)
            # The forward reads io after that write (never the slot written: a chunk's forward
            # of a microbatch precedes its backward), so every read of io is ordered before or
            # after the in-place update. Read before it, unordered, made XLA copy the whole
            # [M, mb, ...] buffer twice in every tick (two `copy`s in the loop body of the
            # compiled step; the d = 256 GPT's temporaries were 0.13 MB higher at M = 8 and 32).
            x = _read(stash, fslot, io, fm)
            y, new_kept = jax.lax.cond(fm >= 0, forward, skip_forward, params,
                                       jnp.maximum(fr, 0), jnp.maximum(fm, 0), x)
            res = tuple(_write(b, fres, k) for b, k in zip(res, new_kept))
            f_out = ppermute_bits(y, axis, fwd_perm)
            b_out = ppermute_bits(dx, axis, bwd_perm)
            return (f_out, b_out, stash, cot, res, acc, io), None

        carry = (msg, msg, stash, cot, res, acc, io)
        (_, _, _, _, _, acc, dxs), _ = jax.lax.scan(tick, carry, columns)
        # Once, after the loop: the weight gradient over the batch shards, the input gradient
        # (on stage 0 only) to every stage.
        if config.batch_axes:
            acc = jax.tree.map(lambda a: psum_wide(a, tuple(config.batch_axes), mesh), acc)
        grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
        grads = restore_stage_slot(grads, v)
        dxs = select_stage(dxs, stage == 0, axis, mesh)
        return grads, dxs

    return jax.shard_map(local, mesh=mesh, in_specs=(param_spec, act_spec, act_spec, param_spec),
                         out_specs=(param_spec, act_spec), axis_names=set(manual))


def _no_cotangent(shape: jax.ShapeDtypeStruct) -> jax.Array | np.ndarray:
    # The layers' state is not differentiated: zeros (float0 for integers and PRNG keys).
    if jnp.issubdtype(shape.dtype, jnp.inexact):
        return jnp.zeros(shape.shape, shape.dtype)
    return np.zeros(shape.shape, jax.dtypes.float0)


def onef1b_apply(run_chunk: Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, PyTree]],
                 forward: Callable[[PyTree, jax.Array, PyTree], tuple[jax.Array, PyTree, PyTree]],
                 stage_params: PyTree, inputs: jax.Array, stage_state: PyTree | None = None, /,
                 *, mesh: Mesh, config: PipelineConfig, param_spec: PartitionSpec,
                 act_spec: PartitionSpec, bubble_fill: float | None = None,
                 ) -> jax.Array | tuple[jax.Array, PyTree]:
    """The forward pipeline, differentiated by the 1F1B loop.

    Called by :func:`meshpar.parallel.pipeline.pipeline_apply` for the ``1f1b`` and
    ``interleaved-1f1b`` schedules, which checks the arguments; use that.

    Args:
        run_chunk: ``run_chunk(chunk_params, chunk_state, x) -> (y, new_chunk_state)`` for one
            microbatch (shape-checked; the state is ``None`` for stateless layers).
        forward: the forward pipeline, a ``shard_map``'d function of ``(stage_params, inputs,
            stage_state)`` returning the outputs, the new state and the state each chunk had
            before each microbatch (``[(v,) P, M, c, ...]``; ``None`` without state).
        stage_params: ``[P, c, ...]`` or ``[v, P, c, ...]`` stage parameters.
        inputs: ``[M, mb, ...]`` microbatches.
        stage_state: the layers' state in stage layout, or ``None``.
        mesh, config: the mesh and the pipeline (a 1F1B schedule).
        param_spec, act_spec: the ``shard_map`` specs of the parameters and activations.
        bubble_fill: testing hook: idle ticks emit, and the buffers start as, this value.

    Returns:
        ``[M, mb, ...]`` outputs, as ``forward`` returns them; with ``stage_state``,
        ``(outputs, new stage state)``.

    Example:
        >>> y = onef1b_apply(run_chunk, forward, staged, xs, mesh=mesh, config=cfg,
        ...                  param_spec=P("pipe"), act_spec=P())   # doctest: +SKIP
    """
    backward = _backward(run_chunk, mesh, config, param_spec, act_spec, bubble_fill)
    state_shapes = jax.eval_shape(lambda s: s, stage_state)

    @jax.custom_vjp
    def pipeline(params, xs, state):
        return forward(params, xs, state)[:2]

    def pipeline_fwd(params, xs, state):
        out, new_state, hist = forward(params, xs, state)
        return (out, new_state), (params, xs, hist)

    def pipeline_bwd(residuals, cotangents):
        params, xs, hist = residuals
        d_params, d_xs = backward(params, xs, cotangents[0], hist)
        return d_params, d_xs, jax.tree.map(_no_cotangent, state_shapes)

    pipeline.defvjp(pipeline_fwd, pipeline_bwd)
    out, new_state = pipeline(stage_params, inputs, stage_state)
    return out if stage_state is None else (out, new_state)
