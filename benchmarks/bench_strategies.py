"""Benchmark meshpar's train step against a hand-written ``jax.jit`` step, layout by layout.

For each mesh (default: ``fsdp=4,tensor=2`` ZeRO-3+TP, ``data=8`` DP, ``fsdp=8`` ZeRO-3,
``data=2,tensor=4`` TP) on 8 emulated CPU devices, in one process, it measures

(a) the median step time of meshpar's jitted step and of a hand-written ``jax.jit`` step with the
    *same* shardings (state shardings from ``trainer.state_shardings``, activation constraints from
    ``meshpar.parallel.layout.activate(mesh, trainer.compute_rules)``) but with value_and_grad, the optax
    update and donation written by hand (no microbatch scan, no non-finite guard, no metrics
    beyond the loss). The two run interleaved (A B, B A, A B, ...) on one pre-placed batch, so
    host-to-device transfer is excluded from both and machine drift cancels in the ratio;
(b) model FLOP utilisation: analytic model FLOPs / step time / a peak matmul rate measured in the
    same loop (a batched fp32 matmul sharded over all 8 devices, no communication), plus the
    compiled program's own FLOP counts (``cost_analysis()`` and a trip-count-weighted count of
    the HLO dots);
(c) collective traffic per step from ``meshpar.inspect.hlo.collectives`` (loop trip counts included),
    split by kind and mesh axis, against the analytic minimum of each axis (ring algorithms:
    DP gradient all-reduce, ZeRO-3 gather/gather/reduce-scatter, Megatron activation all-reduces);
and prints compile times and ``memory_analysis()`` bytes per device.

Run ``python benchmarks/bench_strategies.py --help``; ``benchmarks/README.md`` explains every
column. Eight emulated devices share the host's cores: only ratios taken in one run mean anything.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

# _common, whether this file runs as a script or is loaded by path (tests/test_benchmarks.py).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

DEFAULT_MESHES = "fsdp=4,tensor=2;data=8;fsdp=8;data=2,tensor=4"

#: Human labels of the default layouts under the ``auto`` strategy.
_LABELS = {
    ("fsdp", "tensor"): "ZeRO-3+TP",
    ("data",): "DP",
    ("fsdp",): "ZeRO-3",
    ("data", "tensor"): "DP+TP",
    ("tensor",): "TP",
}


# The analytic formulas live in meshpar.inspect.costs (one copy, shared with `meshpar inspect`);
# imported here under their old names, which tests/test_benchmarks.py checks by hand.
from meshpar.inspect.costs import (  # noqa: E402,F401
    analytic_collectives, dp_gradient_bytes, megatron_tp_bytes, model_flops, ring_all_gather,
    ring_all_reduce, zero3_bytes,
)


# ------------------------------------------------------------------------------------------------
# The compiled program's FLOPs with loop trip counts (XLA's cost_analysis counts a while body once)
# ------------------------------------------------------------------------------------------------



def hlo_dot_flops(hlo_text: str, /) -> dict:
    """Dot FLOPs per device weighted by loop trips (:func:`meshpar.inspect.hlo.dot_flops`).

    Returns:
        ``{"flops": float, "dots": int, "unweighted_flops": float}`` per device.
    """
    from meshpar.inspect import hlo

    got = hlo.dot_flops(hlo_text)
    return {"flops": got["total"], "dots": got["dots"], "unweighted_flops": got["unweighted"]}


def _block(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def make_peak_matmul(n: int) -> tuple[Callable[[], Any], float]:
    """A batched fp32 matmul sharded over every device (one ``n x n x n`` dot per device, no
    communication) and its FLOPs: the rate the emulated devices reach together on pure matmul."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("all",), axis_types=(AxisType.Auto,), devices=devices)
    sharding = NamedSharding(mesh, PartitionSpec("all"))
    key_a, key_b = jax.random.split(jax.random.key(0))
    shape = (len(devices), n, n)
    a = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32), out_shardings=sharding)(key_a)
    b = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32), out_shardings=sharding)(key_b)
    f = jax.jit(lambda x, y: jnp.einsum("dij,djk->dik", x, y), out_shardings=sharding)
    _block(f(a, b))
    return (lambda: f(a, b)), 2.0 * len(devices) * n**3


