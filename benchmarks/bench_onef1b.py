"""1F1B against GPipe: step time at equal microbatches, and the most microbatches a memory budget holds.

On 8 emulated CPU devices, in one process, the GPT (default: ``tiny`` with 8 layers, sequence 32)
is trained on ``pipe=4,data=2`` with a fixed microbatch size (``--mb`` rows; the global batch is
``M x mb``), so more microbatches mean a larger batch and a smaller bubble.

(a) Step time at equal ``M``: the jitted train steps of ``gpipe`` and ``1f1b`` (and ``circular``
    against ``interleaved-1f1b`` with ``v = 2``; and each 1F1B schedule with ``pipeline_remat``
    against its default) run interleaved (A B, B A, ...) after warm-up; the median of the
    per-pair ratios is printed. Eight emulated devices share the host's cores, so idle stages
    cost nothing here and time follows the work done: expect parity (1F1B's forward ticks keep
    their residuals, so each chunk's forward runs twice, as GPipe's), and ``pipeline_remat``
    slower by its extra forward (see ``meshpar.parallel.onef1b``, about +25% of the stack's
    work), not the bubble savings a real multi-chip pipeline sees.

(b) Memory: per-device ``memory_analysis`` of the compiled step (arguments + outputs +
    temporaries - aliased, as ``meshpar inspect --compiled`` reports it) for
    ``M = P, 2P, 4P, ...``, and, for a budget (default: GPipe's memory at ``M = 2P``), the
    largest ``M`` each schedule fits in it and the bubble fraction that ``M`` gives. Only
    compiling is needed; nothing runs. The model's own full-batch activations (embedding, logits,
    loss: outside the layer stack) grow with ``M`` under every schedule; only the pipeline's
    part is flat under 1F1B.

Run ``python benchmarks/bench_onef1b.py --help``; results are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402
from bench_pipeline import _block, _stepper, _trainer, interleaved  # noqa: E402


def _batch(cfg, global_batch: int):
    from meshpar.train.data import TokenBatches

    return TokenBatches(batch_size=global_batch, seq_len=cfg.seq_len, seed=0).batch(0)


def _memory(trainer, host_batch) -> dict:
    mem = trainer.lower(host_batch).compile().memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    return {"temp": int(mem.temp_size_in_bytes), "total": int(total)}


def main(argv: Sequence[str] | None = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=None, help="override the preset's width "
                   "(and its MLP width, 4x)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--schedules", nargs="*", default=["gpipe", "1f1b", "circular",
                                                      "interleaved-1f1b"],
                   help="schedules of the memory sweep (circular ones with v = 2); a '+remat' "
                        "suffix (e.g. 1f1b+remat) sets pipeline_remat=True")
    p.add_argument("--mesh", default="pipe=4,data=2")
    p.add_argument("--mb", type=int, default=4, help="rows per microbatch")
    p.add_argument("--time-microbatches", type=int, nargs="*", default=[8],
                   help="M values of the step-time comparison")
    p.add_argument("--memory-microbatches", type=int, nargs="*", default=[4, 8, 16, 32],
                   help="M values of the memory sweep")
    p.add_argument("--budget-microbatches", type=int, default=8,
                   help="the budget is GPipe's memory at this M")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=8)
    args = _common.parse_args(p, argv)
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(args.cpu_devices))
    import meshpar as mp

    mp.emulate_devices(args.cpu_devices)
    run = _common.Run(args, "bench_onef1b.py")
    from meshpar.models import get_preset
    from meshpar.parallel.schedule import PipelineConfig

    cfg = get_preset(args.preset).replace(layers=args.layers)
    if args.d_model:
        cfg = cfg.replace(d_model=args.d_model, mlp_dim=4 * args.d_model)
    if args.seq_len:
        cfg = cfg.replace(seq_len=args.seq_len)
    # (baseline, its repeats, its pipeline_remat, schedule, its repeats, its pipeline_remat)
    pairs = [("gpipe", 1, None, "1f1b", 1, None),
             ("circular", 2, None, "interleaved-1f1b", 2, None),
             ("1f1b", 1, None, "1f1b", 1, True),
             ("interleaved-1f1b", 2, None, "interleaved-1f1b", 2, True)]
    report: dict = {"step_time": [], "memory": [], "budget": {}}

    print("(a) step time, 1F1B / GPipe at equal M (interleaved, medians of per-pair ratios)")
    for m in args.time_microbatches:
        batch = _batch(cfg, m * args.mb)
        for base, v_base, r_base, new, v_new, r_new in pairs:
            a = _trainer(cfg, args.mesh, microbatches=m, schedule=new, repeats=v_new,
                         pipeline_remat=r_new)
            b = _trainer(cfg, args.mesh, microbatches=m, schedule=base, repeats=v_base,
                         pipeline_remat=r_base)
            ra, rb = _stepper(a, a.place_batch(batch)), _stepper(b, b.place_batch(batch))
            t = interleaved(ra, rb, warmup=args.warmup, reps=args.reps)
            ra.finish()
            rb.finish()
            new_label = new + ("+pipeline_remat" if r_new else "")
            row = {"microbatches": m, "schedule": new_label, "baseline": base,
                   "ratio": t["pair_ratio"]["median"],
                   "step_s": t["a"]["median"], "baseline_step_s": t["b"]["median"],
                   "bubble": a.pipeline.bubble_fraction,
                   "baseline_bubble": b.pipeline.bubble_fraction}
            report["step_time"].append(row)
            print(f"  M={m:3d} {new_label:>32} / {base:<16}: {row['ratio']:.3f}  "
                  f"({row['step_s'] * 1e3:.0f} ms vs {row['baseline_step_s'] * 1e3:.0f} ms)",
                  flush=True)

    print("\n(b) memory per device (arguments + outputs + temporaries - aliased), MiB")
    schedules = [(s, 2 if s.split("+")[0] in ("circular", "interleaved-1f1b") else 1)
                 for s in args.schedules]
    mem: dict = {}
    for m in args.memory_microbatches:
        batch = _batch(cfg, m * args.mb)
        cells = []
        for s, v in schedules:
            name, _, remat = s.partition("+")
            got = _memory(_trainer(cfg, args.mesh, microbatches=m, schedule=name, repeats=v,
                                   pipeline_remat=True if remat == "remat" else None), batch)
            mem[(s, m)] = got
            report["memory"].append({"schedule": s, "microbatches": m, **got})
            cells.append(f"{s} {got['total'] / 2**20:7.2f} (temp {got['temp'] / 2**20:6.2f})")
        print(f"  M={m:3d}: " + " | ".join(cells), flush=True)

    base = schedules[0][0]
    budget = mem[(base, args.budget_microbatches)]["total"]
    stages = int(args.mesh.split("pipe=")[1].split(",")[0])
    print(f"\n    budget = {base} at M={args.budget_microbatches}: {budget / 2**20:.2f} MiB")
    for s, v in schedules:
        fits = [m for m in args.memory_microbatches if mem[(s, m)]["total"] <= budget]
        best = max(fits) if fits else None
        bubble = (PipelineConfig(stages, best, s.split("+")[0], v).bubble_fraction
                  if best else None)
        report["budget"][s] = {"largest_microbatches": best, "bubble_fraction": bubble}
        print(f"    {s:>17}: largest M {best}, bubble fraction "
              f"{'-' if bubble is None else f'{bubble:.3f}'}")
    report["meta"] = run.meta(budget_bytes=budget)
    _common.write_json(args.json, report)
    _block(None)
    return report


if __name__ == "__main__":
    main()
