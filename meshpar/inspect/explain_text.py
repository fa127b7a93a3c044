"""The table of an :func:`~meshpar.inspect.explain.explain` report: :func:`format_explain`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshpar.inspect.measure import PHASES
from meshpar.inspect.report import human_bytes


def _fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        return human_bytes(value)
    if unit == "flop":
        return f"{value / 1e6:.1f} MFLOP"
    return f"{value:g}"


def format_explain(report: Mapping[str, Any], /, *, title: str = "") -> str:
    """The report of :func:`explain` as text: memory, FLOPs, collectives, checks, notes.

    Example:
        >>> from meshpar.inspect.explain import explain_gpt
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import get_preset
        >>> report = explain_gpt(get_preset("tiny"), mesh=make_mesh(fsdp=8), strategy="zero3")
        >>> text = format_explain(report)              # print(text): about 40 lines
        >>> headings = [line for line in text.splitlines() if line and line[0] != " "]
        >>> headings[2:4], headings[-1]
        (['memory per device (memory_analysis)', 'FLOPs per device'], 'notes')
    """
    lay, mem = report["layout"], report["measured"]["memory"]
    mesh = ",".join(f"{k}={v}" for k, v in lay["mesh"].items())
    pipe = lay["pipeline"]
    lines = [title] if title else []
    lines.append(
        f"compiled train step: mesh {mesh} ({lay['devices']} devices), strategy {lay['strategy']} "
        f"(ZeRO-{lay['effective_zero_stage']}"
        f"{'' if lay['effective_zero_stage'] == lay['zero_stage'] else ': no fsdp axis'}"
        f"{', sequence parallel' if lay['sequence_parallel'] else ''}), "
        f"batch {lay['batch'][0]} x {lay['batch'][1]}, {lay['microbatches']} microbatch(es), "
        f"{lay['precision']}"
        + (f", pipeline {pipe['schedule']} {pipe['stages']} stages x {pipe['repeats']} repeat(s), "
           f"{pipe['iterations']} iterations" if pipe else ""))
    model = report["model"]
    lines.append(f"Ψ = {model['params']:,} parameters; G = {human_bytes(model['grad_bytes_G'])} "
                 "(fp32 gradient bytes per device before ZeRO)")
    lines += ["", "memory per device (memory_analysis)",
              f"  arguments {human_bytes(mem['argument'])}, outputs {human_bytes(mem['output'])}, "
              f"temporaries {human_bytes(mem['temp'])}, aliased {human_bytes(mem['alias'])}",
              f"  total {human_bytes(mem['total'])} (arguments + outputs + temporaries - aliased)"]
    fl = report["flops"]
    lines += ["", "FLOPs per device",
              f"  cost_analysis()           {fl['per_device_cost_analysis'] / 1e6:10.1f} M",
              f"  HLO dots x trip counts    {fl['per_device_dots'] / 1e6:10.1f} M"]
    if "per_device_analytic" in fl:
        lines.append(f"  analytic                  {fl['per_device_analytic'] / 1e6:10.1f} M")
    head = ("kind@axes", "ops", "runs", "in loop", "forward", "backward", "update", "bytes/step",
            "ring traffic")
    rows = [head]
    for key, c in report["measured"]["collectives"].items():
        rows.append((key, str(c["ops"]), str(c["executions"]), str(c["in_loop"]),
                     *(human_bytes(c.get(f"{ph}_bytes", 0)) for ph in PHASES),
                     human_bytes(c["bytes_per_step"]), human_bytes(c["traffic_bytes_per_step"])))
    lines += ["", "collectives per step (volume: all-reduce/all-gather result, reduce-scatter "
              "input; loop trip counts included)"]
    lines += _table(rows, right_from=1)
    rows = [("check", "analytic", "measured", "ratio", "source")]
    formulas = []
    for c in report["checks"]:
        ratio = "-" if c["ratio"] is None else f"{c['ratio']:.3f}"
        rows.append((c["name"], _fmt(c["analytic"], c["unit"]), _fmt(c["measured"], c["unit"]),
                     ratio, c["source"]))
        formulas.append(c["formula"])
    lines += ["", "measured against the strategy's analytic figures"]
    table = _table(rows, right_from=1)
    lines += table[:2]
    for row, formula in zip(table[2:], formulas):
        lines += [row, f"      = {formula}"]
    if report["notes"]:
        lines += ["", "notes"] + [f"  - {n}" for n in report["notes"]]
    return "\n".join(lines)


def _table(rows: list, *, right_from: int) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  " + "  ".join(c.ljust(w) if i < right_from else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out