def make_dots_only(hlo_text: str) -> tuple[Callable[[], Any], float, int]:
    """Every ``dot`` of a compiled per-device program and nothing else, on every device at once.

    Each dot runs with its own operand shapes and dimension numbers, as many times per call as it
    runs per step (loop trip counts included), on every device in parallel with no
    communication. Its time is what the step would take if it were *only* its matmuls: model
    FLOPs over that time, over the peak, is the utilisation ceiling of this model, batch and
    layout on this machine, whatever the rest of the step costs. Operand layouts are XLA's
    choice for this program, not necessarily the step's.

    Returns:
        ``(run, flops, kinds)``: a callable running the program once, its FLOPs on all devices,
        and how many distinct dot shapes it holds.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from meshpar.inspect import hlo

    counts: dict[tuple, int] = defaultdict(int)
    flops = 0.0
    for d in hlo.dots(hlo_text):
        key = (d.dtype, d.lhs, d.rhs, d.result, ((d.lhs_contracting, d.rhs_contracting),
                                                 (d.lhs_batch, d.rhs_batch)))
        counts[key] += d.executions
        flops += d.flops * d.executions
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("all",), axis_types=(AxisType.Auto,), devices=devices)
    spec = PartitionSpec("all")
    keys = sorted(counts)
    shapes = [(len(devices), *shape) for k in keys for shape in (k[1], k[2])]
    # HLO spells dtypes as f32, bf16, ...; random operands need a float dtype.
    named = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "f64": jnp.float64}
    dtypes = [named.get(k[0], jnp.float32) for k in keys for _ in range(2)]
    operands = jax.jit(
        lambda key: [jax.random.normal(k, s, t) for k, s, t in
                     zip(jax.random.split(key, len(shapes)), shapes, dtypes)],
        out_shardings=[NamedSharding(mesh, spec)] * len(shapes))(jax.random.key(2))

    def per_device(*ops):
        outs = []
        for i, key in enumerate(keys):
            _, _, _, result, dims = key
            a, b = ops[2 * i][0], ops[2 * i + 1][0]

            def body(_, carry, dims=dims):
                # The barrier makes each iteration's operands opaque, so XLA can neither hoist
                # the loop-invariant dot out of the loop nor merge the iterations.
                a, b, _ = jax.lax.optimization_barrier(carry)
                return a, b, jax.lax.dot_general(a, b, dims)

            init = (a, b, jnp.zeros(result, dtypes[2 * i]))
            outs.append(jax.lax.fori_loop(0, counts[key], body, init)[2][None])
        return outs

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec,
                              check_vma=False)).lower(*operands).compile()
    # Read back what XLA kept: a dot hoisted out of its loop or merged would lower the count.
    kept = hlo.dot_flops(f.as_text())["total"]
    if not math.isclose(kept, flops, rel_tol=1e-6):
        raise RuntimeError(f"the dots-only program runs {kept:.4g} dot FLOPs per device, "
                           f"the step {flops:.4g}: XLA changed it, its time would mislead")
    _block(f(*operands))
    return (lambda: f(*operands)), flops * len(devices), len(keys)


def measure_single_device_peak(n: int, reps: int) -> float:
    """FLOP/s of one ``n x n x n`` fp32 matmul on one device (reference only)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    _block(f(a))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _block(f(a))
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / statistics.median(times)


