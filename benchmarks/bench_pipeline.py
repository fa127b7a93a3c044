"""What a pipeline costs: the pipelined train step against the same model unpipelined.

On 8 emulated CPU devices, in one process, the GPT (default: ``tiny`` with 8 layers, global batch
32) is trained on ``pipe=4,data=2`` with ``M`` microbatches (default 4, 8, 16) under the gpipe and
the circular (``v = 2``) schedule, and on ``data=8`` without a pipeline (same model, seed,
optimizer, global batch). For each pipelined configuration it reports

(a) compiled FLOPs, pipelined / unpipelined, next to ``1 + bubble`` and ``1 / (1 - bubble)`` with
    ``bubble = (P-1)/(v*M+P-1)``, two ways:

    * ``cost_analysis()["flops"]`` of the compiled steps. XLA counts every instruction of the
      module once: a ``while`` body once whatever its trip count, and both branches of a
      ``conditional``. So for the pipelined step it counts *one* iteration of the pipeline loop
      (one chunk's layer-scan body, once) plus what runs outside the loop, against one layer-scan
      body plus the rest for the unpipelined step: a ratio of static program sizes that says
      nothing about the bubble;
    * the FLOPs of every ``dot`` weighted by the trip counts of the loops around it (both branches
      of the bubble ``cond`` counted in every iteration, as if bubbles were computed): per device,
      ``(v*M+P-1)/(v*M) = 1/(1-bubble)`` times the useful layer FLOPs, plus the pipeline's own
      extras. Split into the part inside loops (the layer stack) and outside (embedding, logits,
      loss), which the pipelined step computes replicated over ``pipe``;

(b) the median step time, pipelined / unpipelined: both jitted train steps (``Trainer._jitted``,
    i.e. ``Trainer.step`` without the host transfer) run interleaved (A B, B A, ...) on a
    pre-placed batch after warm-up, so drift of the machine cancels in the per-pair ratios;

(c) the pipeline core alone (:func:`meshpar.parallel.pipeline.pipeline_apply` forward + backward, the GPT's
    blocks as ``stage_fn``, the trainer's stage-layout weights, activations ``[M, mb, T, D]``):
    ``skip_bubbles=True`` (bubbles skipped with ``lax.cond``) / ``skip_bubbles=False`` (bubbles
    computed on garbage) time, interleaved, next to the ideal ``1 - bubble``. ``skip_bubbles`` is
    only reachable there: the trainer (``meshpar.scan_layers``) always skips.

Eight emulated devices share the host's cores, so a pipeline cannot be faster than data
parallelism here (nothing runs concurrently that would not anyway); what the numbers show is the
pipeline's overhead. Run ``python benchmarks/bench_pipeline.py --help``; results and their reading
are in ``benchmarks/PIPELINE.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# _common, whether this file runs as a script or is loaded by path (tests/test_benchmarks.py).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """``(P-1) / (v*M + P-1)``: the fraction of stage-iterations that idle."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


# ------------------------------------------------------------------------------------------------
# Trip-count-weighted dot FLOPs of a compiled module
# ------------------------------------------------------------------------------------------------



def dot_flops(hlo_text: str, /) -> dict[str, float]:
    """``{"total", "in_loops", "outside_loops"}`` dot FLOPs per device and step (meshpar.inspect.hlo)."""
    from meshpar.inspect import hlo

    got = hlo.dot_flops(hlo_text)
    return {k: got[k] for k in ("total", "in_loops", "outside_loops")}


