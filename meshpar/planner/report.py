"""The planner's result as text: a ranked table and the top pick's command and arguments."""

from __future__ import annotations

from meshpar.planner.search import PlanResult

MIB = 2**20


def format_plan_result(result: PlanResult, /, *, top: int = 15) -> str:
    """A ranked table of ``result``'s candidates (the ``top`` first, then those that do not fit
    with their margin), and the top pick as a ``meshpar train`` command and ``Trainer`` call.

    Example:
        >>> from meshpar.models import get_preset
        >>> from meshpar.planner.search import plan_gpt
        >>> result = plan_gpt(get_preset("tiny"), batch_size=16, devices=8, hardware="h100-sxm",
        ...                   compile_top=0, progress=False)    # formulas only
        >>> text = format_plan_result(result, top=3)
        >>> [line.split(" (")[0] for line in text.splitlines() if line.startswith("plan: ")]
        ['plan: 8 devices of h100-sxm']
        >>> sum(line.lstrip().startswith("meshpar train ") for line in text.splitlines())
        1
    """
    hw = result.hardware
    lines = [f"plan: {result.devices} devices of {hw.name} ({hw.source}); "
             f"{len(result.candidates)} candidates costed, {len(result.rejected)} rejected before "
             f"costing; {sum(c.source == 'compiled' for c in result.candidates)} compiled"]
    lines += [f"note: {n}" for n in result.notes]
    head = (f"{'#':>3} {'layout':44s} {'src':4s} {'mem/dev MiB':>11s} {'budget':>7s} "
            f"{'compute':>9s} {'comm (per axis) ms':40s} {'bubble':>7s} {'step ms':>9s} {'MFU':>6s}")
    lines += [head, "-" * len(head)]

    def row(i, c):
        t = c.time
        comm = " ".join(f"{a}:{s * 1e3:.2f}" for a, s in sorted(t.comm_per_axis.items())) or "-"
        return (f"{i:>3} {c.layout.label[:44]:44s} {c.source[:4]:4s} {c.memory / MIB:>11.1f} "
                f"{c.memory / c.budget:>7.0%} {t.compute * 1e3:>9.2f} {comm[:40]:40s} "
                f"{t.bubble * 1e3:>7.2f} {t.step * 1e3:>9.2f} {t.mfu:>6.1%}")

    fitting = result.fitting
    for i, c in enumerate(fitting[:top], 1):
        lines.append(row(i, c))
    if len(fitting) > top:
        lines.append(f"    ... {len(fitting) - top} more that fit (--json lists them all)")
    over = [c for c in result.candidates if not c.fits]
    if over:
        lines.append(f"do not fit ({len(over)}), least memory first:")
        for c in over[:5]:
            lines.append(f"    {c.layout.label}: {c.memory / MIB:.1f} MiB, over the "
                         f"{c.budget / MIB:.1f} MiB budget by {-c.margin / MIB:.1f} MiB")
    compiled = [c for c in result.candidates if c.memory_compiled]
    if compiled:
        ratios = [c.memory_analytic / c.memory_compiled for c in compiled]
        lines.append(f"memory formula / compiled memory_analysis over the {len(compiled)} "
                     f"compiled: {min(ratios):.2f} .. {max(ratios):.2f} (the formula is the "
                     "pre-filter's estimate; a compiled candidate reports memory_analysis)")
    if fitting:
        best = fitting[0]
        lines.append("")
        lines.append(f"top pick: {best.layout.label} ({best.source}; predicted "
                     f"{best.time.step * 1e3:.2f} ms/step, {best.memory / MIB:.1f} MiB/device)")
        if best.command:
            lines.append(f"  {best.command}")
        lines.append(f"  {best.layout.trainer_code()}")
    return "\n".join(lines)
