"""``meshpar plan``: choose the layout of the built-in GPT for a device count and a hardware
profile (:mod:`meshpar.planner`), print the ranked table (or ``--json``), draw the PNG."""

from __future__ import annotations

import argparse
import sys

from meshpar.backend.devices import device_count
from meshpar.cli.args import model_config
from meshpar.errors import UsageError
from meshpar.planner import format_plan_result, plan_gpt
from meshpar.planner.search import PlanResult, no_fit_error

#: The model flags passed through to the ``command`` field's ``meshpar train`` line.
MODEL_FLAGS = ("preset", "layers", "d_model", "heads", "mlp_dim", "vocab_size", "seq_len", "remat")


def model_args(args: argparse.Namespace) -> list[str]:
    """The model flags of ``args`` as ``meshpar train`` takes them (``--remat`` left out: the
    plan chooses it)."""
    out = []
    for flag in MODEL_FLAGS:
        value = getattr(args, flag, None)
        if value is not None and flag != "remat":
            out += [f"--{flag.replace('_', '-')}", str(value)]
    return out


def run_plan(args: argparse.Namespace) -> PlanResult:
    """Plan for parsed ``meshpar plan`` (or ``meshpar train --layout auto``) arguments."""
    if args.devices is not None and args.devices < 1:
        raise UsageError(f"--devices {args.devices}: must be >= 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    cfg = model_config(args)
    remats = [args.remat] if args.remat else ["full", "none"]
    precisions = [args.precision] if getattr(args, "precision", None) else ["fp32", "bf16"]
    budget = args.memory_mib * 2**20 if getattr(args, "memory_mib", None) else None
    return plan_gpt(cfg, batch_size=args.batch_size, seq_len=cfg.seq_len, devices=args.devices,
                    hardware=args.hardware, remats=remats, precisions=precisions,
                    memory_budget=budget, compile_top=args.compile_top,
                    model_args=model_args(args), progress=not args.no_progress)


def plan_main(args: argparse.Namespace) -> int:
    """Run ``meshpar plan`` with parsed arguments; returns the exit status."""
    result = run_plan(args)
    if not result.fitting:
        raise no_fit_error(result)
    if args.plot:
        # matplotlib, only for --plot
        from meshpar.inspect.plots import plot_plan

        plot_plan([c.as_dict() for c in result.candidates], args.plot,
                  budget=result.candidates[0].budget,
                  title=f"{args.preset}: {result.devices} x {result.hardware.name}")
    if args.json:
        print(result.to_json())
    else:
        print(format_plan_result(result, top=args.top))
        if args.plot:
            print(f"wrote {args.plot}")
    sys.stdout.flush()
    return 0


def apply_auto_layout(args: argparse.Namespace) -> None:
    """``meshpar train --layout auto``: plan over this run's devices and write the top pick's
    layout flags into ``args`` (printed first).

    Raises:
        PlanError: nothing fits (see :func:`meshpar.planner.search.no_fit_error`).
    """
    args.devices = args.devices or device_count()
    if args.devices != device_count():
        raise UsageError(f"--layout auto --devices {args.devices}: this run has "
                         f"{device_count()} devices; leave --devices out")
    best = run_plan(args).best
    lay = best.layout
    print(f"meshpar train --layout auto: {lay.label} (predicted {best.time.step * 1e3:.1f} ms/step,"
          f" {best.memory / 2**20:.1f} MiB/device, {best.source}); equivalent to: {best.command}",
          flush=True)
    args.mesh, args.strategy, args.zero = lay.mesh_text, "auto", lay.zero_stage
    args.microbatches, args.repeats = lay.microbatches, lay.repeats
    args.schedule = lay.schedule.value  # the string --schedule gives, not the enum
    args.pipeline_remat = None           # the planner costs each schedule's default
    args.remat, args.precision = lay.remat, lay.precision
