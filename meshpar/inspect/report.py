"""Reports as text and data: the sharding report (every parameter's layout, per-device bytes and
every fallback) and the table of an :func:`~meshpar.inspect.explain.explain` report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshpar.inspect.measure import PHASES
from meshpar.mesh import format_mesh
from meshpar.sharding.placement import ShardingPlan, Source


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _spec_text(spec) -> str:
    return "P(" + ", ".join(
        "None" if e is None else (repr(e) if isinstance(e, str) else "(" + ",".join(map(repr, e)) + ")")
        for e in spec
    ) + ")"


def plan_to_dict(plan: ShardingPlan, /) -> dict[str, Any]:
    """The report as plain JSON-able data.

    Example:
        >>> json.dumps(plan_to_dict(plan))   # doctest: +SKIP
    """
    devices = plan.mesh.size
    return {
        "mesh": dict(plan.mesh.shape),
        "devices": devices,
        "rules": plan.rules.describe(),
        "params": [
            {
                "path": e.path,
                "shape": list(e.shape),
                "dtype": e.dtype,
                "logical_axes": list(e.logical) if e.logical is not None else None,
                "source": e.source,
                "rule": e.resolution.rules_text,
                "spec": [list(x) if isinstance(x, tuple) else x for x in e.spec],
                "per_device_shape": list(e.per_device_shape),
                "bytes": e.bytes_total,
                "bytes_per_device": e.bytes_per_device,
                "replicated": e.replicated,
            }
            for e in plan.entries
        ],
        "totals": {
            "bytes": plan.bytes_total,
            "bytes_per_device": plan.bytes_per_device,
            "ideal_bytes_per_device": plan.bytes_total / devices,
            "replicated_bytes": sum(e.bytes_total for e in plan.entries if e.replicated),
        },
        "replicated": [e.path for e in plan.entries if e.replicated],
        "fallbacks": list(plan.fallbacks),
        "unmatched": {name: list(paths) for name, paths in plan.unmatched.items()},
    }


def format_plan(plan: ShardingPlan, /, *, title: str = "") -> str:
    """A readable table of the plan: one row per parameter, then totals and fallbacks."""
    data = plan_to_dict(plan)
    header = ("path", "shape", "logical axes", "rule", "spec", "per device", "bytes/dev")
    rows = [header]
    for e in plan.entries:
        rows.append((
            e.path,
            "x".join(map(str, e.shape)) or "()",
            "(" + ", ".join(str(a) for a in e.logical) + ")" if e.logical is not None else f"<{e.source}>",
            e.resolution.rules_text if e.source_kind is Source.ANNOTATION else f"{e.resolution.rules_text} [{e.source}]",
            _spec_text(e.spec),
            "x".join(map(str, e.per_device_shape)) or "()",
            human_bytes(e.bytes_per_device),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    if title:
        lines.append(title)
    lines.append(f"mesh {format_mesh(plan.mesh)} ({plan.mesh.size} devices)")
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    t = data["totals"]
    lines.append("")
    lines.append(
        f"total {human_bytes(t['bytes'])}; per device {human_bytes(t['bytes_per_device'])} "
        f"(total/{plan.mesh.size} = {human_bytes(t['ideal_bytes_per_device'])}, "
        f"ratio {t['bytes_per_device'] / max(t['ideal_bytes_per_device'], 1):.4f})"
    )
    if data["replicated"]:
        lines.append(
            f"replicated on every device ({human_bytes(t['replicated_bytes'])}): "
            + ", ".join(data["replicated"])
        )
    lines.append("fallbacks: " + ("none" if not data["fallbacks"] else ""))
    lines += [f"  - {f}" for f in data["fallbacks"]]
    if data["unmatched"]:
        # The usual cause is a typo or a model written for other rules: say it once per name.
        lines.append(
            "logical names no rule maps (replicated; Rules(strict=True) makes them errors): "
            + ", ".join(f"{n} ({len(p)} params)" for n, p in data["unmatched"].items())
        )
    return "\n".join(lines)


# -- the explain report ----------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        return human_bytes(value)
    if unit == "flop":
        return f"{value / 1e6:.1f} MFLOP"
    return f"{value:g}"


def format_explain(report: Mapping[str, Any], /, *, title: str = "") -> str:
    """The report of :func:`explain` as text: memory, FLOPs, collectives, checks, notes.

    Example:
        >>> print(format_explain(explain(trainer, batch, d_model=64)))   # doctest: +SKIP
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
