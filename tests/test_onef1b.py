"""1F1B and interleaved 1F1B (``meshpar.parallel.onef1b``) against the sequential reference.

The pipeline core is checked as in ``tests/test_pipeline.py`` (same residual-MLP stage, same
reference, same tolerances, its ``run_case``): outputs, loss and ``jax.grad`` w.r.t. every layer
parameter and the inputs, for pipe = 2 and 4, M in {P, 2P, 4P}, both schedules, alone and with
``data`` (manual), ``tensor`` and ``fsdp`` (automatic inside the stages). Then: the tick tables
and the forward loop's table replayed symbolically with the routes of the stack's boundary
values (every read finds the value it needs, every output reaches its block), NaN in every idle
slot and empty buffer never reaching a result, ``memory_analysis`` flat in M (GPipe's growing
beside it; the whole train step within 1.1x from M = 8 to 32), the collectives inside the
loops, and the errors. Trainer-level GPT runs (loss, gradients and
parameters after 3 steps against one device) are in ``tests/test_pipeline_train.py``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import meshpar as mp
import meshpar.cli
from meshpar.errors import StrategyError
from meshpar.inspect.hlo import collectives
from meshpar.mesh import make_mesh
from meshpar.models import GPT, get_preset, lm_loss
from meshpar.parallel.residuals import VjpResiduals
from meshpar.parallel.pipeline import PipelineConfig, pipeline_apply, stack_stages
from meshpar.parallel.schedule import (Schedule, activation_bound, onef1b_forward,
                                      onef1b_table)
from meshpar.train import TrainConfig

from test_pipeline_train import PlainMLP, _regression_loss
from test_pipeline import (MEM_D, MEM_F, MEM_LAYERS, MEM_MB, TP_RULES, Case, make_layers,
                           run_case, stage_fn)

NAN = float("nan")


def one(p, m, **kw):
    return PipelineConfig(stages=p, microbatches=m, schedule="1f1b", **kw)


def inter(p, m, v=2, **kw):
    return PipelineConfig(stages=p, microbatches=m, schedule="interleaved-1f1b", repeats=v, **kw)


DATA = {"batch_axes": ("data",)}
TP = {"tensor": "tensor"}
KEEP = {"remat": False}   # stash each forward tick's vjp residuals instead of recomputing

CASES = [
    # pipe = 4 (M = P, 2P, 4P); NaN in every idle slot and empty buffer of the M = P runs. Both
    # backward kinds (recompute from the stashed input: remat, the PipelineConfig default; the
    # forward tick's residuals: KEEP, the Trainer's default for 1F1B), each schedule and each
    # companion axis under each, NaN-filled under each.
    Case({"pipe": 4, "data": 2}, one(4, 4, **KEEP), 8, bubble_fill=NAN),
    Case({"pipe": 4, "data": 2}, one(4, 8, **DATA), 4, ("data",)),
    Case({"pipe": 4, "data": 2}, one(4, 16), 4),
    Case({"pipe": 4, "data": 2}, inter(4, 4, **KEEP), 8, bubble_fill=NAN),
    Case({"pipe": 4, "tensor": 2}, one(4, 8, **KEEP), 4, (), TP, (("mlp", "tensor"),)),
    Case({"pipe": 4, "fsdp": 2}, inter(4, 4), 8, ("fsdp",), {"fsdp": "fsdp"}),
    # pipe = 2, with data (manual), tensor (Megatron weights, constrained activations) and fsdp
    # (ZeRO-3-style weights gathered inside the stage, batch split over fsdp).
    Case({"pipe": 2, "data": 4}, one(2, 2, **DATA, **KEEP), 4, ("data",), bubble_fill=NAN),
    Case({"pipe": 2, "data": 2, "tensor": 2}, one(2, 4, **DATA), 4, ("data",), TP, TP_RULES,
         bubble_fill=NAN),
    Case({"pipe": 2, "fsdp": 2, "tensor": 2}, one(2, 8, **KEEP), 4, ("fsdp",),
         {"tensor": "tensor", "fsdp": "fsdp"}),
    Case({"pipe": 2, "data": 4}, inter(2, 2, **DATA), 4, ("data",), bubble_fill=NAN),
    Case({"pipe": 2, "data": 2, "tensor": 2}, inter(2, 4, **DATA, **KEEP), 8, ("data",), TP,
         TP_RULES),
    Case({"pipe": 2, "data": 2, "fsdp": 2}, inter(2, 8, **DATA, **KEEP), 4, (("data", "fsdp"),),
         {"fsdp": "fsdp"}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_sequential_reference(case):
    hlo = run_case(case, return_hlo=True)
    # Inside the loops: only the stage permutes (forward loop: 1; 1F1B loop: activations forward,
    # gradients back), plus tensor all-reduces inside a stage's layers. Every reduction over the
    # manual batch axes and over the stages happens once, after the loops.
    mesh = make_mesh(**case.mesh)
    in_loop = {(o.kind, o.mesh_axes) for o in collectives(hlo, mesh=mesh) if o.in_loop}
    allowed = {("collective-permute", ("pipe",))}
    if "tensor" in case.mesh:
        allowed |= {("all-reduce", ("tensor",))}
    if "fsdp" in case.mesh and "fsdp" not in case.config.batch_axes:
        # Weights sharded over an automatic fsdp are gathered per use inside the stage, and
        # their gradients reduced there: ZeRO-3 inside a pipeline, as with GPipe.
        allowed |= {(k, ("fsdp",)) for k in ("all-gather", "all-reduce", "reduce-scatter",
                                             "all-to-all")}
    assert ("collective-permute", ("pipe",)) in in_loop
    assert in_loop <= allowed, in_loop


# --- the tick tables --------------------------------------------------------------------------

TABLE_CONFIGS = [one(1, 3), one(2, 2), one(2, 5), one(4, 4), one(4, 9), one(3, 12),
                 inter(2, 2), inter(2, 6, v=3), inter(4, 4), inter(4, 12), inter(3, 6, v=2)]
TABLE_CONFIGS += [dataclasses.replace(c, remat=False) for c in TABLE_CONFIGS]


@pytest.mark.parametrize("cfg", TABLE_CONFIGS,
                         ids=lambda c: f"{c.schedule.value}-P{c.stages}-M{c.microbatches}"
                                       f"-v{c.repeats}" + ("" if c.remat else "-noremat"))
def test_tables_replayed_symbolically(cfg):
    # Replay the loop with labels instead of arrays: each forward and backward must read the
    # input (and gradient) of exactly its own (microbatch, chunk) -- or, without remat, the
    # residuals its own forward tick left -- and every one must run once.
    t = onef1b_table(cfg)
    P_, v, M = cfg.stages, cfg.repeats, cfg.microbatches
    V = P_ * v
    # The boundary values in their blocks (microbatch m on stage m // q, slot m % q), and what
    # each channel brought to each stage at the start of this tick (meshpar.parallel.routes).
    q, ins, outs = t.routes.block, t.routes.inbound, t.routes.outbound
    assert q * P_ >= M > (q - 1) * P_
    io = [[("x", s * q + j, 0) for j in range(q)] for s in range(P_)]
    dys = [[("dy", s * q + j, V - 1) for j in range(q)] for s in range(P_)]
    chan = {"xs": [None] * P_, "dys": [None] * P_, "dxs": [None] * P_}
    stash = [[None] * t.stash_slots for _ in range(P_)]
    cot = [[None] * t.cot_slots for _ in range(P_)]
    res = [[None] * t.res_slots for _ in range(P_)]
    assert (t.res_slots > 0) == (not cfg.remat and V > 1)
    f_msg, b_msg = [None] * P_, [None] * P_
    ran_f, ran_b = set(), set()
    for k in range(t.ticks):
        for s in range(P_):
            if t.recv_forward[s, k] >= 0:
                assert f_msg[(s - 1) % P_] is not None, (k, s)
                stash[s][t.recv_forward[s, k]] = f_msg[(s - 1) % P_]
            if t.recv_backward[s, k] >= 0:
                assert b_msg[(s + 1) % P_] is not None, (k, s)
                cot[s][t.recv_backward[s, k]] = b_msg[(s + 1) % P_]
            if outs["dxs"].store[s, k] >= 0:
                assert chan["dxs"][s] is not None, (k, s)
                io[s][outs["dxs"].store[s, k]] = chan["dxs"][s]

        def boundary(name, blocks, s):
            # The value read this tick: from the stage's block, or off the channel.
            slot = ins[name].take[s, k]
            return blocks[s][slot] if slot >= 0 else chan[name][s]

        f_msg, b_msg = [None] * P_, [None] * P_
        dx_made = [None] * P_
        for s in range(P_):
            assert not (t.forward_mb[s, k] >= 0 and t.backward_mb[s, k] >= 0), (k, s)
            if t.forward_mb[s, k] >= 0:
                m, g = int(t.forward_mb[s, k]), int(t.forward_rep[s, k]) * P_ + s
                slot = t.forward_slot[s, k]
                got = boundary("xs", io, s) if slot < 0 else stash[s][slot]
                assert got == ("x", m, g), (k, s, got, m, g)
                assert g < V - 1      # the last chunk's forward is left to its backward
                ran_f.add((m, g))
                f_msg[s] = ("x", m, g + 1)
                assert (t.forward_res[s, k] >= 0) == (not cfg.remat), (k, s)
                if t.forward_res[s, k] >= 0:
                    res[s][t.forward_res[s, k]] = ("res", m, g)
            if t.backward_mb[s, k] >= 0:
                m, g = int(t.backward_mb[s, k]), int(t.backward_rep[s, k]) * P_ + s
                slot, c = t.backward_slot[s, k], t.backward_cot[s, k]
                if t.backward_res[s, k] >= 0:       # its forward tick's residuals
                    assert g < V - 1 and res[s][t.backward_res[s, k]] == ("res", m, g), (k, s)
                else:                               # recompute from the input
                    assert cfg.remat or g == V - 1, (k, s)
                    got = boundary("xs", io, s) if slot < 0 else stash[s][slot]
                    assert got == ("x", m, g), (k, s, got)
                got = boundary("dys", dys, s) if c < 0 else cot[s][c]
                assert got == ("dy", m, g), (k, s, got)
                assert g == 0 or (m, g - 1) not in ran_b
                ran_b.add((m, g))
                b_msg[s] = ("dy", m, g - 1)
                if g == 0:
                    dx_made[s] = ("dx", m)
                    if outs["dxs"].keep[s, k] >= 0:
                        io[s][outs["dxs"].keep[s, k]] = ("dx", m)
        # The channels' sends, after this tick's writes (as the loop reads its blocks), move one
        # stage: xs and dxs back round the ring of the gradients, dys forward.
        sent = {
            "xs": [io[s][ins["xs"].load[s, k]] if ins["xs"].load[s, k] >= 0 else chan["xs"][s]
                   for s in range(P_)],
            "dys": [dys[s][ins["dys"].load[s, k]] if ins["dys"].load[s, k] >= 0
                    else chan["dys"][s] for s in range(P_)],
            "dxs": [dx_made[s] if outs["dxs"].send[s, k] else chan["dxs"][s] for s in range(P_)],
        }
        for s in range(P_):
            if outs["dxs"].send[s, k]:
                assert dx_made[s] is not None, (k, s)
        chan = {"xs": [sent["xs"][(s + 1) % P_] for s in range(P_)],
                "dxs": [sent["dxs"][(s + 1) % P_] for s in range(P_)],
                "dys": [sent["dys"][(s - 1) % P_] for s in range(P_)]}
    for s in range(P_):
        if outs["dxs"].last[s] >= 0:
            io[s][outs["dxs"].last[s]] = chan["dxs"][s]
    # Every input gradient in its owner's block, over the stack input it replaced.
    assert [b[j] for b in io for j in range(q)][:M] == [("dx", m) for m in range(M)], io
    assert ran_f == {(m, g) for m in range(M) for g in range(V - 1)}
    assert ran_b == {(m, g) for m in range(M) for g in range(V)}
    assert 0 <= t.bubble_fraction < 1


@pytest.mark.parametrize("cfg", TABLE_CONFIGS[: len(TABLE_CONFIGS) // 2],
                         ids=lambda c: f"{c.schedule.value}-P{c.stages}-M{c.microbatches}"
                                       f"-v{c.repeats}")
def test_forward_loop_replayed_symbolically(cfg):
    # The 1F1B forward loop with labels: every chunk runs every microbatch once, microbatches
    # in order on each chunk, on its own previous chunk's output (chunk 0: the stack's input,
    # fetched from its block), and every output reaches its owner's block.
    f = onef1b_forward(cfg)
    P_, v, M = cfg.stages, cfg.repeats, cfg.microbatches
    V = P_ * v
    q, xs_route, ys_route = f.routes.block, f.routes.inbound["xs"], f.routes.outbound["ys"]
    xs = [[("x", s * q + j, 0) for j in range(q)] for s in range(P_)]
    out = [[None] * q for _ in range(P_)]
    incoming, xs_in, ys_in = [None] * P_, [None] * P_, [None] * P_
    seen = {g: [] for g in range(V)}
    for t in range(f.iterations):
        y = [None] * P_
        for s in range(P_):
            if ys_route.store[s, t] >= 0:
                out[s][ys_route.store[s, t]] = ys_in[s]
            m, r = int(f.microbatch[s, t]), int(f.repeat[s, t])
            if m < 0:
                continue
            g = r * P_ + s
            if g == 0:
                slot = xs_route.take[s, t]
                x = xs[s][slot] if slot >= 0 else xs_in[s]
            else:
                x = incoming[s]
            assert x == ("x", m, g), (t, s, x, m, g)
            seen[g].append(m)
            y[s] = ("x", m, g + 1) if g < V - 1 else ("y", m)
            if ys_route.keep[s, t] >= 0:
                assert g == V - 1
                out[s][ys_route.keep[s, t]] = y[s]
        xs_sent = [xs[s][xs_route.load[s, t]] if xs_route.load[s, t] >= 0 else xs_in[s]
                   for s in range(P_)]
        ys_sent = [y[s] if ys_route.send[s, t] else ys_in[s] for s in range(P_)]
        incoming = [y[(s - 1) % P_] if v > 1 or s > 0 else None for s in range(P_)]
        xs_in = [xs_sent[s + 1] if s < P_ - 1 else None for s in range(P_)]
        ys_in = [ys_sent[s + 1] if s < P_ - 1 else None for s in range(P_)]
    for s in range(P_):
        if ys_route.last[s] >= 0:
            out[s][ys_route.last[s]] = ys_in[s]
    assert all(seen[g] == list(range(M)) for g in range(V)), seen
    assert [b[j] for b in out for j in range(q)][:M] == [("y", m) for m in range(M)], out


def test_buffers_do_not_grow_with_microbatches():
    for make, p in ((one, 2), (one, 4), (inter, 2), (inter, 4)):
        slots = [make(p, m).activation_slots for m in (p, 2 * p, 4 * p, 8 * p)]
        gpipe = [PipelineConfig(p, m).activation_slots for m in (p, 8 * p)]
        # M = P may not reach the steady state; from 2P on the buffers stay the same.
        assert slots[0] <= slots[1] == slots[2] == slots[3] <= 4 * p, (make, p, slots)
        assert gpipe[1] > gpipe[0]
    assert one(4, 8).activation_slots == 5                                    # P + 1
    assert "flat in M" in activation_bound(one(4, 8))
    assert "linear in M" in activation_bound(PipelineConfig(4, 8))


@pytest.mark.parametrize("remat,first_stage", [(True, 3), (False, 2)])
def test_forwards_per_chunk_and_microbatch(remat, first_stage):
    # Count the chunk's forward runs per stage (a host callback inside stage_fn). Stage 0 (not
    # the last chunk): the forward loop, its forward tick, and with remat the recomputation in
    # its backward tick; without remat the backward applies the forward tick's residuals. The
    # last chunk has no forward tick: its backward always runs forward and backward together.
    calls: Counter = Counter()

    def counted(chunk, x):
        jax.debug.callback(lambda s: calls.update([int(s)]), jax.lax.axis_index("pipe"))
        return stage_fn(chunk, x)

    mesh, m = make_mesh(pipe=2, data=4), 4
    staged = {k: jax.device_put(v, NamedSharding(mesh, P("pipe")))
              for k, v in stack_stages(make_layers(4), stages=2).items()}
    loss = lambda s, x: jnp.sum(pipeline_apply(counted, s, x, mesh=mesh,  # noqa: E731
                                               config=one(2, m, remat=remat)))
    jax.block_until_ready(jax.jit(jax.grad(loss))(staged, jnp.ones((m, 8, 16))))
    jax.effects_barrier()
    assert dict(calls) == {0: first_stage * m, 1: 2 * m}, calls


def test_kept_residuals_leave_out_the_weights_and_what_the_weights_alone_make():
    # A layer that uses 2 * w1: its vjp's residuals are w2 (a weight: put back), 2 * w1 per layer
    # (made from the weights alone: recomputed in the backward tick) and the activations (kept).
    def layer2(h, w):
        return h + jnp.tanh(h @ (2.0 * w["w1"]) + w["b1"]) @ w["w2"], None

    def chunk_fn(chunk, x):
        return jax.lax.scan(layer2, x, chunk)[0]

    chunk = {k: v[:2] for k, v in make_layers(4).items()}
    seen = {}

    @jax.jit
    def grads(chunk, x, dy):
        residuals = VjpResiduals(lambda c, x: jax.vjp(chunk_fn, c, x), chunk, x)
        seen["r"] = residuals
        _, vjp = jax.vjp(chunk_fn, chunk, x)
        rebuilt = residuals.vjp(residuals.keep(vjp, chunk), chunk)
        return rebuilt(dy), vjp(dy)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)), jnp.float32)
    got, want = grads(chunk, x, jnp.cos(x))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got, want))
    r = seen["r"]
    assert sum(w is not None for w in r.weight_of) == 1 and sum(r.derived) == 1, r.derived
    # Only activations are kept: [layers, rows, width], no [layers, 16, 32] weight copy.
    assert {tuple(a.shape) for a in r.avals} == {(2, 8, 16), (2, 8, 32)}, r.avals


def test_residuals_a_remat_policy_offloads_are_refused_with_the_way_out():
    # Offloaded residuals live in host memory; the slots are device buffers (mixing them fails
    # inside XLA with a memory-space error). Refused by name instead.
    policy = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")

    def chunk_fn(chunk, x):
        return jax.lax.scan(jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), None), policy=policy),
                            x, chunk)[0]

    @jax.jit
    def probe(w, x):
        VjpResiduals(lambda c, x: jax.vjp(chunk_fn, c, x), w, x)
        return x

    with pytest.raises(StrategyError, match=r"puts 1 of them in host memory.*pipeline_remat=True"):
        probe(jnp.ones((3, 4, 4)), jnp.ones((2, 4)))


# --- memory -----------------------------------------------------------------------------------


def _vjp_temp_bytes(cfg: PipelineConfig, mesh) -> int:
    # The pipeline's own memory: the gradient of the stack for a given output gradient, with the
    # stack's input and output gradient as arguments (in a model they are its own activations,
    # M x |x| each, as on one device: see meshpar.parallel.onef1b, "Memory").
    staged = stack_stages(make_layers(MEM_LAYERS, d=MEM_D, f=MEM_F), stages=cfg.stages,
                          repeats=cfg.repeats)
    spec = P("pipe") if cfg.repeats == 1 else P(None, "pipe")
    staged = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, spec))
              for k, v in staged.items()}
    xs = jax.ShapeDtypeStruct((cfg.microbatches, MEM_MB, MEM_D), jnp.float32)

    def grads(staged, xs, dys):
        return jax.vjp(lambda s, x: pipeline_apply(stage_fn, s, x, mesh=mesh, config=cfg),
                       staged, xs)[1](dys)

    return jax.jit(grads).lower(staged, xs, xs).compile().memory_analysis().temp_size_in_bytes


def test_memory_flat_in_microbatches_where_gpipe_grows():
    mesh = make_mesh(pipe=4, data=2)
    x_bytes = MEM_MB * MEM_D * 4
    temps = {(s, v, m): _vjp_temp_bytes(PipelineConfig(4, m, s, v), mesh)
             for s, v in (("1f1b", 1), ("gpipe", 1)) for m in (8, 32)}
    # Keeping the forward ticks' residuals (remat=False): flat too, a chunk's residuals per
    # slot instead of its input.
    temps |= {("1f1b-keep", 1, m): _vjp_temp_bytes(one(4, m, remat=False), mesh) for m in (8, 32)}
    # (interleaved-1f1b: flat too, 0.26 MiB at M = 8 and 32 when measured; left out for the
    # suite's time, its buffers are bounded by test_buffers_do_not_grow_with_microbatches.)
    assert temps[("1f1b", 1, 32)] <= 1.1 * temps[("1f1b", 1, 8)], temps
    assert temps[("1f1b-keep", 1, 32)] <= 1.1 * temps[("1f1b-keep", 1, 8)], temps
    # GPipe: (v+1) x |x| per extra microbatch (tests/test_pipeline.py), at least the saved stage
    # input of each extra iteration here.
    assert temps[("gpipe", 1, 32)] - temps[("gpipe", 1, 8)] >= 24 * x_bytes, temps
    assert temps[("1f1b", 1, 32)] < temps[("gpipe", 1, 32)]


def _loss_grad_temp_bytes(cfg: PipelineConfig, mesh) -> int:
    # The stack inside a model: its input made by an element-wise layer in front (the embedding's
    # place), its output gradient by a loss behind it, so that the stack's input xs (the custom
    # VJP's residual), output gradient dys and input gradient dxs are temporaries, as in a step.
    # The rows are split over the batch axes and pipe, as the Trainer's compute rules split the
    # batch outside a pipelined stack.
    staged = stack_stages(make_layers(MEM_LAYERS, d=MEM_D, f=MEM_F), stages=cfg.stages,
                          repeats=cfg.repeats)
    staged = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P("pipe")))
              for k, v in staged.items()}
    x = jax.ShapeDtypeStruct((cfg.microbatches, MEM_MB, MEM_D), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, ("data", "pipe"))))

    def loss(staged, x):
        y = pipeline_apply(stage_fn, staged, jnp.tanh(x), mesh=mesh, config=cfg)
        return jnp.sum(jnp.square(y))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grads.lower(staged, x).compile().memory_analysis().temp_size_in_bytes


def test_stack_boundary_values_are_kept_in_blocks_over_the_stages():
    """With the stack inside a loss, 1F1B keeps 1/P of its boundary values per device.

    The stack's input xs and output gradient dys are M activations each, and the backward loop
    needs all of them; every device keeps only its block of each (meshpar.parallel.routes).
    Held whole on every device, as until 2026-12-03, one shared buffer of them cost a whole
    microbatch's activation per microbatch (here 4 |x| per device, |x| = 1/8 of one: data=2 x
    pipe=4), and the whole step of a d = 256 GPT grew 1.14x from M = 8 to 32
    (benchmarks/README.md, "1F1B").
    """
    mesh = make_mesh(pipe=4, data=2)
    x_bytes = MEM_MB * MEM_D * 4 // 8      # 1/8 of one microbatch's activation
    temps = {(s, m): _loss_grad_temp_bytes(PipelineConfig(4, m, s), mesh)
             for s in ("1f1b", "gpipe") for m in (8, 32)}
    slope = {s: (temps[(s, 32)] - temps[(s, 8)]) / 24 / x_bytes for s in ("1f1b", "gpipe")}
    # Measured per microbatch: 1f1b 3.06 |x| -- the two blocks (1 |x| each) and the tanh's own
    # residual, the loss's part (1 |x|); with the values whole on every device 4.06; gpipe 8.03.
    assert slope["1f1b"] <= 3.2, (slope, temps)
    assert slope["gpipe"] >= 2 * slope["1f1b"], (slope, temps)


def test_whole_step_temporaries_flat_in_microbatches():
    """The compiled train step of a d = 256 GPT: 1F1B's temporaries at M = 32 within 1.1x M = 8.

    Fixed microbatch size (so M sets the batch), interleaved 1F1B on pipe=4,data=2. What still
    grows is the model's own batch outside the stack (embedding, logits, loss; 1/P of it per
    device) and the boundary blocks (2/P of an activation per microbatch). Measured 1.04 (GPipe
    on the same model: 1.12; before the boundary values went in blocks: 1.11 here, 1.26 at
    seq 64, benchmarks/README.md "1F1B").
    """
    cfg = get_preset("tiny").replace(layers=8, d_model=256, mlp_dim=1024, seq_len=32)
    temps = {}
    for m in (8, 32):
        trainer = mp.Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-3), lm_loss,
                             mesh=make_mesh(pipe=4, data=2), strategy="dp",
                             config=TrainConfig(microbatches=m, schedule="interleaved-1f1b",
                                                repeats=2, row_separable=True))
        rows = np.zeros((4 * m, cfg.seq_len), np.int32)
        batch = {"inputs": rows, "targets": rows}
        temps[m] = trainer.lower(batch).compile().memory_analysis().temp_size_in_bytes
    assert temps[32] <= 1.1 * temps[8], temps


# --- errors -----------------------------------------------------------------------------------


def test_config_errors():
    with pytest.raises(StrategyError, match=r"schedule='zb-h1'; expected one of \('gpipe', "
                                            r"'circular', '1f1b', 'interleaved-1f1b'\)"):
        PipelineConfig(stages=2, microbatches=4, schedule="zb-h1")
    with pytest.raises(StrategyError, match=r"schedule='1f1b' needs microbatches >= stages .* "
                                            r"microbatches=2 < stages=4"):
        one(4, 2)
    with pytest.raises(StrategyError, match=r"'interleaved-1f1b' needs microbatches >= stages"):
        inter(4, 2)
    with pytest.raises(StrategyError, match=r"multiple of it, got microbatches=6"):
        inter(4, 6)
    with pytest.raises(StrategyError, match=r"'1f1b' runs each stage's layers once.*use "
                                            r"schedule='interleaved-1f1b'"):
        one(2, 4, repeats=2)
    with pytest.raises(StrategyError, match=r"needs repeats >= 2.*use schedule='1f1b'"):
        inter(2, 4, v=1)
    with pytest.raises(StrategyError, match=r"6 layers cannot be split into stages=2 x "
                                            r"repeats=2 = 4 equal chunks"):
        inter(2, 4).validate(6, 32, make_mesh(pipe=2, data=4))
    assert PipelineConfig(2, 4, Schedule.ONE_F_ONE_B).schedule is Schedule("1f1b")
    with pytest.raises(StrategyError, match=r"pipeline_remat='yes'; expected None .*, True or "
                                            r"False"):
        TrainConfig(schedule="1f1b", pipeline_remat="yes")
    with pytest.raises(StrategyError, match="skip_bubbles=False"):
        pipeline_apply(stage_fn, stack_stages(make_layers(4), stages=2), jnp.ones((2, 8, 16)),
                       mesh=make_mesh(pipe=2, data=4), config=one(2, 2), skip_bubbles=False)


def test_train_config_and_cli_errors(capsys):
    assert TrainConfig(schedule="interleaved-1f1b", repeats=2).schedule is \
        Schedule.INTERLEAVED_1F1B
    with pytest.raises(StrategyError, match=r"schedule='pipedream'; expected one of"):
        TrainConfig(schedule="pipedream")
    with pytest.raises(StrategyError, match=r"repeats=2 needs schedule='interleaved-1f1b'"):
        TrainConfig(schedule="1f1b", repeats=2)
    with pytest.raises(StrategyError, match=r"'interleaved-1f1b' needs repeats >= 2"):
        TrainConfig(schedule="interleaved-1f1b")
    for argv, message in (
        (["--schedule", "interleaved-1f1b"], "needs --repeats >= 2"),
        (["--schedule", "1f1b", "--repeats", "2"], "needs --schedule interleaved-1f1b"),
    ):
        assert meshpar.cli.main(["train", "--mesh", "pipe=2,data=4", "--layers", "4",
                                 "--steps", "1", *argv]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:    # argparse's own usage error
        meshpar.cli.main(["train", "--mesh", "pipe=2,data=4", "--schedule", "zb-h1"])
    assert exit_.value.code == 2 and "invalid choice: 'zb-h1'" in capsys.readouterr().err


@pytest.mark.parametrize("schedule,repeats,layers", [("1f1b", 1, 5), ("interleaved-1f1b", 2, 6)])
def test_trainer_refusals_hold_for_1f1b(schedule, repeats, layers):
    config = mp.TrainConfig(microbatches=2, schedule=schedule, repeats=repeats)
    # A stack that does not split into pipe x repeats chunks.
    cfg = get_preset("tiny").replace(layers=layers)
    with pytest.raises(StrategyError, match=rf"{layers} layers cannot be split into "
                                            rf"stages=2 x repeats={repeats}"):
        mp.Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adam(1e-2), lm_loss,
                   mesh=mp.make_mesh("pipe=2,data=4"), strategy="dp", config=config)
    # A model with no stack to split into stages.
    with pytest.raises(StrategyError, match=r"pipe=2, but the model has no repeated block"):
        mp.Trainer(lambda: PlainMLP(nnx.Rngs(0)), optax.adam(1e-2), _regression_loss,
                   mesh=mp.make_mesh("pipe=2,data=4"), strategy="dp", config=config)