def make_baseline_step(trainer: Any, batch_sharding: Any) -> tuple[Callable, dict]:
    """A hand-written jitted train step with the trainer's shardings and activation layout.

    Returns ``(step, shardings)``: ``step(state, batch) -> (state, loss)`` on a state dict
    ``{"step", "params", "rest", "opt"}`` laid out as ``shardings``.

    Same model (``nnx.merge`` of the trainer's graphdef), same loss, same optimizer, same
    parameter/optimizer-state shardings (``trainer.state_shardings``), same compute rules
    (``meshpar.parallel.layout.activate``), state donated; no microbatch scan, no non-finite guard, no
    gradient-sharding constraint and only the loss as a metric.
    """
    import jax
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from meshpar.parallel.layout import activate

    graphdef, tx, loss_fn = trainer.graphdef, trainer.tx, trainer.loss_fn
    mesh, rules = trainer.mesh, trainer.compute_rules
    s = trainer.state_shardings
    shardings = {"step": s.step, "params": s.params, "rest": s.rest, "opt": s.opt_state}

    def loss(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        return loss_fn(model, batch), nnx.state(model, nnx.Not(nnx.Param))

    def step(state, batch):
        with activate(mesh, rules):
            (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(
                state["params"], state["rest"], batch)
            updates, opt = tx.update(grads, state["opt"], state["params"])
            params = optax.apply_updates(state["params"], updates)
        return {"step": state["step"] + 1, "params": params, "rest": rest, "opt": opt}, value

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, replicated), donate_argnums=(0,)), shardings