def _block(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def _stats(xs: Sequence[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": list(xs)}


def interleaved(a: Callable[[], Any], b: Callable[[], Any], *, warmup: int, reps: int) -> dict:
    """Time ``a`` and ``b`` alternately (A B, B A, ...) after ``warmup`` calls of each."""
    for _ in range(warmup):
        a()
        b()

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    ta, tb, pair = [], [], []
    for i in range(reps):
        if i % 2 == 0:
            x, y = timed(a), timed(b)
        else:
            y, x = timed(b), timed(a)
        ta.append(x)
        tb.append(y)
        pair.append(x / y)
    return {"a": _stats(ta), "b": _stats(tb), "ratio_of_medians": statistics.median(ta) /
            statistics.median(tb), "pair_ratio": _stats(pair), "ratio_of_minima": min(ta) / min(tb)}


def _trainer(cfg, mesh_text: str, **config):
    import optax
    from flax import nnx

    import meshpar as mp
    from meshpar.models import GPT, lm_loss

    return mp.Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-3), lm_loss,
                      mesh=mp.make_mesh(mesh_text), strategy="dp",
                      config=mp.TrainConfig(**config, row_separable=True))


def _compile_step(trainer, host_batch) -> tuple[Any, float]:
    t = time.perf_counter()
    compiled = trainer.lower(host_batch).compile()
    return compiled, time.perf_counter() - t


def _stepper(trainer, placed) -> Callable[[], None]:
    state = [trainer.state]

    def run():
        state[0], metrics = trainer._jitted(state[0], placed)
        _block((state[0], metrics))

    def finish():
        trainer.state = state[0]   # donated along the way; hand the trainer its latest state

    run.finish = finish  # type: ignore[attr-defined]
    return run


def core_programs(trainer, cfg, *, mb: int):
    """``value_and_grad`` of a weighted sum of :func:`pipeline_apply`'s outputs, with
    ``skip_bubbles`` True and False, on the trainer's stage-layout GPT blocks."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from meshpar.parallel.layout import activate
    from meshpar.models import GPT
    from meshpar.parallel.pipeline import pipeline_apply
    from meshpar.parallel.remat import maybe_remat

    mesh, config = trainer.mesh, trainer.pipeline
    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))).blocks)
    params = trainer.state.params["blocks"]
    shape = (config.microbatches, mb, cfg.seq_len, cfg.d_model)
    xs = jax.device_put(np.random.default_rng(0).standard_normal(shape).astype(np.float32),
                        NamedSharding(mesh, PartitionSpec(None, *config.batch_axes)))
    weights = np.random.default_rng(1).standard_normal(shape).astype(np.float32)

    def stage_fn(chunk, h):   # what meshpar.scan_layers runs per stage
        body = maybe_remat(lambda h, layer: (nnx.merge(graphdef, layer)(h), None), cfg.remat)
        return jax.lax.scan(body, h, chunk)[0]

    def make(skip: bool):
        def loss(params, xs):
            with activate(mesh, trainer.compute_rules, pipeline=config):
                ys = pipeline_apply(stage_fn, params, xs, mesh=mesh, config=config,
                                    skip_bubbles=skip)
            return jnp.sum(ys * weights)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    return make(True), make(False), params, xs


def bench_config(cfg, host_batch, base, *, schedule: str, repeats: int, microbatches: int,
                 pipe_mesh: str, warmup: int, reps: int, core: bool, log: Callable) -> dict:
    import numpy as np

    trainer = _trainer(cfg, pipe_mesh, microbatches=microbatches, schedule=schedule,
                       repeats=repeats)
    p = trainer.pipeline
    b = bubble_fraction(p.stages, p.microbatches, p.repeats)
    assert math.isclose(b, p.bubble_fraction)
    compiled, compile_s = _compile_step(trainer, host_batch)
    cost = float((compiled.cost_analysis() or {}).get("flops", float("nan")))
    dots = dot_flops(compiled.as_text())
    base_cost, base_dots = base["cost_flops"], base["dot_flops"]

    run_pipe = _stepper(trainer, trainer.place_batch(host_batch))
    run_base = _stepper(base["trainer"], base["placed"])
    step = interleaved(run_pipe, run_base, warmup=warmup, reps=reps)
    run_pipe.finish()
    run_base.finish()

    result = {
        "schedule": schedule, "repeats": repeats, "microbatches": microbatches,
        "stages": p.stages, "iterations": p.iterations, "bubble": b,
        "one_plus_bubble": 1 + b, "inv_one_minus_bubble": 1 / (1 - b),
        "compile_s": compile_s,
        "cost_analysis_flops": cost, "cost_analysis_ratio": cost / base_cost,
        "dot_flops": dots,
        "dot_ratio": dots["total"] / base_dots["total"],
        "dot_ratio_in_loops": dots["in_loops"] / base_dots["in_loops"],
        "dot_ratio_outside_loops": dots["outside_loops"] / base_dots["outside_loops"],
        # What runs if the bubble branch costs nothing: the loops' dots times (1 - bubble).
        "dot_ratio_executed_estimate": (dots["in_loops"] * (1 - b) + dots["outside_loops"])
        / base_dots["total"],
        "step_time_s": step,
        "step_ratio": step["pair_ratio"]["median"],
    }
    if core:
        mb = host_batch["inputs"].shape[0] // microbatches
        f_skip, f_full, params, xs = core_programs(trainer, cfg, mb=mb)
        t = time.perf_counter()
        out_skip = _block(f_skip(params, xs))
        out_full = _block(f_full(params, xs))
        core_compile = time.perf_counter() - t
        # Same numbers either way (bubbles computed on finite garbage never reach the results).
        np.testing.assert_allclose(float(out_skip[0]), float(out_full[0]), rtol=1e-5)
        timing = interleaved(lambda: _block(f_skip(params, xs)), lambda: _block(f_full(params, xs)),
                             warmup=warmup, reps=reps)
        result["core"] = {"compile_s": core_compile, "time_s": timing,
                          "skip_over_full": timing["pair_ratio"]["median"], "ideal": 1 - b}
    log(f"{schedule:8s} v={repeats} M={microbatches:2d}: bubble {b:.3f}; compile {compile_s:.1f}s; "
        f"cost_analysis x{result['cost_analysis_ratio']:.3f}, dots x{result['dot_ratio']:.3f}; "
        f"step x{result['step_ratio']:.2f}"
        + (f"; core skip/full x{result['core']['skip_over_full']:.2f}" if core else ""))
    return result


def format_table(report: dict) -> str:
    base = report["unpipelined"]
    lines = [
        f"GPT {report['model']['preset']} x{report['model']['layers']} layers "
        f"(d={report['model']['d_model']}, seq {report['model']['seq_len']}), global batch "
        f"{report['batch_size']}; pipelined on {report['pipe_mesh']} vs unpipelined on "
        f"{base['mesh']} (step {base['step_time_s'] * 1e3:.1f} ms median)",
        "",
        f"{'schedule':9s} {'v':>1s} {'M':>3s} {'bubble':>6s} {'1+b':>6s} {'1/(1-b)':>7s} | "
        f"{'cost_an.':>8s} {'dots':>6s} {'dots in':>7s} {'dots out':>8s} {'exec.':>6s} | "
        f"{'step':>5s} {'[min..max]':>13s} {'min/min':>7s} | {'skip/full':>9s} {'min/min':>7s} "
        f"{'1-b':>5s}",
    ]
    lines.append("-" * len(lines[-1]))
    for r in report["configs"]:
        pr = r["step_time_s"]["pair_ratio"]
        core = r.get("core")
        lines.append(
            f"{r['schedule']:9s} {r['repeats']:1d} {r['microbatches']:3d} {r['bubble']:6.3f} "
            f"{r['one_plus_bubble']:6.3f} {r['inv_one_minus_bubble']:7.3f} | "
            f"{r['cost_analysis_ratio']:8.3f} {r['dot_ratio']:6.3f} {r['dot_ratio_in_loops']:7.3f} "
            f"{r['dot_ratio_outside_loops']:8.3f} {r['dot_ratio_executed_estimate']:6.3f} | "
            f"{r['step_ratio']:5.2f} [{pr['min']:5.2f}..{pr['max']:5.2f}] "
            f"{r['step_time_s']['ratio_of_minima']:7.2f} | "
            + (f"{core['skip_over_full']:9.2f} {core['time_s']['ratio_of_minima']:7.2f} "
               f"{core['ideal']:5.3f}" if core else f"{'-':>9s} {'-':>7s} {'-':>5s}")
        )
    lines += [
        "",
        "cost_an.: cost_analysis()['flops'] pipelined / unpipelined (static: loop bodies once).",
        "dots: trip-count-weighted dot FLOPs per device, pipelined / unpipelined (bubble branch "
        "counted as computed);",
        "  in = inside loops (layer stack), out = outside (embedding, logits, loss); exec. = "
        "(in x (1-b) + out) / total: the dots that run when bubbles are skipped.",
        "step: median [min..max] of per-pair step-time ratios pipelined / unpipelined "
        "(interleaved); min/min = fastest / fastest.",
        "skip/full: pipeline core fwd+bwd time, skip_bubbles=True / False, median of pairs and "
        "min/min (ideal 1-b).",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _common.parser(__doc__)
    p.add_argument("--preset", default="tiny", help="GPT preset")
    p.add_argument("--layers", type=int, default=8, help="layers (divisible by stages x repeats)")
    p.add_argument("--remat", default=None, help="override the preset's layer remat policy")
    p.add_argument("--batch-size", type=int, default=32,
                   help="global batch (divisible by M x data for every M)")
    p.add_argument("--pipe-mesh", default="pipe=4,data=2")
    p.add_argument("--base-mesh", default="data=8")
    p.add_argument("--microbatches", default="4,8,16")
    p.add_argument("--schedules", default="gpipe:1,circular:2", help="schedule:repeats,...")
    p.add_argument("--reps", type=int, default=7, help="timed calls per program (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per program first")
    p.add_argument("--no-core", action="store_true", help="skip (c), the pipeline core timing")
    return _common.parse_args(p, argv)


def run(args: argparse.Namespace, log: Callable = print) -> dict:
    """Benchmark every configuration (JAX must already have its devices) and return the report."""
    from meshpar.train.data import TokenBatches
    from meshpar.models import get_preset

    bench = _common.Run(args, "bench_pipeline.py")
    cfg = get_preset(args.preset).replace(layers=args.layers)
    if args.remat:
        cfg = cfg.replace(remat=args.remat)
    host_batch = TokenBatches(batch_size=args.batch_size, seq_len=cfg.seq_len, seed=0).batch(0)

    base_trainer = _trainer(cfg, args.base_mesh)
    compiled, compile_s = _compile_step(base_trainer, host_batch)
    base = {
        "trainer": base_trainer, "placed": base_trainer.place_batch(host_batch),
        "cost_flops": float((compiled.cost_analysis() or {}).get("flops", float("nan"))),
        "dot_flops": dot_flops(compiled.as_text()), "compile_s": compile_s,
    }
    log(f"unpipelined {args.base_mesh}: compile {compile_s:.1f}s")
    configs = []
    for item in args.schedules.split(","):
        schedule, _, repeats = item.partition(":")
        for m in (int(x) for x in args.microbatches.split(",")):
            configs.append(bench_config(
                cfg, host_batch, base, schedule=schedule, repeats=int(repeats or 1),
                microbatches=m, pipe_mesh=args.pipe_mesh, warmup=args.warmup, reps=args.reps,
                core=not args.no_core, log=log))
    base_times = [t for c in configs for t in c["step_time_s"]["b"]["all"]]
    return {
        "meta": bench.meta(),
        "model": {"preset": args.preset, "layers": cfg.layers, "d_model": cfg.d_model,
                  "seq_len": cfg.seq_len, "remat": cfg.remat},
        "batch_size": args.batch_size,
        "pipe_mesh": args.pipe_mesh,
        "unpipelined": {"mesh": args.base_mesh, "compile_s": base["compile_s"],
                        "cost_analysis_flops": base["cost_flops"], "dot_flops": base["dot_flops"],
                        "step_time_s": statistics.median(base_times)},
        "configs": configs,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import meshpar as mp

    mp.emulate_devices(args.cpu_devices)  # before anything starts JAX's backend
    report = run(args)
    print()
    print(format_table(report))
    print(f"\nwall {report['meta']['wall_s']:.0f}s")
    _common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
