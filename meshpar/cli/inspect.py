"""``meshpar inspect``: how a layout places the built-in GPT, and what it costs.

Without options it prints the parameter table (:func:`meshpar.inspect.report.format_plan`). With
``--compiled`` it also compiles one train step for the layout and prints
:func:`meshpar.inspect.explain.format_explain` (memory, FLOPs, collectives beside the strategy's analytic
figures); ``--plots DIR`` writes PNGs (:mod:`meshpar.inspect.plots`): ``sharding.png``, ``memory.png``
and, for a mesh with a ``pipe`` axis, ``schedule.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import optax
from flax import nnx

from meshpar.backend.distributed import local_slice
from meshpar.cli.args import diloco_config, mesh_and_strategy, model_config
from meshpar.errors import MeshparError
from meshpar.inspect.diloco import explain_diloco, format_diloco
from meshpar.inspect.explain import STATE_CHECK, explain_gpt
from meshpar.inspect.explain_text import format_explain
from meshpar.inspect.report import format_plan, plan_to_dict
from meshpar.mesh import format_mesh, make_mesh
from meshpar.models import GPT, lm_loss
from meshpar.parallel.schedule import PipelineConfig, activation_bound, onef1b_table
from meshpar.train import TrainConfig
from meshpar.train.data import TokenBatches
from meshpar.train.diloco import DiLoCoTrainer
from meshpar.train.plan import plan_training


def inspect_main(args: argparse.Namespace) -> int:
    """Run ``meshpar inspect`` with parsed arguments; returns the exit status."""
    cfg = model_config(args)
    mesh, strategy = mesh_and_strategy(args)
    make_model = lambda: GPT(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    layout = plan_training(
        make_model, mesh=mesh, strategy=strategy,
        microbatches=args.microbatches, schedule=args.schedule, repeats=args.repeats,
        pipeline_remat=args.pipeline_remat,
    )
    plan = layout.params
    pipeline = _pipeline_summary(layout)
    compiled = None
    diloco = diloco_config(args, mesh)
    if diloco is not None and getattr(args, "compiled", False):
        # The DiLoCo report replaces the strategy checks: it compares what the inner and outer
        # steps send over diloco with DiLoCo's promises (meshpar.inspect.diloco).
        trainer = DiLoCoTrainer(make_model, optax.adamw(1e-3), lm_loss, mesh=mesh,
                                strategy=strategy, diloco=diloco,
                                config=TrainConfig(microbatches=args.microbatches, row_separable=True))
        batch = TokenBatches(batch_size=args.batch_size, seq_len=cfg.seq_len, seed=0).batch(0)
        compiled = explain_diloco(trainer, _local_rows(batch, trainer))
    elif getattr(args, "compiled", False):
        compiled = explain_gpt(
            cfg, mesh=mesh, strategy=strategy, microbatches=args.microbatches,
            schedule=args.schedule, repeats=args.repeats, batch_size=args.batch_size,
            pipeline_remat=args.pipeline_remat,
        )
    plots = []
    if getattr(args, "plots", None) and diloco is not None:
        raise MeshparError("--plots does not draw a diloco mesh yet; leave --plots out")
    if getattr(args, "plots", None):
        plots = write_plots(args.plots, make_model=make_model, layout=layout, mesh=mesh,
                            strategy=strategy, config=cfg, args=args, compiled=compiled)
    if args.json:
        data = plan_to_dict(plan)
        data["pipeline"] = pipeline
        data["model"] = dataclasses.asdict(cfg)
        data["strategy"] = {"name": strategy.name, "zero_stage": strategy.zero_stage,
                            "sequence_parallel": strategy.sequence_parallel}
        if compiled is not None:
            data["compiled"] = compiled
        if plots:
            data["plots"] = plots
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
                f"microbatches, {pipeline['iterations']} iterations"
                + (f" + {pipeline['ticks']} 1F1B ticks, bubble fraction (idle stage-ticks) = "
                   if pipeline["ticks"] else ", bubble fraction (P-1)/(v*M+P-1) = ")
                + f"{pipeline['bubble_fraction']:.3f}"
            )
            print(
                f"pipeline activations kept per device: {pipeline['activation_slots']} "
                f"microbatch activations ({pipeline['activation_bound']}); gpipe at these "
                f"microbatches: {pipeline['gpipe_activation_slots']}"
            )
        if compiled is not None:
            print()
            print(format_diloco(compiled) if diloco is not None else format_explain(compiled))
        for path in plots:
            print(f"wrote {path}")
    return 0


def _local_rows(batch, trainer):
    # This process's rows (all of them in a single process), as trainer.step takes them.
    if jax.process_count() == 1:
        return batch
    return local_slice(batch, {k: trainer.batch_sharding(v.ndim) for k, v in batch.items()})


def _pipeline_summary(layout) -> dict | None:
    p = layout.pipeline
    if p is None:
        return None
    chunk = p.layers_per_chunk(layout.num_layers)
    return {
        "schedule": p.schedule.value, "stages": p.stages, "repeats": p.repeats,
        "microbatches": p.microbatches, "layers": layout.num_layers,
        "layers_per_stage": chunk * p.repeats, "layers_per_chunk": chunk,
        "iterations": p.iterations, "ticks": p.ticks, "bubble_fraction": p.bubble_fraction,
        "activation_slots": p.activation_slots, "activation_bound": activation_bound(p),
        "gpipe_activation_slots": PipelineConfig(p.stages, p.microbatches).activation_slots,
        # Whether the stages recompute their forward in the backward pass; 1F1B without it
        # keeps this many chunk forwards' residuals.
        "remat": p.remat,
        "residual_slots": onef1b_table(p).res_slots if p.schedule.one_f_one_b else 0,
    }


def comparison_layouts(config, /, *, devices: int) -> dict:
    """``{label: (mesh, strategy)}``: DP, ZeRO-1/2/3 and TP of one model on ``devices`` devices.

    TP takes the largest tensor size that divides the heads, the MLP width and the vocabulary
    (the rest of the devices go to ``data``); it is left out if that size is 1.

    Example:
        >>> from meshpar.models import get_preset
        >>> list(comparison_layouts(get_preset("tiny"), devices=8))
        ['DP', 'ZeRO-1', 'ZeRO-2', 'ZeRO-3', 'TP']
    """
    out = {"DP": (make_mesh(data=devices), "dp")}
    for stage in (1, 2, 3):
        out[f"ZeRO-{stage}"] = (make_mesh(fsdp=devices), f"zero{stage}")
    tensor = max(t for t in range(1, devices + 1) if devices % t == 0 and config.heads % t == 0
                 and config.mlp_dim % t == 0 and config.vocab_size % t == 0)
    if tensor > 1:
        mesh = make_mesh(data=devices // tensor, tensor=tensor) if tensor < devices else \
            make_mesh(tensor=tensor)
        out["TP"] = (mesh, "tp")
    return out


def write_plots(directory, *, make_model, layout, mesh, strategy, config, args,
                compiled=None) -> list[str]:
    """Write ``sharding.png``, ``memory.png`` and (pipelined) ``schedule.png``; returns paths.

    ``memory.png`` compares DP, ZeRO-1/2/3 and TP of the same model on as many devices
    (:func:`comparison_layouts`) with this layout, marking the compiled figure when ``compiled``
    (an :func:`meshpar.inspect.explain.explain_gpt` report) is given.

    Example::

        # As `meshpar inspect --plots out` does, with its parsed `args` (preset, microbatches,
        # schedule, repeats, pipeline_remat):
        cfg = get_preset(args.preset)
        mesh, strategy = mesh_and_strategy(args)
        make_model = lambda: GPT(cfg, rngs=nnx.Rngs(0))
        layout = plan_training(make_model, mesh=mesh, strategy=strategy,
                               microbatches=args.microbatches, schedule=args.schedule,
                               repeats=args.repeats, pipeline_remat=args.pipeline_remat)
        write_plots("out", make_model=make_model, layout=layout, mesh=mesh,
                    strategy=strategy, config=cfg, args=args)
        # ['out/sharding.png', 'out/memory.png'] (and 'out/schedule.png' with a pipeline)
    """
    # Lazy: matplotlib is imported only by a run that writes plots.
    from meshpar.inspect.plots import (plot_param_sharding, plot_pipeline_schedule,
                                       plot_strategy_memory, strategy_memory)

    os.makedirs(directory, exist_ok=True)
    written = []
    path = os.path.join(directory, "sharding.png")
    plot_param_sharding(layout.params, path, title=(
        f"GPT {args.preset}, strategy {strategy.name}, mesh {format_mesh(mesh)}: devices holding "
        "each block of each parameter"))
    written.append(path)

    layouts = comparison_layouts(config, devices=mesh.size)
    rows = []
    for label, (m, s) in layouts.items():
        try:
            rows += strategy_memory(make_model, {label: (m, s)})
        except MeshparError as err:  # e.g. a size this model does not divide: say so, go on
            print(f"meshpar inspect: memory plot leaves out {label}: {err}", file=sys.stderr)
    mine = strategy_memory(make_model, {"this layout": (mesh, strategy)},
                           microbatches=args.microbatches, schedule=args.schedule,
                           repeats=args.repeats, pipeline_remat=args.pipeline_remat)[0]
    mine["label"] = f"this layout\n({strategy.name})"
    if compiled is not None:
        mine["compiled"] = next(c["measured"] for c in compiled["checks"]
                                if c["name"] == STATE_CHECK)
    rows.append(mine)
    path = os.path.join(directory, "memory.png")
    plot_strategy_memory(rows, path, title=(
        f"GPT {args.preset} ({config.param_count():,} params), Adam fp32: model state per "
        f"device on {mesh.size} devices"))
    written.append(path)

    if layout.pipeline is not None:
        path = os.path.join(directory, "schedule.png")
        plot_pipeline_schedule(layout.pipeline, path, title=(
            f"pipeline schedule, mesh {format_mesh(mesh)}, {layout.num_layers} layers"))
        written.append(path)
    return written