def _copy_state(trainer: Any, shardings: dict) -> dict:
    import jax
    import jax.numpy as jnp

    st = trainer.state
    tree = {"step": st.step, "params": st.params, "rest": st.rest, "opt": st.opt_state}
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def _memory(compiled: Any) -> dict:
    ma = compiled.memory_analysis()
    keys = ("argument", "output", "alias", "temp")
    out = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0) for k in keys}
    out["live"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def _summarize_collectives(ops: Sequence[Any]) -> dict:
    from meshpar.inspect import hlo

    by_kind = hlo.summarize(ops)
    by_axis: dict[str, float] = defaultdict(float)
    for op in ops:
        by_axis["+".join(op.mesh_axes) or "-"] += op.traffic_per_step
    in_loop = [
        {"kind": op.kind, "axes": list(op.mesh_axes), "result_bytes": op.result_bytes,
         "trip_count": op.trip_count}
        for op in ops if op.in_loop and op.result_bytes > 0
    ]
    return {"by_kind_axis": by_kind, "by_axis": dict(by_axis), "in_loop": in_loop,
            "total_traffic_bytes": float(sum(op.traffic_per_step for op in ops))}


#: How measured collective kinds are compared with the analytic ones: a gradient reduction that
#: GSPMD emits as an all-reduce (on CPU it does, for ZeRO) is compared with the reduce-scatter it
#: stands for, so its 2x shows as the ratio of the ``reduce`` group.
_KIND_GROUPS = {
    "gather": ("all-gather",),
    "reduce": ("all-reduce", "reduce-scatter"),
    "other": ("collective-permute", "all-to-all"),
}


def _stats(xs: Sequence[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": list(xs)}


def gpt_config(preset: str, *, seq_len: int, remat: str | None) -> Any:
    """The GPT preset with room for ``seq_len`` positions and, if given, another remat policy."""
    from meshpar.models.gpt import get_preset

    overrides = {"seq_len": max(seq_len, get_preset(preset).seq_len)}
    if remat:
        overrides["remat"] = remat
    return get_preset(preset, **overrides)


def gpt_trainer(cfg: Any, *, mesh: Any, strategy: str) -> Any:
    """The benchmarks' trainer: the GPT of ``cfg``, AdamW, the LM loss, on ``mesh``."""
    import optax
    from flax import nnx

    import meshpar as mp
    from meshpar.models.gpt import GPT, lm_loss

    # lm_loss is a mean over equal-length rows, each computed on its own: row-separable.
    return mp.Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(3e-4), lm_loss,
                      mesh=mesh, strategy=strategy, config=mp.TrainConfig(row_separable=True))


def bench_layout(mesh_text: str, *, preset: str, batch_size: int, seq_len: int, warmup: int,
                 steps: int, peak_n: int, remat: str | None = None, log: Callable = print) -> dict:
    """Everything for one mesh: compile, memory, FLOPs, collectives and interleaved timings."""
    import jax

    import meshpar as mp
    from meshpar.inspect import hlo
    from meshpar.train.data import TokenBatches

    mesh_part, _, strategy = mesh_text.partition(":")
    strategy = strategy.strip() or "auto"
    mesh = mp.make_mesh(mesh_part.strip())
    mesh_shape = {k: int(v) for k, v in mesh.shape.items()}
    cfg = gpt_config(preset, seq_len=seq_len, remat=remat)
    active = tuple(a for a, n in mesh_shape.items() if n > 1)
    label = _LABELS.get(active, "+".join(active)) if strategy == "auto" else strategy
    log(f"\n== {mp.format_mesh(mesh)} ({label}, strategy {strategy!r}) ==")

    t0 = time.perf_counter()
    trainer = gpt_trainer(cfg, mesh=mesh, strategy=strategy)
    _block(trainer.state)
    init_s = time.perf_counter() - t0
    host_batch = TokenBatches(batch_size=batch_size, seq_len=seq_len, seed=0).batch(0)
    batch = trainer.place_batch(host_batch)
    batch_sharding = jax.tree.map(lambda x: x.sharding, batch)

    # -- compile both programs (the lowering is timed apart from XLA's compile) -------------------
    t0 = time.perf_counter()
    lowered = trainer.lower(host_batch)
    lower_mp = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_mp = time.perf_counter() - t0
    baseline, base_shardings = make_baseline_step(trainer, batch_sharding)
    base_state = _copy_state(trainer, base_shardings)
    t0 = time.perf_counter()
    base_lowered = baseline.lower(base_state, batch)
    lower_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_compiled = base_lowered.compile()
    compile_base = time.perf_counter() - t0
    log(f"init {init_s:.1f}s; lower+compile meshpar {lower_mp:.1f}+{compile_mp:.1f}s, "
        f"baseline {lower_base:.1f}+{compile_base:.1f}s")

    # -- static analysis ---------------------------------------------------------------------------
    n_dev = mesh.size
    analytic = model_flops(layers=cfg.layers, d_model=cfg.d_model,
                           matmul_params=cfg.matmul_param_count(), batch=batch_size, seq=seq_len)
    text = compiled.as_text()
    dots = hlo_dot_flops(text)
    base_dots = hlo_dot_flops(base_compiled.as_text())
    cost = compiled.cost_analysis() or {}
    cost_flops = float(cost.get("flops", 0.0))
    base_cost = base_compiled.cost_analysis() or {}
    ops = hlo.collectives(text, mesh=mesh)
    coll = _summarize_collectives(ops)
    base_coll = _summarize_collectives(hlo.collectives(base_compiled.as_text(), mesh=mesh))
    opt_by_path = {e.path: e for e in trainer.optimizer_plan.entries}
    params = [(e.bytes_total, e.spec, opt_by_path[e.path].spec if e.path in opt_by_path else e.spec)
              for e in trainer.plan.entries]
    expected = analytic_collectives(
        mesh_shape=mesh_shape, zero_stage=trainer.strategy.zero_stage, params=params,
        layers=cfg.layers, batch=batch_size, seq=seq_len, d_model=cfg.d_model,
        remat=cfg.remat, batch_axes=trainer.strategy.batch_axes(mesh))
    def measured_kind(kind: str, axis: str) -> float:
        return coll["by_kind_axis"].get(f"{kind}@{axis}", {}).get("traffic_bytes_per_step", 0.0)

    per_axis = {}
    for axis, exp in expected.items():
        measured = coll["by_axis"].get(axis, 0.0)
        per_axis[axis] = {
            "measured_bytes": measured, "analytic_min_bytes": exp["min"],
            "analytic_remat_bytes": exp["remat"], "formula": exp["formula"],
            "ratio_min": measured / exp["min"] if exp["min"] else float("nan"),
            "ratio_remat": measured / exp["remat"] if exp["remat"] else float("nan"),
            "baseline_bytes": base_coll["by_axis"].get(axis, 0.0),
            "kinds": {
                group: {"measured_bytes": sum(measured_kind(k, axis) for k in kinds),
                        "measured_by_kind": {k: measured_kind(k, axis) for k in kinds},
                        "analytic_bytes": exp["kinds"].get(group, 0.0)}
                for group, kinds in _KIND_GROUPS.items()
                if exp["kinds"].get(group) or any(measured_kind(k, axis) for k in kinds)
            },
        }

    # -- interleaved timing ------------------------------------------------------------------------
    peak_fn, peak_flops = make_peak_matmul(peak_n)
    dots_fn, dots_only_flops, dot_kinds = make_dots_only(text)
    mp_fn = trainer._jitted  # the trainer's own jitted step (Trainer.step minus host transfer)
    state = trainer.state
    base = base_state

    def run_mp():
        nonlocal state
        state, metrics = mp_fn(state, batch)
        _block((state, metrics))

    def run_base():
        nonlocal base
        base, loss = baseline(base, batch)
        _block((base, loss))

    cpu: dict[str, list[float]] = {"meshpar": [], "baseline": [], "peak": [], "dots": []}

    def timed(fn, into=None):
        # Wall time, plus the CPU time of this process (all XLA threads): other processes on a
        # shared machine stretch the first but barely the second.
        c, t = time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        if into is not None:
            cpu[into].append(time.process_time() - c)
        return wall

    for _ in range(warmup):
        run_mp()
        run_base()
    t_mp, t_base, t_peak, t_dots, pair = [], [], [], [], []
    for i in range(steps):
        if i % 2 == 0:
            a = timed(run_mp, "meshpar")
            b = timed(run_base, "baseline")
        else:
            b = timed(run_base, "baseline")
            a = timed(run_mp, "meshpar")
        # Three back-to-back runs, the fastest kept: one slow run (another process got the
        # cores) must not lower the peak and so inflate the utilisation.
        t_peak.append(min(timed(lambda: _block(peak_fn()), "peak") for _ in range(3)))
        t_dots.append(timed(lambda: _block(dots_fn()), "dots"))
        t_mp.append(a)
        t_base.append(b)
        pair.append(a / b)
    trainer.state = state  # donated along the way; give the trainer its latest state back
    # The best rate the emulated devices reached on pure matmul in this run: the most
    # conservative peak (a larger peak can only lower the utilisation figures).
    peak = peak_flops / min(t_peak)
    med_mp, med_base = statistics.median(t_mp), statistics.median(t_base)
    hlo_total = dots["flops"] * n_dev

    result = {
        "mesh": mp.format_mesh(mesh),
        "mesh_shape": mesh_shape,
        "label": label,
        "strategy": strategy,
        "zero_stage": trainer.strategy.zero_stage,
        "devices": n_dev,
        "compile_s": {"meshpar_lower": lower_mp, "meshpar_compile": compile_mp,
                      "baseline_lower": lower_base, "baseline_compile": compile_base,
                      "trainer_init": init_s},
        "memory_per_device": {"meshpar": _memory(compiled), "baseline": _memory(base_compiled)},
        "step_time_s": {
            "meshpar": _stats(t_mp), "baseline": _stats(t_base),
            "ratio": med_mp / med_base, "pair_ratio": _stats(pair),
            # Load from other processes only ever adds time: min/min is the least-disturbed view.
            "ratio_of_minima": min(t_mp) / min(t_base),
            "cpu_s": {"meshpar": _stats(cpu["meshpar"]), "baseline": _stats(cpu["baseline"]),
                      "peak": _stats(cpu["peak"])},
            "cpu_ratio": statistics.median(cpu["meshpar"]) / statistics.median(cpu["baseline"]),
        },
        "flops": {
            "model_matmul": analytic["matmul"], "model_attention": analytic["attention"],
            "model_total": analytic["total"],
            "hlo_dot_flops_total": hlo_total, "hlo_dot_flops_per_device": dots["flops"],
            "hlo_dots": dots["dots"],
            "baseline_hlo_dot_flops_total": base_dots["flops"] * n_dev,
            "cost_analysis_flops_per_device": cost_flops,
            "cost_analysis_flops_total": cost_flops * n_dev,
            "hlo_over_model": hlo_total / analytic["total"],
            "cost_analysis_over_model": cost_flops * n_dev / analytic["total"],
            # XLA's memory-traffic estimate per device (loop bodies counted once, as for flops):
            # the difference between the two programs is what meshpar's extra work costs.
            "cost_analysis_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "baseline_cost_analysis_bytes_accessed": float(base_cost.get("bytes accessed", 0.0)),
        },
        "utilisation": {
            "peak_flops_per_s": peak, "peak_matmul_n": peak_n, "peak_times_s": t_peak,
            "achieved_model_flops_per_s": analytic["total"] / med_mp,
            "mfu": analytic["total"] / med_mp / peak,
            "hfu": hlo_total / med_mp / peak,
            "baseline_mfu": analytic["total"] / med_base / peak,
            # Each step against the peak sample taken right after it: cancels slow load drift.
            "mfu_paired_median": statistics.median(
                analytic["total"] * tp / (tm * peak_flops) for tm, tp in zip(t_mp, t_peak)),
            # The step's own dots alone (make_dots_only): the most this layout's step could reach
            # if everything that is not a matmul (norms, softmax, optimizer, collectives) were free.
            "dots_only_s": _stats(t_dots), "dots_only_flops": dots_only_flops,
            "dots_only_kinds": dot_kinds,
            "mfu_ceiling": analytic["total"] / statistics.median(t_dots) / peak,
            # The fastest dots-only run, as the peak is the fastest matmul sample: load only adds.
            "mfu_ceiling_best": analytic["total"] / min(t_dots) / peak,
            "dots_only_over_step": statistics.median(t_dots) / med_mp,
        },
        "collectives": {"meshpar": coll, "baseline": base_coll, "per_axis": per_axis},
        "config": {"preset": preset, "layers": cfg.layers, "d_model": cfg.d_model,
                   "heads": cfg.heads, "mlp_dim": cfg.mlp_dim, "vocab": cfg.vocab_size,
                   "params": cfg.param_count(), "matmul_params": cfg.matmul_param_count(),
                   "remat": cfg.remat, "batch_size": batch_size, "seq_len": seq_len},
    }
    log(f"step meshpar {med_mp:.3f}s baseline {med_base:.3f}s ratio {med_mp / med_base:.3f}; "
        f"peak {peak / 1e9:.1f} GFLOP/s; MFU {result['utilisation']['mfu']:.1%}")
    # Free this layout's programs and buffers before the next one (the closures above hold
    # some of them: rebinding, rather than del, keeps their cells valid).
    del trainer, compiled, base_compiled, lowered, base_lowered
    state = base = mp_fn = baseline = peak_fn = dots_fn = None
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def format_report(report: dict) -> str:
    """The printed tables: (a) timing, (b) FLOPs, (c) collectives, compile and memory."""
    rows = report["layouts"]
    out = []
    out.append("(a) step time: meshpar jitted step vs hand-written jax.jit, interleaved, median")
    out.append(f"{'mesh':<18}{'layout':<11}{'meshpar s':>10}{'base s':>9}{'ratio':>7}"
               f"{'pair ratio med [min,max]':>27}{'min/min':>8}{'cpu ratio':>10}"
               f"{'extra MB/dev':>13}")
    for r in rows:
        st = r["step_time_s"]
        pr = st["pair_ratio"]
        fl = r["flops"]
        extra = fl["cost_analysis_bytes_accessed"] - fl["baseline_cost_analysis_bytes_accessed"]
        out.append(f"{r['mesh']:<18}{r['label']:<11}{st['meshpar']['median']:>10.3f}"
                   f"{st['baseline']['median']:>9.3f}{st['ratio']:>7.3f}"
                   f"{pr['median']:>11.3f} [{pr['min']:.3f},{pr['max']:.3f}]"
                   f"{st['ratio_of_minima']:>8.3f}{st['cpu_ratio']:>10.3f}{_mb(extra):>13}")
    out.append("")
    out.append("(b) FLOPs (GFLOP per step, all devices) and utilisation of the measured peak")
    out.append(f"{'mesh':<18}{'model':>8}{'hlo dots':>9}{'base':>7}{'hlo/mod':>8}{'cost_an':>8}"
               f"{'ca/mod':>7}"
               f"{'peak GF/s':>10}{'model GF/s':>11}{'MFU':>7}{'paired':>7}{'HFU':>7}"
               f"{'base MFU':>9}")
    for r in rows:
        f, u = r["flops"], r["utilisation"]
        out.append(f"{r['mesh']:<18}{f['model_total'] / 1e9:>8.1f}"
                   f"{f['hlo_dot_flops_total'] / 1e9:>9.1f}"
                   f"{f['baseline_hlo_dot_flops_total'] / 1e9:>7.1f}{f['hlo_over_model']:>8.3f}"
                   f"{f['cost_analysis_flops_total'] / 1e9:>8.1f}"
                   f"{f['cost_analysis_over_model']:>7.3f}{u['peak_flops_per_s'] / 1e9:>10.1f}"
                   f"{u['achieved_model_flops_per_s'] / 1e9:>11.1f}{u['mfu']:>7.1%}"
                   f"{u['mfu_paired_median']:>7.1%}"
                   f"{u['hfu']:>7.1%}{u['baseline_mfu']:>9.1%}")
    out.append("")
    out.append("    ceiling: the step's own dots alone (same shapes and counts, nothing else), timed "
               "in the same loop")
    out.append(f"    {'mesh':<18}{'dots s':>8}{'step s':>8}{'dots/step':>10}{'MFU ceiling':>12}"
               f"{'best':>7}")
    for r in rows:
        u = r["utilisation"]
        out.append(f"    {r['mesh']:<18}{u['dots_only_s']['median']:>8.3f}"
                   f"{r['step_time_s']['meshpar']['median']:>8.3f}"
                   f"{u['dots_only_over_step']:>10.1%}{u['mfu_ceiling']:>12.1%}"
                   f"{u['mfu_ceiling_best']:>7.1%}")
    out.append("")
    out.append("(c) collective traffic per device per step (MB sent, ring algorithms, trip counts "
               "included) vs analytic")
    out.append(f"{'mesh':<18}{'axis':<8}{'measured':>9}{'min':>9}{'meas/min':>9}"
               f"{'w/ remat':>9}{'meas/rem':>9}{'baseline':>9}")
    for r in rows:
        for axis, a in r["collectives"]["per_axis"].items():
            out.append(f"{r['mesh']:<18}{axis:<8}{_mb(a['measured_bytes']):>9}"
                       f"{_mb(a['analytic_min_bytes']):>9}{a['ratio_min']:>9.3f}"
                       f"{_mb(a['analytic_remat_bytes']):>9}{a['ratio_remat']:>9.3f}"
                       f"{_mb(a['baseline_bytes']):>9}")
    out.append("")
    out.append("    per axis, gathers and reductions: [measured MB by kind] / analytic MB (ratio)")
    for r in rows:
        for axis, a in r["collectives"]["per_axis"].items():
            parts = []
            for group, k in a["kinds"].items():
                ratio = (f"{k['measured_bytes'] / k['analytic_bytes']:.2f}x"
                         if k["analytic_bytes"] else "not in the minimum")
                split = ", ".join(f"{kind} {_mb(v)}" for kind, v in k["measured_by_kind"].items()
                                  if v)
                parts.append(f"{group} [{split}] / {_mb(k['analytic_bytes'])} ({ratio})")
            out.append(f"    {r['mesh']:<16}{axis:<7}" + "; ".join(parts))
    out.append("")
    out.append("    split by kind@axes (meshpar step): ops / executions per step / in-loop ops / "
               "MB")
    for r in rows:
        out.append(f"    {r['mesh']}:")
        for key, v in r["collectives"]["meshpar"]["by_kind_axis"].items():
            out.append(f"      {key:<28}{v['ops']:>4}{v['executions']:>6}{v['in_loop']:>4}"
                       f"{_mb(v['traffic_bytes_per_step']):>10}")
    out.append("")
    out.append("compile (s) and memory_analysis() per device (MB)")
    out.append(f"{'mesh':<18}{'mp lower':>9}{'mp comp':>8}{'base comp':>10}{'args':>8}{'out':>8}"
               f"{'alias':>8}{'temp':>8}{'live':>8}{'base tmp':>9}")
    for r in rows:
        c = r["compile_s"]
        m, mb = r["memory_per_device"]["meshpar"], r["memory_per_device"]["baseline"]
        out.append(f"{r['mesh']:<18}{c['meshpar_lower']:>9.2f}{c['meshpar_compile']:>8.2f}"
                   f"{c['baseline_compile']:>10.2f}{_mb(m['argument']):>8}{_mb(m['output']):>8}"
                   f"{_mb(m['alias']):>8}{_mb(m['temp']):>8}{_mb(m['live']):>8}"
                   f"{_mb(mb['temp']):>9}")
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _common.parser(__doc__)
    p.add_argument("--preset", default="20m", help="GPT preset (meshpar.models.gpt.PRESETS)")
    p.add_argument("--meshes", default=DEFAULT_MESHES,
                   help="';'-separated meshes, each 'axis=n,...' with an optional ':strategy'")
    p.add_argument("--steps", type=int, default=5, help="timed steps per program (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per program first")
    # 32 x 256 = 8192 tokens: 1024 rows per device on a batch-split mesh, the size of the peak
    # matmul's blocks; at 8 x 256 the per-device matmuls are 4x smaller and run further below
    # the peak, and the per-step fixed work (optimizer, collectives) weighs 4x more.
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--remat", default="dots",
                   help="layer remat policy (meshpar.parallel.remat.REMAT_POLICIES); 'preset' keeps the "
                        "preset's ('full'). 'dots' saves matmul outputs, so nothing is computed "
                        "twice, while ZeRO-3 still regathers each layer in the backward pass")
    p.add_argument("--peak-n", type=int, default=1024, help="per-device matmul size of the peak")
    return _common.parse_args(p, argv)


def run(args: argparse.Namespace, log: Callable = print) -> dict:
    """Benchmark every mesh of ``args`` (JAX must already have its devices); return the report."""
    bench = _common.Run(args, "bench_strategies.py")
    single = measure_single_device_peak(args.peak_n, reps=3)
    layouts = [
        bench_layout(m.strip(), preset=args.preset, batch_size=args.batch_size,
                     seq_len=args.seq_len, warmup=args.warmup, steps=args.steps,
                     peak_n=args.peak_n, remat=None if args.remat == "preset" else args.remat, log=log)
        for m in args.meshes.split(";") if m.strip()
    ]
    return {
        "meta": bench.meta(single_device_peak_flops_per_s=single),
        "layouts": layouts,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import meshpar as mp

    mp.emulate_devices(args.cpu_devices)  # before anything starts JAX's backend
    report = run(args)
    print()
    print(format_report(report))
    print(f"\nsingle-device {args.peak_n}^3 matmul: "
          f"{report['meta']['single_device_peak_flops_per_s'] / 1e9:.1f} GFLOP/s (reference); "
          f"wall {report['meta']['wall_s']:.0f}s")
    _common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
