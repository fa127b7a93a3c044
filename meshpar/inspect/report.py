"""The sharding report: every parameter's layout, per-device bytes and every fallback."""

from __future__ import annotations

from typing import Any

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
        >>> import json
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset
        >>> from meshpar.sharding.placement import init_nnx
        >>> from meshpar.sharding.strategy import get_strategy
        >>> mesh = make_mesh(fsdp=4, tensor=2)
        >>> _, plan = init_nnx(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)), mesh=mesh,
        ...                    rules=get_strategy("zero3").param_rules(mesh))
        >>> data = plan_to_dict(plan)
        >>> sorted(data)
        ['devices', 'fallbacks', 'mesh', 'params', 'replicated', 'rules', 'totals', 'unmatched']
        >>> {k: data["params"][0][k] for k in ("path", "spec", "per_device_shape")}
        {'path': 'blocks/b_in', 'spec': [None, 'tensor'], 'per_device_shape': [2, 128]}
        >>> text = json.dumps(data)                     # JSON-able as it is
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
