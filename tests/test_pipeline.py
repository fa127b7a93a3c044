"""Pipeline parallelism against a sequential single-device reference.

The model is a stack of residual MLP layers ``h + tanh(h @ w1 + b1) @ w2`` (``w1`` column- and
``w2`` row-parallel under ``tensor``). Every pipelined run is compared, outputs and ``jax.grad`` of
a scalar loss w.r.t. all layer parameters and the inputs, with the same layers applied in order on
one device.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meshpar.errors import StrategyError
from meshpar.inspect.hlo import CollectiveKind, collectives, collectives_in_loops
from meshpar.mesh import make_mesh
from meshpar.parallel.layout import activate, constrain
from meshpar.parallel.pipeline import (
    PipelineConfig,
    pipeline_apply,
    repeat_table,
    schedule_table,
    stack_stages,
    unstack_stages,
)
from meshpar.sharding.rules import Rules

D, F, MB = 16, 32, 8           # width, hidden width, microbatch size
# fp32. A weight gradient is a sum over all M x mb rows, which the reference adds in one dot and
# the pipeline in per-microbatch (and per-batch-shard) partial sums: the rounding error of a sum
# scales with its terms, not with its result, so an entry that cancels to ~0.007 among terms of
# ~1 is off by a few 1e-6. Hence atol is 1e-5 relative to the array's largest entry.
RTOL, ATOL_REL = 1e-5, 1e-5


def assert_close(actual, desired, what=""):
    actual, desired = np.asarray(actual), np.asarray(desired)
    atol = ATOL_REL * max(float(np.abs(desired).max()), 1e-30)
    np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=atol, err_msg=what)


def make_layers(num_layers: int, seed: int = 0, d: int = D, f: int = F) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((num_layers, d, f)) / np.sqrt(d)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal((num_layers, f))).astype(np.float32),
        "w2": (rng.standard_normal((num_layers, f, d)) / np.sqrt(f)).astype(np.float32),
    }


def layer(h, p):
    hidden = jnp.tanh(h @ p["w1"] + p["b1"])
    hidden = constrain(hidden, ("batch", "mlp"))      # no-op outside an active layout
    return h + hidden @ p["w2"], None


def stage_fn(chunk, x):
    return jax.lax.scan(layer, x, chunk)[0]


def reference(layers, xs):
    # All layers in order on every row: no mesh, no shard_map, no microbatching.
    flat = xs.reshape(-1, D)
    return jax.lax.scan(layer, flat, layers)[0].reshape(xs.shape)


def loss_of(ys):
    # Weighted so that every output element gets a distinct cotangent.
    w = jnp.linspace(-1.0, 1.0, ys.size, dtype=ys.dtype).reshape(ys.shape)
    return jnp.sum(jnp.sin(ys) * w)


@dataclasses.dataclass(frozen=True)
class Case:
    mesh: dict
    config: PipelineConfig
    num_layers: int
    batch_spec: tuple = ()          # extra sharding of inputs [M, mb, D] on the auto axes
    weight_axes: dict | None = None  # {"tensor": ..., "fsdp": ...} shard weights of each layer
    rules: tuple = ()               # activation rules activated while tracing
    bubble_fill: float | None = None

    @property
    def id(self) -> str:
        c = self.config
        mesh = ",".join(f"{k}{v}" for k, v in self.mesh.items())
        extra = f"-v{c.repeats}" if c.repeats > 1 else ""
        manual = f"-manual:{'+'.join(c.batch_axes)}" if c.batch_axes else ""
        fill = "-nanfill" if self.bubble_fill is not None else ""
        kept = "" if c.remat else "-noremat"
        return f"{c.schedule}{extra}-{mesh}-M{c.microbatches}{manual}{kept}{fill}"


def _weight_specs(config: PipelineConfig, weight_axes: dict | None) -> dict[str, P]:
    lead = ("pipe",) if config.repeats == 1 else (None, "pipe")
    tensor = (weight_axes or {}).get("tensor")
    fsdp = (weight_axes or {}).get("fsdp")
    return {
        "w1": P(*lead, None, fsdp, tensor),       # [.., c, D, F]: column parallel
        "b1": P(*lead, None, tensor),
        "w2": P(*lead, None, tensor, fsdp),       # [.., c, F, D]: row parallel
    }


def run_case(case: Case, *, return_hlo: bool = False):
    mesh = make_mesh(**case.mesh)
    cfg = case.config
    layers = make_layers(case.num_layers)
    xs = np.random.default_rng(1).standard_normal((cfg.microbatches, MB, D)).astype(np.float32)

    specs = _weight_specs(cfg, case.weight_axes)
    staged = stack_stages(layers, stages=cfg.stages, repeats=cfg.repeats)
    staged = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in staged.items()}
    xs_dev = jax.device_put(xs, NamedSharding(mesh, P(None, *case.batch_spec)))
    rules = Rules.table(case.rules) if case.rules else None

    def pipelined_loss(staged, xs):
        def run():
            ys = pipeline_apply(stage_fn, staged, xs, mesh=mesh, config=cfg,
                                bubble_fill=case.bubble_fill)
            return loss_of(ys), ys
        if rules is None:
            return run()
        with activate(mesh, rules):
            return run()

    fn = jax.jit(jax.value_and_grad(pipelined_loss, argnums=(0, 1), has_aux=True))
    (loss, ys), (g_staged, g_xs) = fn(staged, xs_dev)

    def ref_loss(layers, xs):
        ys = reference(layers, xs)
        return loss_of(ys), ys

    (r_loss, r_ys), (r_glayers, r_gxs) = jax.jit(
        jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True))(layers, xs)

    assert_close(ys, r_ys, "outputs")
    assert_close(loss, r_loss, "loss")
    g_layers = unstack_stages(g_staged, stages=cfg.stages, repeats=cfg.repeats)
    for name in layers:
        assert_close(g_layers[name], r_glayers[name], f"grad {name}")
    assert_close(g_xs, r_gxs, "grad inputs")
    if return_hlo:
        return fn.lower(staged, xs_dev).compile().as_text()
    return None


def gpipe(p, m, **kw):
    return PipelineConfig(stages=p, microbatches=m, schedule="gpipe", **kw)


def circular(p, m, v=2, **kw):
    return PipelineConfig(stages=p, microbatches=m, schedule="circular", repeats=v, **kw)


NAN = float("nan")
TP_RULES = (("batch", "data"), ("batch", None), ("mlp", "tensor"))

CASES = [
    # pipe alone: pipe=4 with a size-2 data axis, batch replicated.
    Case({"pipe": 4, "data": 2}, gpipe(4, 1), 4),
    Case({"pipe": 4, "data": 2}, gpipe(4, 4), 8, bubble_fill=NAN),
    Case({"pipe": 4, "data": 2}, gpipe(4, 8), 4),
    Case({"pipe": 4, "data": 2}, circular(4, 4), 8, bubble_fill=NAN),
    Case({"pipe": 4, "data": 2}, circular(4, 8), 8),
    # pipe x data: the batch dimension sharded over data (manual), weights replicated.
    Case({"pipe": 2, "data": 4}, gpipe(2, 1, batch_axes=("data",)), 4, ("data",)),
    Case({"pipe": 2, "data": 4}, gpipe(2, 2, batch_axes=("data",)), 4, ("data",), bubble_fill=NAN),
    Case({"pipe": 2, "data": 4}, gpipe(2, 4, batch_axes=("data",)), 4, ("data",)),
    Case({"pipe": 2, "data": 4}, circular(2, 2, batch_axes=("data",)), 8, ("data",),
         bubble_fill=NAN),
    Case({"pipe": 2, "data": 4}, circular(2, 4, batch_axes=("data",)), 4, ("data",)),
    # pipe x data, data left automatic (correct, but see test_data_axis_manual_keeps_loops_free).
    Case({"pipe": 2, "data": 4}, gpipe(2, 4), 4, ("data",)),
    # pipe x data x tensor: Megatron-sharded weights inside each stage, activations constrained.
    Case({"pipe": 2, "data": 2, "tensor": 2}, gpipe(2, 4, batch_axes=("data",)), 4, ("data",),
         {"tensor": "tensor"}, TP_RULES, bubble_fill=NAN),
    Case({"pipe": 2, "data": 2, "tensor": 2}, circular(2, 2, batch_axes=("data",)), 8, ("data",),
         {"tensor": "tensor"}, TP_RULES),
    # pipe x fsdp x tensor: ZeRO-3 style weights (gathered inside the stage), batch over fsdp.
    Case({"pipe": 2, "fsdp": 2, "tensor": 2}, gpipe(2, 2), 4, ("fsdp",),
         {"tensor": "tensor", "fsdp": "fsdp"}),
    # pipe x data x fsdp: data manual, fsdp automatic.
    Case({"pipe": 2, "data": 2, "fsdp": 2}, circular(2, 2, batch_axes=("data",)), 4,
         (("data", "fsdp"),), {"fsdp": "fsdp"}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_sequential_reference(case):
    run_case(case)


def test_data_axis_manual_keeps_loops_free():
    # pipe x data, weights replicated over data, batch sharded over data: inside the loop only
    # the ring shift (forward and its transpose); the data all-reduce of the weight gradient and
    # the stage sum of the input gradient happen once, after the loop.
    case = Case({"pipe": 2, "data": 4}, gpipe(2, 4, batch_axes=("data",)), 4, ("data",))
    hlo = run_case(case, return_hlo=True)
    in_loops = collectives_in_loops(hlo)
    assert in_loops.get("collective-permute", 0) >= 2, in_loops
    for op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all"):
        assert op not in in_loops, in_loops
    # ... but they do exist, outside the loops: the weight gradients summed over data and the
    # stage outputs / input gradient summed over pipe.
    outside = {op.mesh_axes for op in collectives(hlo, mesh=make_mesh(pipe=2, data=4))
               if op.kind is CollectiveKind.ALL_REDUCE and not op.in_loop}
    assert {("data",), ("pipe",)} <= outside, outside


def test_bubbles_computed_as_garbage_leak_nan():
    # Why bubbles are skipped with lax.cond: computing them and discarding the result still
    # multiplies a zero cotangent by NaN in the weight gradient.
    mesh = make_mesh(pipe=4, data=2)
    cfg = gpipe(4, 2)
    staged = stack_stages(make_layers(4), stages=4)
    xs = jnp.ones((2, MB, D))

    def loss(staged, skip):
        ys = pipeline_apply(stage_fn, staged, xs, mesh=mesh, config=cfg, bubble_fill=NAN,
                            skip_bubbles=skip)
        return loss_of(ys)

    g_skip = jax.jit(jax.grad(lambda s: loss(s, True)))(staged)
    g_garbage = jax.jit(jax.grad(lambda s: loss(s, False)))(staged)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(g_skip))
    assert not all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(g_garbage))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_bfloat16(schedule):
    # XLA:CPU aborts on a bf16 psum in a partial-manual shard_map; the pipeline sums in f32 there.
    # 1F1B (meshpar.parallel.onef1b) also accumulates bf16 weight gradients in f32.
    mesh = make_mesh(pipe=2, data=4)
    cfg = PipelineConfig(2, 2, schedule, batch_axes=("data",))
    layers = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), make_layers(4))
    xs = jnp.asarray(np.random.default_rng(1).standard_normal((2, MB, D)), jnp.bfloat16)

    def loss(staged, xs):
        ys = pipeline_apply(stage_fn, staged, xs, mesh=mesh, config=cfg)
        return loss_of(ys.astype(jnp.float32)), ys

    def ref_loss(layers, xs):
        ys = reference(layers, xs)
        return loss_of(ys.astype(jnp.float32)), ys

    staged = stack_stages(layers, stages=2)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    # Stage-to-stage values move as their bits: XLA:CPU would run a bf16 permute (or the psum
    # that hands the last stage's outputs to every stage) as convert, fp32 collective, convert.
    hlo = step.lower(staged, xs).compile().as_text()
    moved = re.findall(r"= (\w+)\[[\d,]*\]\S* (collective-permute|all-reduce)\(", hlo)
    assert ("u16", "collective-permute") in moved, moved
    assert not [m for m in moved if m[1] == "collective-permute" and m[0] != "u16"], moved
    (_, ys), (g, gx) = step(staged, xs)
    (_, r_ys), (r_g, r_gx) = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1),
                                                        has_aux=True))(layers, xs)
    assert ys.dtype == gx.dtype == jnp.bfloat16
    g = unstack_stages(g, stages=2)
    # bf16 has 8 mantissa bits; the two programs round at different points.
    for a, b in [(ys, r_ys), (gx, r_gx)] + [(g[k], r_g[k]) for k in layers]:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=0.03 * np.abs(b).max())


def test_remat_false_matches():
    run_case(Case({"pipe": 2, "data": 4}, gpipe(2, 4, remat=False, batch_axes=("data",)), 4,
                  ("data",), bubble_fill=NAN))


# Big enough that per-iteration bookkeeping (indices, flags, alignment) is noise.
MEM_D, MEM_F, MEM_MB, MEM_LAYERS = 64, 128, 16, 8


def _temp_bytes(cfg: PipelineConfig, mesh) -> int:
    layers = make_layers(MEM_LAYERS, d=MEM_D, f=MEM_F)
    staged = stack_stages(layers, stages=cfg.stages, repeats=cfg.repeats)
    spec = P("pipe") if cfg.repeats == 1 else P(None, "pipe")
    staged = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, spec))
              for k, v in staged.items()}
    xs = jax.ShapeDtypeStruct((cfg.microbatches, MEM_MB, MEM_D), jnp.float32)

    def loss(staged, xs):
        return loss_of(pipeline_apply(stage_fn, staged, xs, mesh=mesh, config=cfg))

    compiled = jax.jit(jax.grad(loss)).lower(staged, xs).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("schedule,repeats,remat", [("gpipe", 1, True), ("circular", 2, True),
                                                     ("gpipe", 1, False)])
def test_memory_per_microbatch(schedule, repeats, remat):
    # What the module docstring promises: with remat, each extra microbatch costs exactly its
    # stage inputs (v iterations of one microbatch activation) plus its buffer slot; without
    # remat, the stage intermediates, but not another copy of the stage's weights.
    mesh = make_mesh(pipe=4, data=2)
    x_bytes = MEM_MB * MEM_D * 4
    temps = [_temp_bytes(PipelineConfig(4, m, schedule, repeats, remat=remat), mesh)
             for m in (4, 8)]
    per_microbatch = (temps[1] - temps[0]) / 4 / x_bytes
    if remat:
        assert per_microbatch == pytest.approx(repeats + 1, abs=0.25), temps
    else:
        layers = make_layers(MEM_LAYERS, d=MEM_D, f=MEM_F)
        stage_weight_bytes = sum(v.nbytes for v in layers.values()) // 4
        assert 4 < per_microbatch < stage_weight_bytes / x_bytes, temps


# --- schedule ---------------------------------------------------------------------------------

SCHEDULE_CONFIGS = [gpipe(1, 3), gpipe(2, 1), gpipe(2, 4), gpipe(4, 2), gpipe(4, 8),
                    circular(2, 2), circular(2, 5), circular(4, 4), circular(4, 6, v=3),
                    circular(3, 3, v=1)]


@pytest.mark.parametrize("cfg", SCHEDULE_CONFIGS, ids=lambda c: f"{c.schedule}-P{c.stages}"
                         f"-M{c.microbatches}-v{c.repeats}")
def test_schedule_table(cfg):
    mb, rep = schedule_table(cfg), repeat_table(cfg)
    P_, M, v = cfg.stages, cfg.microbatches, cfg.repeats
    assert mb.shape == rep.shape == (P_, cfg.iterations)
    assert ((mb == -1) == (rep == -1)).all()
    # Every stage idles exactly P - 1 iterations and runs each (microbatch, repeat) once.
    assert ((mb == -1).sum(axis=1) == P_ - 1).all()
    for s in range(P_):
        items = [(int(r), int(m)) for m, r in zip(mb[s], rep[s]) if m >= 0]
        assert sorted(items) == [(r, m) for r in range(v) for m in range(M)]
    # Dependencies: (m, r) runs on stage s strictly after stage s-1, and repeat r on stage 0
    # strictly after repeat r-1 left the last stage.
    when = {(s, int(m), int(r)): t for s in range(P_) for t, (m, r) in enumerate(zip(mb[s], rep[s]))
            if m >= 0}
    for (s, m, r), t in when.items():
        if s > 0:
            assert when[(s - 1, m, r)] == t - 1
        elif r > 0:
            assert when[(P_ - 1, m, r - 1)] < t
    assert cfg.bubble_fraction == pytest.approx((P_ - 1) / (v * M + P_ - 1))


def test_schedule_table_gpipe_picture():
    np.testing.assert_array_equal(
        schedule_table(gpipe(3, 2)),
        [[0, 1, -1, -1], [-1, 0, 1, -1], [-1, -1, 0, 1]],
    )
    np.testing.assert_array_equal(
        repeat_table(circular(2, 2)), [[0, 0, 1, 1, -1], [-1, 0, 0, 1, 1]]
    )


# --- stacking ---------------------------------------------------------------------------------

def test_stack_unstack_round_trip_and_layer_order():
    layers = {"w": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "b": np.arange(8.0)}
    g = stack_stages(layers, stages=2)
    assert g["w"].shape == (2, 4, 3)
    np.testing.assert_array_equal(g["b"][1], [4, 5, 6, 7])
    c = stack_stages(layers, stages=2, repeats=2)
    assert c["w"].shape == (2, 2, 2, 3)
    # layer index = (r * stages + s) * c + j
    for r in range(2):
        for s in range(2):
            np.testing.assert_array_equal(c["b"][r, s], [(r * 2 + s) * 2, (r * 2 + s) * 2 + 1])
    for stages, repeats in ((2, 1), (2, 2), (4, 2), (1, 8)):
        back = unstack_stages(stack_stages(layers, stages=stages, repeats=repeats),
                              stages=stages, repeats=repeats)
        for k in layers:
            np.testing.assert_array_equal(back[k], layers[k])


# --- errors -----------------------------------------------------------------------------------

def test_config_errors():
    with pytest.raises(StrategyError, match="gpipe.*repeats must be 1.*repeats=2"):
        PipelineConfig(stages=2, microbatches=4, schedule="gpipe", repeats=2)
    with pytest.raises(StrategyError, match=r"microbatches >= stages.*microbatches=2 < stages=4"):
        PipelineConfig(stages=4, microbatches=2, schedule="circular", repeats=2)
    with pytest.raises(StrategyError, match="schedule='pipedream'"):
        PipelineConfig(stages=2, microbatches=4, schedule="pipedream")
    with pytest.raises(StrategyError, match=r"stages=0 must be an int >= 1"):
        PipelineConfig(stages=0, microbatches=4)
    with pytest.raises(StrategyError, match="batch_axes"):
        PipelineConfig(stages=2, microbatches=4, batch_axes=("pipe",))


def test_validate_errors():
    mesh = make_mesh(pipe=2, data=4)
    with pytest.raises(StrategyError, match=r"6 layers cannot be split into stages=2 x "
                                            r"repeats=2 = 4"):
        circular(2, 4).validate(6, 32, mesh)
    with pytest.raises(StrategyError, match="microbatches=3 does not divide the global batch 32"):
        gpipe(2, 3).validate(4, 32, mesh)
    with pytest.raises(StrategyError, match="stages=4 but mesh axis 'pipe' has size 2"):
        gpipe(4, 4).validate(8, 32, mesh)
    with pytest.raises(StrategyError, match="stage axis 'stage' is not in the mesh"):
        gpipe(2, 4, axis="stage").validate(4, 32, mesh)
    with pytest.raises(StrategyError, match=r"microbatch size 2 .* not divisible by batch axes "
                                            r"\('data',\) of size 4"):
        gpipe(2, 4, batch_axes=("data",)).validate(4, 8, mesh)
    gpipe(2, 4, batch_axes=("data",)).validate(4, 32, mesh)  # fits


def test_apply_errors():
    mesh = make_mesh(pipe=2, data=4)
    staged = stack_stages(make_layers(4), stages=2)
    xs = jnp.ones((4, MB, D))
    with pytest.raises(StrategyError, match=r"inputs have shape \(3, 8, 16\); expected "
                                            r"\[microbatches=4"):
        pipeline_apply(stage_fn, staged, xs[:3], mesh=mesh, config=gpipe(2, 4))
    with pytest.raises(StrategyError, match=r"stage parameter \['b1'\] has shape \(4, 32\); "
                                            r"expected leading dimensions \(2,\)"):
        pipeline_apply(stage_fn, make_layers(4), xs, mesh=mesh, config=gpipe(2, 4))
    with pytest.raises(StrategyError, match="shape and dtype float32"):
        pipeline_apply(lambda c, x: x[:, :2], staged, xs, mesh=mesh, config=gpipe(2, 4))

    def closes_over_traced(scale):
        return pipeline_apply(lambda c, x: stage_fn(c, x) * scale, staged, xs, mesh=mesh,
                              config=gpipe(2, 4)).sum()

    with pytest.raises(StrategyError, match=r"closes over 1 traced value\(s\) \(float32\[\]\)"):
        jax.jit(jax.grad(closes_over_traced))(2.0)



def test_stage_state_errors():
    mesh = make_mesh(pipe=2, data=4)
    staged = stack_stages(make_layers(4), stages=2)
    xs = jnp.ones((4, MB, D))
    count = stack_stages(jnp.zeros((4,), jnp.uint32), stages=2)          # [2, 2]
    with pytest.raises(StrategyError, match=r"stage_state with batch_axes=\('data',\): inside "
                                            r"manual batch axes each shard would draw"):
        pipeline_apply(stage_fn, staged, xs, mesh=mesh, stage_state=count,
                       config=dataclasses.replace(gpipe(2, 4), batch_axes=("data",)))
    with pytest.raises(StrategyError, match=r"stage state <root> has shape \(2, 3\); expected "
                                            r"leading dimensions \(2, 2\)"):
        pipeline_apply(stage_fn, staged, xs, mesh=mesh, stage_state=jnp.zeros((2, 3)),
                       config=gpipe(2, 4))
