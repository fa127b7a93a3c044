"""How far the planner's extrapolation is from full compiles (issue 15).

For a device count ``--cpu-devices N`` above 8, it plans the same layouts of the built-in GPT
twice: compiled at ``N`` emulated devices, and compiled as 8-device proxies (``data``/``fsdp``
shrunk, per-device shapes kept) and extrapolated per mesh axis
(:func:`meshpar.planner.search.proxy_layout`, :func:`~meshpar.planner.search.
extrapolate_collectives`). It prints, per layout, the relative error of the extrapolated memory,
of each axis's communication time and of the predicted step time.

Run ``python benchmarks/plan_extrapolation.py --cpu-devices 16`` (and 32).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402


def parse_args(argv: Sequence[str] | None = None):
    p = _common.parser(__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hardware", default="h100-sxm")
    p.add_argument("--proxy-devices", type=int, default=8)
    p.add_argument("--layouts", default="", help="';'-separated meshes (default: a spread)")
    return _common.parse_args(p, argv)


def default_layouts(n: int):
    from meshpar.planner import Layout

    return [Layout(data=n, remat="full"), Layout(fsdp=n, zero_stage=3, remat="full"),
            Layout(data=n // 4, tensor=4, remat="full"),
            Layout(data=n // 8, fsdp=4, tensor=2, zero_stage=3, remat="full")]


def run(args) -> dict:
    from meshpar.models import get_preset
    from meshpar.planner import plan_gpt

    bench = _common.Run(args, "plan_extrapolation.py")
    cfg = get_preset(args.preset)
    layouts = default_layouts(args.cpu_devices)
    common = dict(batch_size=args.batch_size, hardware=args.hardware, layouts=layouts,
                  compile_top=len(layouts), memory_budget=float("inf"), progress=False)
    full = {c.layout: c for c in plan_gpt(cfg, **common).candidates}
    extra = {c.layout: c for c in plan_gpt(cfg, compile_devices=args.proxy_devices,
                                           **common).candidates}
    rows = []
    for lay in layouts:
        f, e = full[lay], extra[lay]
        axes = {a: (e.time.comm_per_axis.get(a, 0.0) / v - 1 if v else None)
                for a, v in f.time.comm_per_axis.items()}
        rows.append({"layout": lay.label, "source": e.source, "memory_full": f.memory,
                     "memory_extrapolated": e.memory, "memory_error": e.memory / f.memory - 1,
                     "comm_error_per_axis": axes, "step_full": f.time.step,
                     "step_extrapolated": e.time.step,
                     "step_error": e.time.step / f.time.step - 1})
    return {"rows": rows, "meta": bench.meta()}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import meshpar as mp

    mp.emulate_devices(args.cpu_devices)
    report = run(args)
    print(f"{args.cpu_devices} devices, {args.preset}, batch {args.batch_size}: extrapolated "
          f"from {args.proxy_devices}-device proxies vs compiled at {args.cpu_devices}")
    for r in report["rows"]:
        comm = " ".join(f"{a}:{v:+.1%}" if v is not None else f"{a}:n/a"
                        for a, v in r["comm_error_per_axis"].items())
        print(f"  {r['layout']:38s} memory {r['memory_error']:+6.1%}  step {r['step_error']:+6.1%}"
              f"  comm per axis {comm}   ({r['source']})")
    _common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
