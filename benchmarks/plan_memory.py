"""The planner's memory formula against ``memory_analysis`` on a random sample of layouts.

Draws ``--sample`` layouts of the built-in GPT (seeded) from the planner's enumeration for
``--cpu-devices`` devices (remat ``full``/``none``, fp32/bf16, every ZeRO stage, microbatches,
pipelines), compiles each from abstract state (:func:`meshpar.planner.plan_gpt`, nothing
allocated; for the ``h100-sxm`` profile, so bf16 matmuls as bf16 dots whatever this CPU has)
and prints the formula's bytes over the compiled program's, per layout: a predictor where it is
within 10%; the pre-filter (which rejects only what its figure, ``Candidate.memory_prefilter``,
puts more than ``PREFILTER_SLACK`` = 1.15 over the budget) is safe where no pre-filter ratio
exceeds 1.15.

Run ``python benchmarks/plan_memory.py --preset 20m --batch-size 8 --seq-len 64 --sample 10``.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402


def parse_args(argv: Sequence[str] | None = None):
    p = _common.parser(__doc__)
    p.add_argument("--preset", default="20m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--sample", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedules", default="gpipe,circular",
                   help="pipeline schedules to enumerate (',' separated; the recorded figures "
                        "used gpipe,circular; add 1f1b,interleaved-1f1b for the 1F1B layouts)")
    p.add_argument("--pipelined", action="store_true",
                   help="sample only layouts with a pipe axis (e.g. the 1F1B ones)")
    return _common.parse_args(p, argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import meshpar as mp

    mp.emulate_devices(args.cpu_devices)
    from meshpar.models import get_preset
    from meshpar.planner import enumerate_layouts, plan_gpt
    from meshpar.planner.layout import Dims
    from meshpar.planner.search import PREFILTER_SLACK

    bench = _common.Run(args, "plan_memory.py")
    cfg = get_preset(args.preset).replace(seq_len=args.seq_len)
    layouts, _ = enumerate_layouts(
        args.cpu_devices, batch_size=args.batch_size,
        dims=Dims(layers=cfg.layers, heads=cfg.heads, mlp_dim=cfg.mlp_dim),
        devices_per_node=args.cpu_devices, remats=("full", "none"), precisions=("fp32", "bf16"),
        schedules=args.schedules.split(","))
    if args.pipelined:
        layouts = [lay for lay in layouts if lay.pipe > 1]
    sample = random.Random(args.seed).sample(layouts, min(args.sample, len(layouts)))
    result = plan_gpt(cfg, batch_size=args.batch_size, hardware="h100-sxm", layouts=sample,
                      compile_top=len(sample), memory_budget=float("inf"), progress=False)
    rows = [{"layout": c.layout.label, "compiled": c.memory_compiled, "formula": c.memory_analytic,
             "ratio": c.memory_analytic / c.memory_compiled,
             "prefilter_ratio": c.memory_prefilter / c.memory_compiled}
            for c in result.candidates if c.memory_compiled]
    for r in rows:
        print(f"  {r['layout']:55s} compiled {r['compiled'] / 2**20:8.1f} MiB  formula "
              f"{r['formula'] / 2**20:8.1f} MiB  ratio {r['ratio']:.2f}  pre-filter "
              f"{r['prefilter_ratio']:.2f}")
    ratios = [r["ratio"] for r in rows]
    pre = [r["prefilter_ratio"] for r in rows]
    print(f"{len(rows)} layouts: ratio min {min(ratios):.3f} max {max(ratios):.3f}; within 10%: "
          f"{sum(0.9 <= q <= 1.1 for q in ratios)}; pre-filter ratio max {max(pre):.3f}, above "
          f"PREFILTER_SLACK = {PREFILTER_SLACK} (the pre-filter could reject a layout that "
          f"fits): {sum(q > PREFILTER_SLACK for q in pre)}")
    report = {"rows": rows, "meta": bench.meta()}
    _common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
