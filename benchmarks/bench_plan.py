"""How well ``meshpar plan`` ranks layouts: predicted against measured step time, one run.

For ``--layouts`` layouts of the built-in GPT (default the ``20m`` preset, batch 32 x 256) on
``--cpu-devices`` emulated devices (default 8) with the ``cpu`` hardware profile (calibrated on
this machine, cached), it

1. plans them with :func:`meshpar.planner.plan_gpt` (each compiled from abstract state, nothing
   allocated; the prediction uses the compiled program's collectives),
2. builds each layout's ``Trainer`` for real, runs ``--warmup`` steps of each, then ``--steps``
   rounds that step every layout once (round robin, the order reversed every other round, so
   that the machine's drift during the run lands on all layouts alike; ``--sequential`` times
   them one after the other instead) and takes each layout's median wall time (and the median
   CPU time of this process, which other processes on a shared machine stretch less),
3. prints the table (predicted compute and communication, measured wall and CPU time), the
   Spearman rank correlation of predicted against measured (wall and CPU
   time) and whether the top pick is within 10% of the measured best.

The layouts: a spread over the planner's own enumeration (every mesh factorisation with remat
``full`` in fp32, then other remat/precision/microbatch/ZeRO variants) until ``--layouts``.
``--recalibrate`` measures the ``cpu`` profile first (a quiet machine gives steadier figures
than a cache measured under load). Run ``python benchmarks/bench_plan.py --help``. The issue's figure wants >= 12 layouts of the
``20m`` preset on a quiet machine; ``--preset tiny --layouts 6`` is a cheap smoke run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402


def parse_args(argv: Sequence[str] | None = None):
    p = _common.parser(__doc__)
    p.add_argument("--preset", default="20m")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    p.add_argument("--layers", type=int, default=None, help="override the preset's depth")
    p.add_argument("--layouts", type=int, default=12)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps per layout (rounds of the round robin)")
    p.add_argument("--sequential", action="store_true",
                   help="time the layouts one after the other (each built, timed and dropped "
                        "in turn) instead of round robin with every layout alive at once: "
                        "less memory, but a drift of the machine's speed lands on some layouts")
    p.add_argument("--hardware", default="cpu")
    p.add_argument("--recalibrate", action="store_true",
                   help="measure the cpu profile again first (on the machine as it is now) "
                        "instead of reading the cache")
    p.add_argument("--schedules", default="gpipe,circular",
                   help="pipeline schedules to enumerate (',' separated; the recorded figures "
                        "used gpipe,circular; add 1f1b,interleaved-1f1b for the 1F1B layouts)")
    return _common.parse_args(p, argv)


def pick_layouts(layouts, n: int):
    """A spread of ``n`` layouts: one per mesh factorisation (remat full, fp32, 1 microbatch,
    highest ZeRO stage) first, then variants, in enumeration order."""
    base = {}
    for lay in layouts:
        if lay.remat == "full" and lay.precision == "fp32" and lay.schedule == "gpipe":
            key = lay.mesh_text
            if key not in base or (lay.zero_stage, -lay.microbatches) > (
                    base[key].zero_stage, -base[key].microbatches):
                base[key] = lay
    chosen = list(base.values())[:n]
    seen = set(chosen)
    variants = [lay for lay in layouts if lay not in seen and lay.mesh_text in base]
    # Interleave variants of different meshes so the extra layouts are not all one mesh.
    by_mesh: dict[str, list] = {}
    for lay in variants:
        by_mesh.setdefault(lay.mesh_text, []).append(lay)
    while len(chosen) < n and any(by_mesh.values()):
        for lays in by_mesh.values():
            if lays and len(chosen) < n:
                chosen.append(lays.pop(len(lays) // 2))
    return chosen


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    import numpy as np
    from scipy.stats import rankdata

    rx, ry = rankdata(xs), rankdata(ys)
    return float(np.corrcoef(rx, ry)[0, 1])


def run(args, log: Callable = print) -> dict:
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from meshpar.mesh import make_mesh
    from meshpar.models import GPT, get_preset, lm_loss
    from meshpar.planner import enumerate_layouts, load_profile, plan_gpt
    from meshpar.planner.layout import Dims
    from meshpar.train import Trainer
    from meshpar.train.data import TokenBatches

    bench = _common.Run(args, "bench_plan.py")
    # The measured trainers compile the same programs the planner compiled: a persistent compile
    # cache makes the second compile a read. The caller's, if it has one (tests); else this
    # run's own, removed when the process exits.
    if not jax.config.jax_compilation_cache_dir:
        cache_dir = tempfile.mkdtemp(prefix="bench_plan_")
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cfg = get_preset(args.preset)
    if args.layers:
        cfg = cfg.replace(layers=args.layers)
    seq = args.seq_len or cfg.seq_len
    cfg = cfg.replace(seq_len=seq)
    hw = load_profile(args.hardware, recalibrate=args.recalibrate and args.hardware == "cpu")
    log(f"profile {hw.name}: peak {hw.peak_flops['fp32'] / 1e9:.1f} GFLOP/s fp32, matmul "
        f"{(hw.matmul_bandwidth or 0) / 1e9:.2f} GB/s, memory {hw.hbm_bandwidth / 1e9:.2f} GB/s, "
        f"collectives {hw.intra_bandwidth / 1e9:.2f} GB/s + {hw.intra_latency * 1e6:.0f} us "
        f"each ({hw.source})")
    all_layouts, _ = enumerate_layouts(
        args.cpu_devices, batch_size=args.batch_size,
        dims=Dims(layers=cfg.layers, heads=cfg.heads, mlp_dim=cfg.mlp_dim),
        devices_per_node=hw.devices_per_node, remats=("full", "none"), precisions=("fp32", "bf16"),
        schedules=args.schedules.split(","))
    chosen = pick_layouts(all_layouts, args.layouts)
    t0 = time.perf_counter()
    result = plan_gpt(cfg, batch_size=args.batch_size, seq_len=seq, hardware=hw,
                      layouts=chosen, compile_top=len(chosen), memory_budget=float("inf"),
                      progress=False)
    plan_s = time.perf_counter() - t0
    log(f"planned {len(chosen)} layouts in {plan_s:.0f}s (compiled: "
        f"{sum(c.source == 'compiled' for c in result.candidates)})")
    data = TokenBatches(batch_size=args.batch_size, seq_len=seq, seed=0)
    compiled = [c for c in result.candidates if c.source == "compiled"]

    def build(lay):
        model_cfg = cfg.replace(remat=lay.remat)
        return Trainer(lambda: GPT(model_cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-3), lm_loss,
                       mesh=make_mesh(lay.mesh_shape), strategy=lay.strategy(),
                       config=lay.train_config(row_separable=True))

    def timed(trainer, i):
        w, p = time.perf_counter(), time.process_time()
        trainer.step(data.batch(i))
        return time.perf_counter() - w, time.process_time() - p

    walls: dict[int, list[float]] = {k: [] for k in range(len(compiled))}
    cpus: dict[int, list[float]] = {k: [] for k in range(len(compiled))}
    if args.sequential:
        # One layout after the other: a drift of the machine's speed during the run (other
        # jobs, clocks) lands on whichever layouts ran then.
        for k, c in enumerate(compiled):
            trainer = build(c.layout)
            for i in range(args.warmup + args.steps):
                w, p = timed(trainer, i)
                if i >= args.warmup:
                    walls[k].append(w)
                    cpus[k].append(p)
            del trainer
    else:
        # Round robin: every layout's trainer is built and warmed up, then each round steps
        # every layout once (the order reversed every other round), so a drift of the machine's
        # speed lands on all of them alike. The layouts' states are all alive at once.
        trainers = [build(c.layout) for c in compiled]
        for trainer in trainers:
            for i in range(args.warmup):
                timed(trainer, i)
        for r in range(args.steps):
            order = range(len(trainers)) if r % 2 == 0 else reversed(range(len(trainers)))
            for k in order:
                w, p = timed(trainers[k], args.warmup + r)
                walls[k].append(w)
                cpus[k].append(p)
        del trainers
    rows = []
    for k, c in enumerate(compiled):
        row = {"layout": c.layout.label, "predicted_s": c.time.step,
               "predicted_compute_s": c.time.compute, "predicted_comm_s": c.time.exposed,
               "measured_wall_s": statistics.median(walls[k]),
               "measured_cpu_s": statistics.median(cpus[k]),
               "measured_wall_all_s": walls[k],
               "memory_bytes": c.memory, "memory_analytic_bytes": c.memory_analytic}
        rows.append(row)
        log(f"  {c.layout.label:44s} predicted {row['predicted_s'] * 1e3:8.1f} ms (compute "
            f"{c.time.compute * 1e3:.0f} + comm {c.time.exposed * 1e3:.0f})  measured "
            f"{row['measured_wall_s'] * 1e3:8.1f} ms wall "
            f"{row['measured_cpu_s'] * 1e3:8.1f} ms cpu")
    pred = [r["predicted_s"] for r in rows]
    report = {"rows": rows}
    for kind in ("wall", "cpu"):
        meas = [r[f"measured_{kind}_s"] for r in rows]
        top = int(np.argmin(pred))
        report[kind] = {"spearman": spearman(pred, meas),
                        "top_pick_over_best": meas[top] / min(meas) - 1,
                        "top_pick": rows[top]["layout"],
                        "measured_best": rows[int(np.argmin(meas))]["layout"]}
    report["meta"] = bench.meta(plan_s=plan_s, hardware=hw.name, profile=hw.to_toml())
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import meshpar as mp

    mp.emulate_devices(args.cpu_devices)  # before anything starts JAX's backend
    report = run(args)
    for kind in ("wall", "cpu"):
        r = report[kind]
        print(f"{kind:4s} time: Spearman rank correlation {r['spearman']:+.2f} over "
              f"{len(report['rows'])} layouts; top pick {r['top_pick']!r} is "
              f"{r['top_pick_over_best']:+.1%} over the measured best {r['measured_best']!r} "
              f"({'within' if r['top_pick_over_best'] <= 0.10 else 'NOT within'} 10%)")
    ratios = [r["memory_analytic_bytes"] / r["memory_bytes"] for r in report["rows"]]
    print(f"memory formula / memory_analysis: {min(ratios):.2f} .. {max(ratios):.2f} over "
          f"{len(ratios)} compiled layouts (<= 1: the pre-filter never rejects one that fits)")
    print(f"load average {report['meta']['loadavg']}; wall {report['meta']['wall_s']:.0f}s")
    _common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
