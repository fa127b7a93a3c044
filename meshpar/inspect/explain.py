"""What a layout costs: the compiled train step beside the figures its strategy promises.

:func:`explain` compiles a :class:`~meshpar.Trainer`'s step for one batch and reads three things
from the compiled program:

* **memory** per device from ``memory_analysis()``. ``peak_memory_in_bytes`` is unreliable on CPU,
  so the total is ``arguments + outputs + temporaries - aliased``;
* **FLOPs** per device: ``cost_analysis()["flops"]`` (XLA counts a ``while`` body once, whatever
  its trip count) and the matmul FLOPs of the HLO ``dot`` ops weighted by loop trip counts;
* **collectives** per step from :mod:`meshpar.inspect.hlo`, grouped by kind and mesh axes, split into
  forward, backward and update phases (from each op's ``op_name`` metadata).

The checks and their analytic figures are in :mod:`meshpar.inspect.checks` (formulas in
:mod:`meshpar.inspect.costs`). Reading the compiled program lives in
:mod:`meshpar.inspect.measure`, the text table in
:func:`meshpar.inspect.explain_text.format_explain` (both importable from here as before). What is
left here is the entry point, :func:`explain`, and the built-in GPT's builder, :func:`explain_gpt`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from meshpar.axes import PIPE
from meshpar.inspect.checks import STATE_CHECK, Check, CheckSource, Facts, add_checks, bytes_of
from meshpar.inspect.costs import gpt_train_flops
from meshpar.inspect.explain_text import format_explain
from meshpar.inspect.measure import dot_flops, measure
from meshpar.models import GPT, lm_loss
from meshpar.sharding.strategy import get_strategy
from meshpar.train import TrainConfig, Trainer
from meshpar.train.data import TokenBatches

__all__ = ["STATE_CHECK", "Check", "CheckSource", "dot_flops", "explain", "explain_gpt",
           "format_explain", "gpt_train_flops", "measure"]


def explain(
    trainer: Any, batch: Mapping[str, Any], /, *, d_model: int | None = None,
    layer_remat: str | None = None, model_flops: float | None = None,
    compiled: Any = None,
) -> dict[str, Any]:
    """Compile ``trainer``'s step for ``batch`` and compare what it costs with the textbook.

    Args:
        trainer: a :class:`meshpar.Trainer`.
        batch: a host batch (dict of arrays, global batch first); ``batch["inputs"]`` (or the
            first leaf) gives ``B`` and ``T``.
        d_model: width of the activations between layers; needed for the tensor-parallel and
            pipeline checks, which are left out without it.
        layer_remat: the remat policy of the layer scan (``"full"`` doubles the ZeRO-3 gathers
            and recomputes TP's forward all-reduces); ``None`` if unknown.
        model_flops: analytic training FLOPs of one step over all devices, if known.
        compiled: an already compiled step, to skip compiling again.

    Returns:
        A JSON-able dict: ``layout``, ``measured`` (see :func:`measure`), ``model`` (Ψ, G,
        the plans' bytes), ``checks`` (rows of name, formula, analytic, measured, ratio, source,
        unit), ``flops`` and ``notes``. :func:`format_explain` prints it.

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset, lm_loss
        >>> from meshpar.train import Trainer
        >>> from meshpar.train.data import TokenBatches
        >>> trainer = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
        ...                   optax.adamw(1e-3), lm_loss, mesh=make_mesh(fsdp=8), strategy="zero3")
        >>> batch = TokenBatches(batch_size=16, seq_len=32).batch(0)
        >>> report = explain(trainer, batch, d_model=64, layer_remat="full")
        >>> sorted(report)
        ['checks', 'flops', 'layout', 'measured', 'model', 'notes']
        >>> first = format_explain(report).splitlines()[0]   # print(format_explain(report))
        >>> print(first.split(", batch")[0])
        compiled train step: mesh fsdp=8 (8 devices), strategy zero3 (ZeRO-3)
    """
    compiled = compiled if compiled is not None else trainer.lower(batch).compile()
    leaves = jax.tree.leaves(batch)
    first = np.asarray(batch["inputs"] if "inputs" in batch else leaves[0])
    f = Facts(trainer, measure(compiled, mesh=trainer.mesh), int(first.shape[0]),
               int(first.shape[1]) if first.ndim > 1 else 1, d_model, layer_remat)
    layout = trainer.layout
    opt_bytes = bytes_of(layout.abs_opt_state, layout.opt_shardings)
    # Scalars (Adam's step count) would make K = 2.00001; the formula counts per-parameter state.
    opt_total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                    for x in jax.tree.leaves(layout.abs_opt_state) if x.shape)
    k_opt = opt_total / max(f.plan.bytes_total, 1)  # 2 for Adam: two fp32 moments
    batch_bytes = sum(np.asarray(x).nbytes for x in leaves) / math.prod(
        f.size[a] for a in trainer.batch_axes)

    add_checks(f, batch_bytes=batch_bytes, optimizer_k=k_opt, optimizer_bytes=opt_bytes)
    if not d_model and (f.n_tensor > 1 or f.pipeline is not None):
        f.notes.append("pass d_model= (the width of the activations between layers) for the "
                       "tensor-parallel and pipeline checks")
    m = f.measured
    flops = {"per_device_cost_analysis": m["flops"]["cost_analysis"],
             "per_device_dots": m["flops"]["dots_weighted"]}
    if model_flops:
        flops["per_device_analytic"] = model_flops / f.mesh.size
        f.check("matmul FLOPs per device", "analytic training FLOPs / devices",
                model_flops / f.mesh.size, m["flops"]["dots_weighted"], unit="flop")
    if m["flops"]["cost_analysis"] < 0.9 * m["flops"]["dots_weighted"]:
        f.notes.append("cost_analysis() counts each loop body once (not x its trip count), so "
                       "it is below the trip-weighted dot count")
    # The trainer's own path decisions (meshpar.train.Fallback): what this program is.
    f.notes += [f"path: {fallback}" for fallback in trainer.fallbacks]
    f.notes.append("CPU: peak_memory_in_bytes is unreliable; total = arguments + outputs + "
                   "temporaries - aliased")
    p = f.pipeline
    return {
        "layout": {
            "mesh": f.size, "devices": f.mesh.size, "strategy": f.strategy.name,
            "zero_stage": f.strategy.zero_stage, "effective_zero_stage": f.stage,
            "sequence_parallel": f.strategy.sequence_parallel,
            "microbatches": trainer.config.microbatches, "precision": trainer.config.precision,
            "batch": [f.b, f.t],
            "pipeline": None if p is None else {
                "schedule": p.schedule.value, "stages": p.stages, "repeats": p.repeats,
                "iterations": p.iterations, "ticks": p.ticks,
                "bubble_fraction": p.bubble_fraction,
                "activation_slots": p.activation_slots},
        },
        "model": {
            "params": int(sum(math.prod(e.shape) for e in f.plan.entries)),
            "grad_bytes_G": f.g, "optimizer_K": k_opt, "layers": int(f.layers),
            "plan_bytes_per_device": {"params": f.plan.bytes_per_device,
                                      "grads": trainer.grad_plan.bytes_per_device,
                                      "optimizer": opt_bytes},
        },
        "measured": {k: v for k, v in m.items() if k != "ops"},
        "flops": flops, "checks": [c.as_dict() for c in f.checks], "notes": f.notes,
    }


# -- the built-in GPT -------------------------------------------------------------------------




def explain_gpt(
    config: Any, /, *, mesh: jax.sharding.Mesh, strategy: Any = "auto", microbatches: int = 1,
    schedule: str = "gpipe", repeats: int = 1, batch_size: int = 16, seq_len: int | None = None,
    precision: str = "fp32", tx: Any = None, pipeline_remat: bool | None = None,
) -> dict[str, Any]:
    """:func:`explain` for the built-in GPT: build its trainer, compile one step, compare.

    Args:
        config: a :class:`~meshpar.models.GPTConfig`.
        mesh, strategy: the layout.
        microbatches, schedule, repeats, precision, pipeline_remat: :class:`~meshpar.TrainConfig`
            fields.
        batch_size, seq_len: the global batch (``seq_len`` defaults to the config's).
        tx: the optimizer (default ``optax.adamw(1e-3)``).

    Raises:
        StrategyError: the batch does not divide over the mesh and microbatches.

    Example:
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import get_preset
        >>> report = explain_gpt(get_preset("tiny"), mesh=make_mesh(fsdp=8), strategy="zero3")
        >>> for check in report["checks"]:             # and check["ratio"]: measured / analytic
        ...     print(check["name"])
        params + optimizer state
        params + grads + optimizer state
        gradient reduction over fsdp
        ring traffic over fsdp
        ZeRO-3 all-gathers in the layer loop
        ZeRO-3 all-gathers, all
        matmul FLOPs per device
    """
    seq_len = seq_len or config.seq_len
    strategy = get_strategy(strategy)
    # Check the batch before building anything.
    accumulate = microbatches if PIPE not in mesh.shape else 1  # else the pipeline's
    strategy.check_batch(mesh, batch_size, microbatches=accumulate)
    trainer = Trainer(
        lambda: GPT(config, rngs=nnx.Rngs(0)), tx if tx is not None else optax.adamw(1e-3),
        lm_loss, mesh=mesh, strategy=strategy,
        # lm_loss is a mean over equal-length rows, each computed on its own: row-separable.
        config=TrainConfig(microbatches=microbatches, precision=precision, schedule=schedule,
                           repeats=repeats, pipeline_remat=pipeline_remat, row_separable=True),
        # Only compiled, never run: an abstract state lowers to the same step without
        # compiling and running the model's initialiser.
        allocate=False,
    )
    batch = TokenBatches(batch_size=batch_size, seq_len=seq_len, seed=0).batch(0)
    report = explain(
        trainer, batch, d_model=config.d_model, layer_remat=config.remat,
        model_flops=gpt_train_flops(config, batch_size=batch_size, seq_len=seq_len,
                                    pipelined=trainer.pipeline is not None),
    )
    dead = 2.0 * config.layers * config.mlp_dim * config.d_model * batch_size * seq_len / mesh.size
    flops = report["flops"]
    expected = flops["per_device_analytic"] - dead
    if (config.remat == "full" and trainer.pipeline is None
            and abs(flops["per_device_dots"] - expected) < 0.01 * flops["per_device_dots"]):
        report["notes"].append(
            f"matmul FLOPs: the analytic figure less the recomputed MLP output projection "
            f"({dead / 1e6:.1f} MFLOP per device) matches the dot count: XLA drops that matmul "
            "from the remat recompute, its result being unused by the backward pass")
    if trainer.pipeline is not None:
        p = trainer.pipeline
        if p.schedule.one_f_one_b:
            report["notes"].append(
                f"pipelined ({p.schedule.value}): the dot count weights both lax.cond branches "
                f"of every iteration: the forward loop's {p.iterations} iterations and the "
                f"backward loop's {p.ticks} ticks (each with a forward and a recomputing "
                f"backward), of which a stage idles a fraction {p.bubble_fraction:.3f} at run "
                "time")
        else:
            report["notes"].append(
                f"pipelined: the dot count includes the {p.stages - 1} bubble iteration(s) of "
                "each stage that lax.cond skips at run time "
                f"(x{p.iterations / (p.repeats * p.microbatches):.2f} over the work done)")
    return report
