"""1F1B and interleaved 1F1B pipelines in one SPMD program: the pipeline's memory flat in M.

GPipe and circular (:mod:`meshpar.parallel.pipeline`) get their backward pass from autodiff of
the forward loop, so the loop keeps one stage input per iteration: ``(v+1) x |x|`` of activations
per extra microbatch. PipeDream-flush (1F1B) starts the backward pass of a microbatch as soon as
it has left the last stage, so a stage never holds more than about ``P`` microbatches in flight.
Here that schedule is meshpar's own backward loop, run inside one ``jax.shard_map``.

Structure: a ``jax.custom_vjp`` of the whole pipeline.

* The stack's boundary values -- its input ``xs``, its output, the output's gradient ``dys`` and
  the input gradient ``dxs``, ``M`` activations each -- are kept in *blocks* over the stages:
  microbatch ``m`` on stage ``m // q`` (``q = ceil(M/P)``), and *channels* riding along the loops'
  permutes bring each one to the stage that reads it and from the stage that makes it
  (:mod:`meshpar.parallel.routes`). So a device holds ``1/P`` of them: ``2/P`` activations per
  microbatch (``xs`` and ``dys``) instead of the whole arrays.
* Forward (primal) pass: its own forward-only loop (:func:`~meshpar.parallel.schedule.onef1b_forward`:
  GPipe's table for ``1f1b``; for ``interleaved-1f1b`` Megatron-LM's order, microbatches in
  groups of ``P`` through all chunks, so that nothing waits on stage 0 as under circular's
  order); stage 0 takes each microbatch's input off the ``xs`` channel, and the last stage's
  outputs go to their blocks on the ``ys`` channel. Nothing is saved but the custom VJP's
  residuals, the stage parameters and the blocks of ``xs`` -- and, for layers with RNG streams
  or batch statistics, the state each chunk had before each microbatch (``M`` copies of that
  small state), so that the backward loop reruns every chunk with what its forward pass saw
  (the same dropout mask). The state itself is not differentiated.
* Backward pass: the 1F1B loop of :func:`meshpar.parallel.schedule.onef1b_table`, a
  ``lax.scan`` over *ticks*; at each tick each stage runs one forward **or** one backward of one
  microbatch on one chunk of its layers:

  1. What arrived from the neighbours at the end of the previous tick is written into this
     stage's buffers: a forward activation (the input of one of its chunks) into the *stash*
     ``[S, mb, ...]``, a gradient into the *cotangent buffer* ``[C, mb, ...]``, at the slots the
     table assigned, and an input gradient ``dxs[m]`` this stage keeps into its block (over
     ``xs[m]``, read for the last time before). ``S`` and ``C`` are the most values ever live
     at once on a stage: they depend on ``P`` and ``v``, not on ``M``.
  2. Backward, under a ``lax.switch`` (idle / recompute / from residuals): the chunk's
     ``jax.vjp`` applied to its output's gradient (the cotangent buffer, or ``dys[m]`` for the
     last chunk, from this stage's block or the ``dys`` channel); the weight gradient is added
     to this stage's accumulator, the input gradient goes to the previous stage (or, for
     chunk 0, on the ``dxs`` channel to its block). Which vjp depends on
     :attr:`~meshpar.parallel.schedule.PipelineConfig.remat`:

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
     its forward at once).
  3. Forward, under ``lax.cond``: the chunk on its input (the stash, or ``xs[m]`` for chunk 0,
     from this stage's block or the ``xs`` channel); the result goes to the next stage
     (without remat: with its vjp's residuals, written into their slot).
  4. Two ``ppermute``s: activations (and the ``dys`` channel) one stage forward, gradients (and
     the ``xs`` and ``dxs`` channels) one stage back (a ring for the interleaved schedule, a
     line for 1f1b forward; the gradients' ring carries ``dxs`` from stage 0 to ``P - 1``).

  Each ``cond`` carries only what it changes (the backward one: the weight-gradient
  accumulator; the buffers are read and written outside it): issue 16's feasibility study found
  that a single ``lax.switch`` over all the state made XLA copy the buffers at every tick (+30%
  time; not re-measured here). Idle ticks compute nothing (``cond``, not ``where``), so no
  garbage (NaN) reaches a result.

Why a custom VJP and not a loop at train-step level: the layer stack is one call inside the
user's model (:func:`meshpar.parallel.stack.scan_layers`), with the embedding before it and the
head and loss after it; a loop that also ran the loss head per microbatch would need the model
cut into three parts. A custom VJP keeps the model unchanged and any loss. The price: the
head's backward runs before the loop, so its output gradient ``dys`` exists whole (in blocks) when
the loop starts, as does ``xs``; and the forward pass runs once before the loop: each chunk's
forward runs twice per microbatch, as under GPipe with its stage remat (three times with
``remat=True``: about 25% more work for a stage whose backward costs two forwards;
``tests/test_onef1b.py`` counts them).

Memory (per device): the stash and cotangent buffer, ``S + C`` activations of one microbatch
(:attr:`~meshpar.parallel.schedule.PipelineConfig.activation_slots`; with ``remat``, ``P + 1``
for 1f1b and about ``(v+1)*P`` for interleaved 1f1b, the inputs then living until their
backward; without, fewer), without ``remat`` the residual slots (each one chunk forward's
residuals: under the layer scan's ``full`` remat its layers' inputs, ``c`` activations; under
``none`` all their intermediates), one chunk's intermediates inside a backward tick, the
weight-gradient accumulator, and the blocks of the boundary values, ``2 M / P`` activations.
Flat in ``M`` but for those blocks; ``tests/test_onef1b.py`` checks it in ``memory_analysis``.
What else grows with ``M`` in a train step is the model's own batch outside the stack
(embedding, logits, loss), split over the stages by rows: measured on the whole compiled step
of a d = 256 GPT (8 layers, ``pipe=4,data=2``, 4 rows a microbatch, sequence 64), temporaries
at ``M = 32`` are 1.07x those at ``M = 8`` (GPipe 1.22x; with the boundary values whole on every
device, as until 2026-12-03, 1.14x for 1f1b and 1.26x for interleaved); the tiny preset
(d = 64, a 256-token vocabulary: logits 4x an activation per row) grows 1.19x (1f1b) and 1.47x
(interleaved) for its head (benchmarks/README.md, "1F1B").

Collectives: inside the loops only the two ``ppermute``s per tick (plus what ``tensor``
parallelism puts inside a stage), wider than the schedule's own activation by the channels (3
activations per forward-loop iteration, 5 per tick: more bytes on ``pipe`` than the all-gathers
and all-reduces over the stages that moved the whole boundary values before 2026-12-03, about
1.7x on the tiny preset's step). The boundary values enter and leave in blocks (all-to-alls
outside the loops). The weights are cast to "varying" over the batch axes before the loop and
their gradient summed over them once after it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from meshpar.parallel.residuals import VjpResiduals
from meshpar.parallel.schedule import PipelineConfig, onef1b_forward, onef1b_table
from meshpar.parallel.varying import (cast_varying, enter_stage, ppermute_bits, psum_wide,
                                      refuse_traced_closure, restore_stage_slot, select_chunk)

__all__ = ["onef1b_apply"]

PyTree = Any


def _write(buf: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    # buf[slot] = value where slot >= 0, else unchanged (a select: garbage in `value` stays out).
    i = jnp.maximum(slot, 0)
    return buf.at[i].set(jnp.where(slot >= 0, value, buf[i]))


def _pick(buf: jax.Array, slot: jax.Array, other: jax.Array) -> jax.Array:
    # buf[slot] where slot >= 0, else other.
    return jnp.where(slot >= 0, buf[jnp.maximum(slot, 0)], other)


def _filled(like, fill: jax.Array | None) -> jax.Array:
    # An idle value shaped like `like`: zeros, or the bubble_fill testing hook's value.
    return jnp.zeros_like(like) if fill is None else jnp.full_like(like, fill)


def _shift(n_stages: int, step: int, *, ring: bool) -> tuple[tuple[int, int], ...]:
    # Each stage to the one `step` (+1 or -1) away, along a line or round the ring (which, with
    # one stage and several chunks, is the stage to itself).
    if ring:
        return tuple((i, (i + step) % n_stages) for i in range(n_stages))
    return tuple((i, i + step) for i in range(n_stages) if 0 <= i + step < n_stages)


def _forward(run_chunk: Callable, mesh: Mesh, config: PipelineConfig, param_spec, act_spec,
             bubble_fill: float | None) -> Callable:
    # The forward loop (onef1b_forward's table): each stage runs item t - s at iteration t;
    # stage 0 takes a microbatch's first chunk input off the xs channel (or its own block) and
    # its later ones from the last stage; the last stage's final outputs go to their blocks on
    # the ys channel. Not differentiated: the backward pass is _backward's loop.
    table = onef1b_forward(config)
    routes = table.routes
    n_stages, v, axis, micro = config.stages, config.repeats, config.axis, config.microbatches
    manual = (axis, *config.batch_axes)
    columns = tuple(np.ascontiguousarray(a.T) for a in (
        table.microbatch, table.repeat, *dataclasses.astuple(routes.inbound["xs"]),
        *dataclasses.astuple(routes.outbound["ys"])[:3]))
    ys_last = routes.outbound["ys"].last
    fwd_perm = _shift(n_stages, +1, ring=v > 1)
    block_spec = PartitionSpec(axis, *tuple(act_spec)[1:])

    def local(params, xs, state):
        # xs: this stage's block [q, mb, ...] of the stack's input.
        params, state, xs, stage, fill = enter_stage(params, state, xs, repeats=v, manual=manual,
                                                     mesh=mesh, axis=axis, bubble_fill=bubble_fill)
        refuse_traced_closure(run_chunk, select_chunk(params, 0, v), select_chunk(state, 0, v),
                              xs[0])
        # The state each chunk had before each microbatch, [(v,) M, c, ...], so that the
        # backward loop reruns every chunk with what its forward pass saw.
        hist = jax.tree.map(lambda a: jnp.stack([a] * micro, axis=0 if v == 1 else 1), state)

        def iteration(state, hist, r, m, x, valid):
            chunk, st, h = (select_chunk(t, r, v) for t in (params, state, hist))

            def live(chunk, st, h, x):
                y, new = run_chunk(chunk, st, x)
                h = jax.tree.map(lambda a, b: a.at[m].set(b), h, st)
                return y, new, h

            # A bubble computes nothing and leaves the state as it was.
            y, st, h = jax.lax.cond(valid, live, lambda c, s, h, x: (x, s, h), chunk, st, h, x)
            if v == 1:
                return y, st, h
            put = lambda whole, part: jax.tree.map(lambda a, b: a.at[r].set(b), whole, part)  # noqa: E731
            return y, put(state, st), put(hist, h)

        def step(carry, col):
            incoming, xs_in, ys_in, out, state, hist = carry
            m, r, xs_load, xs_take, ys_send, ys_keep, ys_store = (c[stage] for c in col)
            out = _write(out, ys_store, ys_in)
            valid = m >= 0
            x = jnp.where((stage == 0) & (r == 0), _pick(xs, xs_take, xs_in), incoming)
            if fill is not None:
                x = jnp.where(valid, x, fill)
            y, state, hist = iteration(state, hist, jnp.maximum(r, 0), jnp.maximum(m, 0), x,
                                       valid)
            out = _write(out, ys_keep, y)
            xs_out = _pick(xs, xs_load, xs_in)
            ys_out = jnp.where(ys_send > 0, y, ys_in)
            incoming = ppermute_bits(y, axis, fwd_perm)
            xs_in, ys_in = ppermute_bits(jnp.stack([xs_out, ys_out]), axis,
                                           _shift(n_stages, -1, ring=False))
            return (incoming, xs_in, ys_in, out, state, hist), None

        msg = cast_varying(_filled(xs[0], fill), manual, mesh)
        out = _filled(xs, fill)
        carry = (msg, msg, msg, cast_varying(out, manual, mesh), state, hist)
        (_, _, ys_in, out, state, hist), _ = jax.lax.scan(step, carry, columns)
        # An output still on its way after the last iteration arrives with the final carry.
        out = _write(out, jnp.asarray(ys_last)[stage], ys_in)
        return out, restore_stage_slot(state, v), restore_stage_slot(hist, v)

    return jax.shard_map(local, mesh=mesh, in_specs=(param_spec, block_spec, param_spec),
                         out_specs=(block_spec, param_spec, param_spec), axis_names=set(manual))


def _backward(run_chunk: Callable, mesh: Mesh, config: PipelineConfig, param_spec, act_spec,
              bubble_fill: float | None) -> Callable:
    table = onef1b_table(config)
    routes = table.routes
    n_stages, v, axis = config.stages, config.repeats, config.axis
    manual = (axis, *config.batch_axes)
    # Per-tick columns [T, P]; each stage picks its entry.
    columns = tuple(np.ascontiguousarray(a.T) for a in (
        table.forward_mb, table.forward_rep, table.forward_slot, table.forward_res,
        table.backward_mb, table.backward_rep, table.backward_slot, table.backward_res,
        table.backward_cot, table.recv_forward, table.recv_backward,
        *dataclasses.astuple(routes.inbound["xs"]), *dataclasses.astuple(routes.inbound["dys"]),
        *dataclasses.astuple(routes.outbound["dxs"])[:3]))
    dxs_last = routes.outbound["dxs"].last
    # Activations go one stage forward (a ring for the interleaved schedule, a line for 1f1b);
    # gradients one stage back round the ring, whose link from stage 0 to P-1 the input
    # gradients take to their stages (meshpar.parallel.routes).
    fwd_perm = _shift(n_stages, +1, ring=v > 1)
    bwd_perm = _shift(n_stages, -1, ring=v > 1 or n_stages > 1)
    # The boundary values' blocks: microbatch m on stage m // q (meshpar.parallel.routes).
    block_spec = PartitionSpec(axis, *tuple(act_spec)[1:])

    def acc_dtype(dtype):
        # Sum sub-32-bit weight gradients in float32 across the M microbatches; round once.
        return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype

    def local(params, xs, dys, hist):
        # xs, dys: this stage's blocks [q, mb, ...] of the stack's input and output gradient.
        # hist: the state each chunk had before each microbatch ([(v,) M, c, ...]; None for
        # stateless layers), so that every rerun of a chunk sees what its forward pass saw.
        # io: the block of xs, each xs[m] overwritten by dxs[m] when that arrives (after the
        # last read of xs[m]: chunk 0's backward of m, which makes it, follows every read).
        params, hist, io, stage, fill = enter_stage(params, hist, xs, repeats=v, manual=manual,
                                                    mesh=mesh, axis=axis, bubble_fill=bubble_fill)
        dys = cast_varying(dys, manual, mesh)

        def empty(n):
            shape = (n, *xs.shape[1:])
            return jnp.zeros(shape, xs.dtype) if fill is None else jnp.full(shape, fill)

        def idle_value(x):
            return _filled(x, fill)

        stash, cot = cast_varying((empty(table.stash_slots), empty(table.cot_slots)), manual, mesh)
        acc = cast_varying(jax.tree.map(lambda a: jnp.zeros(a.shape, acc_dtype(a.dtype)), params),
                           manual, mesh)
        msg = cast_varying(idle_value(xs[0]), manual, mesh)

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
            residuals = VjpResiduals(lambda c, x: chunk_vjp(c, 0, 0, x),
                                     select_chunk(params, 0, v),
                                     xs[0])
        res = () if residuals is None else cast_varying(
            residuals.buffers(table.res_slots, fill), manual, mesh)

        def forward(params, r, m, x):
            if residuals is None:
                return run_chunk(select_chunk(params, r, v), state_of(r, m), x)[0], ()
            chunk = select_chunk(params, r, v)
            y, vjp = chunk_vjp(chunk, r, m, x)
            return y, cast_varying(residuals.keep(vjp, chunk), manual, mesh)

        def skip_forward(params, r, m, x):
            if residuals is None:
                return idle_value(x), ()
            return idle_value(x), cast_varying(residuals.placeholders(), manual, mesh)

        def backward(acc, params, r, m, x, dy, kept):
            # Recompute the chunk's forward from its input x, then apply dy.
            d_chunk, dx = chunk_vjp(select_chunk(params, r, v), r, m, x)[1](dy)
            return accumulate(acc, r, d_chunk), dx

        def backward_kept(acc, params, r, m, x, dy, kept):
            # The forward tick's residuals: no recomputation.
            d_chunk, dx = residuals.vjp(kept, select_chunk(params, r, v))(dy)
            return accumulate(acc, r, d_chunk), dx

        def skip_backward(acc, params, r, m, x, dy, kept):
            return acc, idle_value(x)

        # Backward branches by index: idle, recompute, from the forward tick's residuals.
        backwards = (skip_backward, backward) + (() if residuals is None else (backward_kept,))

        def tick(carry, col):
            f_in, b_in, xs_in, dys_in, dxs_in, stash, cot, res, acc, io = carry
            (fm, fr, fslot, fres, bm, br, bslot, bres, bcot, recv_f, recv_b, xs_load, xs_take,
             dys_load, dys_take, dxs_send, dxs_keep, dxs_store) = (c[stage] for c in col)
            stash = _write(stash, recv_f, f_in)
            cot = _write(cot, recv_b, b_in)
            io = _write(io, dxs_store, dxs_in)
            # Chunk 0's input: from this stage's block or off the xs channel; the last chunk's
            # output gradient: from the block or off the dys channel.
            xb = _pick(stash, bslot, _pick(io, xs_take, xs_in))
            dy = _pick(cot, bcot, _pick(dys, dys_take, dys_in))
            kept = tuple(b[jnp.maximum(bres, 0)] for b in res)
            branch = jnp.where(bm < 0, 0, jnp.where(bres >= 0, 2, 1))
            acc, dx = jax.lax.switch(branch, backwards, acc, params, jnp.maximum(br, 0),
                                     jnp.maximum(bm, 0), xb, dy, kept)
            # Chunk 0's input gradient of a microbatch this stage owns goes into its block,
            # over xs[m] (read for the last time by now).
            io = _write(io, dxs_keep, dx)
            # The forward and the channel reads take io after those writes (never the slots
            # written), so every read of io is ordered before or after each in-place update.
            # A read before an update, unordered, made XLA copy the whole buffer in every tick
            # (two `copy`s in the loop body of the compiled step, measured 2026-12-01).
            x = _pick(stash, fslot, _pick(io, xs_take, xs_in))
            y, new_kept = jax.lax.cond(fm >= 0, forward, skip_forward, params,
                                       jnp.maximum(fr, 0), jnp.maximum(fm, 0), x)
            res = tuple(_write(b, fres, k) for b, k in zip(res, new_kept))
            # The channels ride along the two permutes: a stage sends from its block where the
            # routes say so, else relays what arrived.
            xs_out = _pick(io, xs_load, xs_in)
            dys_out = _pick(dys, dys_load, dys_in)
            dxs_out = jnp.where(dxs_send > 0, dx, dxs_in)
            f_out, dys_in = ppermute_bits(jnp.stack([y, dys_out]), axis, fwd_perm)
            b_out, xs_in, dxs_in = ppermute_bits(jnp.stack([dx, xs_out, dxs_out]), axis,
                                                 bwd_perm)
            return (f_out, b_out, xs_in, dys_in, dxs_in, stash, cot, res, acc, io), None

        carry = (msg, msg, msg, msg, msg, stash, cot, res, acc, io)
        carry, _ = jax.lax.scan(tick, carry, columns)
        dxs_in, acc, dxs = carry[4], carry[8], carry[9]
        # An input gradient still on its way after the last tick arrives with the final carry.
        dxs = _write(dxs, jnp.asarray(dxs_last)[stage], dxs_in)
        # Once, after the loop: the weight gradient over the batch shards.
        if config.batch_axes:
            acc = jax.tree.map(lambda a: psum_wide(a, tuple(config.batch_axes), mesh), acc)
        grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
        return restore_stage_slot(grads, v), dxs

    return jax.shard_map(local, mesh=mesh,
                         in_specs=(param_spec, block_spec, block_spec, param_spec),
                         out_specs=(param_spec, block_spec), axis_names=set(manual))


def _no_cotangent(shape: jax.ShapeDtypeStruct) -> jax.Array | np.ndarray:
    # The layers' state is not differentiated: zeros (float0 for integers and PRNG keys).
    if jnp.issubdtype(shape.dtype, jnp.inexact):
        return jnp.zeros(shape.shape, shape.dtype)
    return np.zeros(shape.shape, jax.dtypes.float0)


def onef1b_apply(run_chunk: Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, PyTree]],
                 stage_params: PyTree, inputs: jax.Array, stage_state: PyTree | None = None, /,
                 *, mesh: Mesh, config: PipelineConfig, param_spec: PartitionSpec,
                 act_spec: PartitionSpec, bubble_fill: float | None = None,
                 ) -> jax.Array | tuple[jax.Array, PyTree]:
    """The 1F1B forward loop, differentiated by the 1F1B backward loop.

    Called by :func:`meshpar.parallel.pipeline.pipeline_apply` for the ``1f1b`` and
    ``interleaved-1f1b`` schedules, which checks the arguments; use that.

    Args:
        run_chunk: ``run_chunk(chunk_params, chunk_state, x) -> (y, new_chunk_state)`` for one
            microbatch (shape-checked; the state is ``None`` for stateless layers).
        stage_params: ``[P, c, ...]`` or ``[v, P, c, ...]`` stage parameters.
        inputs: ``[M, mb, ...]`` microbatches.
        stage_state: the layers' state in stage layout, or ``None``.
        mesh, config: the mesh and the pipeline (a 1F1B schedule).
        param_spec, act_spec: the ``shard_map`` specs of the parameters and of one
            microbatch-major activation (its batch axes; the microbatch dimension goes in
            blocks over the stages).
        bubble_fill: testing hook: idle ticks emit, and the buffers start as, this value.

    Returns:
        ``[M, mb, ...]`` outputs; with ``stage_state``, ``(outputs, new stage state)``.

    Example:
        >>> from jax.sharding import PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.parallel.pipeline import stack_stages
        >>> from meshpar.parallel.schedule import PipelineConfig
        >>> def run_chunk(w, state, x):                 # w: [c, d, d]; stateless layers
        ...     return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0], state
        >>> cfg = PipelineConfig(stages=2, microbatches=4, schedule="1f1b")
        >>> staged = stack_stages(jnp.ones((4, 16, 16)) / 16, stages=2)   # [2, 2, 16, 16]
        >>> y = onef1b_apply(run_chunk, staged, jnp.ones((4, 8, 16)),
        ...                  mesh=make_mesh(pipe=2, data=4), config=cfg,
        ...                  param_spec=P("pipe"), act_spec=P())
        >>> y.shape
        (4, 8, 16)
    """
    forward = _forward(run_chunk, mesh, config, param_spec, act_spec, bubble_fill)
    backward = _backward(run_chunk, mesh, config, param_spec, act_spec, bubble_fill)
    state_shapes = jax.eval_shape(lambda s: s, stage_state)
    micro = config.microbatches
    # The boundary values go in blocks over the stages: the microbatch dimension padded to a
    # multiple of them (the padding is never read).
    pad = onef1b_table(config).routes.block * config.stages - micro

    def blocks(a):
        return a if not pad else jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))

    @jax.custom_vjp
    def pipeline(params, xs, state):
        out, new_state, _ = forward(params, blocks(xs), state)
        return out[:micro], new_state

    def pipeline_fwd(params, xs, state):
        xs = blocks(xs)
        out, new_state, hist = forward(params, xs, state)
        return (out[:micro], new_state), (params, xs, hist)

    def pipeline_bwd(residuals, cotangents):
        params, xs, hist = residuals
        d_params, d_xs = backward(params, xs, blocks(cotangents[0]), hist)
        return d_params, d_xs[:micro], jax.tree.map(_no_cotangent, state_shapes)

    pipeline.defvjp(pipeline_fwd, pipeline_bwd)
    out, new_state = pipeline(stage_params, inputs, stage_state)
    return out if stage_state is None else (out, new_state)
