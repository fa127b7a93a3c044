"""``meshpar inspect``: how a layout places the built-in GPT, and what it costs."""

from __future__ import annotations

import argparse
import dataclasses
import json


def inspect_main(args: argparse.Namespace) -> int:
    """Run ``meshpar inspect`` with parsed arguments; returns the exit status."""
    from flax import nnx

    from meshpar.cli import _layout, _model_config
    from meshpar.models import GPT
    from meshpar.report import format_plan, plan_to_dict
    from meshpar.plan import plan_training

    cfg = _model_config(args)
    mesh, strategy = _layout(args)
    layout = plan_training(
        lambda: GPT(cfg, rngs=nnx.Rngs(0)), mesh=mesh, strategy=strategy,
        microbatches=args.microbatches, schedule=args.schedule, repeats=args.repeats,
    )
    plan = layout.params
    pipeline = _pipeline_summary(layout)
    if args.json:
        data = plan_to_dict(plan)
        data["pipeline"] = pipeline
        data["model"] = dataclasses.asdict(cfg)
        data["strategy"] = {"name": strategy.name, "zero_stage": strategy.zero_stage,
                            "sequence_parallel": strategy.sequence_parallel}
        print(json.dumps(data, indent=1))
    else:
        title = (f"GPT preset {args.preset} ({cfg.param_count():,} parameters), strategy "
                 f"{strategy.name} (ZeRO-{strategy.zero_stage}"
                 f"{', sequence parallel' if strategy.sequence_parallel else ''})")
        print(format_plan(plan, title=title))
        if pipeline:
            print(
                f"pipeline: {pipeline['schedule']}, {pipeline['stages']} stages x "
                f"{pipeline['repeats']} repeat(s), {pipeline['layers_per_stage']} layer(s) per "
                f"stage ({pipeline['layers_per_chunk']} per chunk), {pipeline['microbatches']} "
                f"microbatches, {pipeline['iterations']} iterations, bubble fraction "
                f"(P-1)/(v*M+P-1) = {pipeline['bubble_fraction']:.3f}"
            )
    return 0


def _pipeline_summary(layout) -> dict | None:
    p = layout.pipeline
    if p is None:
        return None
    chunk = p.layers_per_chunk(layout.num_layers)
    return {
        "schedule": p.schedule, "stages": p.stages, "repeats": p.repeats,
        "microbatches": p.microbatches, "layers": layout.num_layers,
        "layers_per_stage": chunk * p.repeats, "layers_per_chunk": chunk,
        "iterations": p.iterations, "bubble_fraction": p.bubble_fraction,
    }


