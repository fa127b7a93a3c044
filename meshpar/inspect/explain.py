"""What a layout costs: the compiled train step beside the figures its strategy promises.

:func:`explain` compiles a :class:`~meshpar.Trainer`'s step for one batch and reads three things
from the compiled program:

* **memory** per device from ``memory_analysis()``. ``peak_memory_in_bytes`` is unreliable on CPU,
  so the total is ``arguments + outputs + temporaries - aliased``;
* **FLOPs** per device: ``cost_analysis()["flops"]`` (XLA counts a ``while`` body once, whatever
  its trip count) and the matmul FLOPs of the HLO ``dot`` ops weighted by loop trip counts;
* **collectives** per step from :mod:`meshpar.inspect.hlo`, grouped by kind and mesh axes, split into
  forward, backward and update phases (from each op's ``op_name`` metadata).

Each is set beside the analytic figure of the strategy, with the ratio. ``Ψ`` below is the
parameter count; ``G`` the fp32 gradient bytes one device reduces (``4Ψ`` divided by the
model-parallel split: tensor and pipe axes), ``N`` the size of the ``fsdp`` axis:

================================  =========================================================
check                             analytic figure (per device, per step)
================================  =========================================================
ZeRO model state                  params ``G/N`` from stage 3, grads ``G/N`` from 2, Adam
                                  ``2G/N`` from 1 (else ``G``, ``G``, ``2G``): ``16Ψ`` for DP
gradient reduction                ``G`` bytes reduced over the batch axes (volume: the
                                  all-reduce result, or reduce-scatter result x group); ZeRO-2/3
                                  with ``data`` too: + ``G/N`` (shards all-reduced over ``data``)
ZeRO-1/2 parameter all-gather     ``G`` (updated shards gathered once after the update)
ZeRO-3 parameter all-gathers      ``2 x G_layers`` in the layer loop (forward, and again in the
                                  backward pass under remat), ``G_rest`` once outside
Megatron TP (forward)             2 all-reduces of ``B·T·D`` per layer (``B``: this device's
                                  rows), over ``tensor``
Megatron TP (backward)            2 per layer (input gradients of the two column-parallel
                                  matmuls), + 2 recomputed forward ones under full remat
sequence parallel (forward)       2 all-gathers + 2 reduce-scatters of ``B·T·D`` per layer
pipeline collective-permutes      ``2 x iterations x`` one microbatch's activation
                                  (forward, and the transposed shift in the backward pass)
================================  =========================================================

Where XLA does something else than the textbook (GSPMD's all-reduce instead of reduce-scatter on
CPU where meshpar's explicit ZeRO collectives are off, a tied embedding's gradient reduced twice),
the ratio shows it and a note explains it.

Reading the compiled program lives in :mod:`meshpar.inspect.measure`, the text table in
:func:`meshpar.inspect.explain_text.format_explain` (both importable from here as before). What is
left here is the analytic side and the built-in GPT's builder, :func:`explain_gpt`; sharing the
formulas with ``benchmarks/bench_strategies.py`` is left for later.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from meshpar.axes import BATCH_AXES, FSDP, PIPE, TENSOR
from meshpar.inspect.measure import dot_flops, measure
from meshpar.inspect.explain_text import format_explain
from meshpar.inspect.report import human_bytes
from meshpar.models import GPT, lm_loss
from meshpar.sharding.strategy import get_strategy
from meshpar.train import TrainConfig, Trainer
from meshpar.train.data import TokenBatches

#: The name of the check that compares the step's model state (params + optimizer state).
STATE_CHECK = "params + optimizer state"

__all__ = ["STATE_CHECK", "dot_flops", "explain", "explain_gpt", "format_explain",
           "gpt_train_flops", "measure"]
# -- the analytic side ------------------------------------------------------------------------


def _split(entry, mesh, axes) -> int:
    """How many ways ``entry`` is split over the mesh axes in ``axes``."""
    return math.prod(mesh.shape[a] for s in entry.spec if s
                     for a in ((s,) if isinstance(s, str) else s) if a in axes)


def _bytes_of(abstract: Any, shardings: Any) -> int:
    leaves = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
    return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a, s in leaves)


def _only_batch(axes) -> bool:
    return bool(axes) and set(axes) <= set(BATCH_AXES)


def _only_tensor(axes) -> bool:
    return tuple(axes) == (TENSOR,)


@dataclasses.dataclass
class _Facts:
    """What the checks need to know about one trainer, batch and compiled program."""

    trainer: Any
    measured: dict
    b: int  # global batch rows
    t: int  # sequence length
    d_model: int | None
    layer_remat: str | None
    checks: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        tr = self.trainer
        self.mesh, self.strategy, self.plan = tr.mesh, tr.strategy, tr.plan
        self.pipeline = tr.pipeline
        self.size = dict(self.mesh.shape)
        self.batch_axes = tuple(a for a in BATCH_AXES if self.size.get(a, 1) > 1)
        self.batch_ways = math.prod(self.size[a] for a in self.batch_axes)
        self.n_fsdp = self.size.get(FSDP, 1)
        self.n_tensor = self.size.get(TENSOR, 1)
        # The ZeRO stage that acts: without an fsdp axis every stage is plain DP.
        self.stage = self.strategy.zero_stage if self.n_fsdp > 1 else 0
        model_axes = tuple(a for a in self.size if a not in BATCH_AXES)
        # Per parameter: its bytes on one device before ZeRO (split only by tensor and pipe).
        entries = self.plan.entries
        self.mp = {e.path: e.bytes_total / _split(e, self.mesh, model_axes) for e in entries}
        self.layered = {e.path for e in self.plan.entries if e.logical and "layers" in e.logical}
        self.fsdp_sharded = {e.path for e in entries if _split(e, self.mesh, (FSDP,)) > 1}
        self.g = sum(self.mp.values())
        self.layers = tr.num_layers or max(
            (e.shape[0] for e in self.plan.entries if e.path in self.layered), default=0)
        self.act_bytes = 2 if tr.config.precision == "bf16" else 4

    def check(self, name: str, formula: str, analytic: float, measured: float, *,
              source: str = "compiled", unit: str = "bytes") -> dict:
        row = {"name": name, "formula": formula, "analytic": float(analytic),
               "measured": float(measured),
               "ratio": float(measured / analytic) if analytic else None,
               "source": source, "unit": unit}
        self.checks.append(row)
        return row

    def volume(self, kinds, axes_ok, *, phase=None, in_loop=None, executions=False) -> float:
        """Bytes per step (or executions) of the collectives that match."""
        return sum((1 if executions else o["bytes"]) * o["trip_count"] for o in self.measured["ops"]
                   if o["kind"] in kinds and axes_ok(tuple(o["axes"]))
                   and (phase is None or o["phase"] in phase)
                   and (in_loop is None or o["in_loop"] == in_loop))


def _memory_checks(f: _Facts, batch_bytes: float, k_opt: float, opt_bytes: int) -> None:
    st, n = f.stage, f.n_fsdp
    p_a = f.g / (n if st >= 3 else 1)
    g_a = f.g / (n if st >= 2 else 1)
    o_a = k_opt * f.g / (n if st >= 1 else 1)
    params, grads = ("G/N" if st >= 3 else "G"), ("G/N" if st >= 2 else "G")
    opt = f"{k_opt:g}G{'/N' if st >= 1 else ''}"
    where = f"G = {human_bytes(f.g)}, " + (f"N = fsdp = {n}" if n > 1 else "no fsdp axis")
    # The step's arguments are the donated state plus this device's batch rows.
    row = f.check(STATE_CHECK, f"params {params} + {opt} optimizer state; {where}",
                  p_a + o_a, f.measured["memory"]["argument"] - batch_bytes)
    if st >= 1 and row["ratio"] and row["ratio"] > 1.001:
        whole = [e.path for e in f.trainer.optimizer_plan.entries
                 if _split(e, f.mesh, (FSDP,)) == 1]
        f.notes.append("state above the formula: not split over fsdp (no free dimension "
                       "divides it, or a small vector): " + ", ".join(whole))
    plan_total = f.plan.bytes_per_device + f.trainer.grad_plan.bytes_per_device + opt_bytes
    f.check("params + grads + optimizer state",
            f"ZeRO-{st}: {params} + {grads} + {opt} (the 16Ψ/N-style formula; plans)",
            p_a + g_a + o_a, plan_total, source="plan")


def _reduction_checks(f: _Facts) -> None:
    if f.batch_ways == 1:
        return
    # ZeRO-2/3 with another batch axis (HSDP): G reduce-scattered over fsdp, then every
    # device's G/N shard all-reduced over the rest of the batch axes.
    hsdp = f.stage >= 2 and f.batch_ways > f.n_fsdp and f.trainer.explicit_zero
    analytic = f.g + (f.g / f.n_fsdp if hsdp else 0)
    what = f"G = 4Ψ / model-parallel split = {human_bytes(f.g)}, reduced once per step"
    if hsdp:
        what += f", + G/N = {human_bytes(f.g / f.n_fsdp)}: the fsdp shards summed over the rest"
    row = f.check("gradient reduction over " + "+".join(f.batch_axes), what, analytic,
                  f.volume(("all-reduce", "reduce-scatter"), _only_batch))
    excess = row["measured"] - analytic
    if row["ratio"] and row["ratio"] > 1.02:
        # A layer weight is used once per layer; a weight outside the stack used twice (a tied
        # embedding) is the usual suspect, so name it when exactly one size matches.
        twice = [p for p, v in f.mp.items()
                 if p not in f.layered and abs(v - excess) <= 64 + 0.01 * excess]
        f.notes.append(
            f"gradient reduction is {human_bytes(excess)} above G: "
            + (f"the size of {twice[0]}'s gradient. A parameter used twice (a tied embedding: "
               "the lookup and the unembedding) gets its two gradient contributions "
               "all-reduced separately before XLA adds them; local accumulation (microbatches "
               "> 1 under DP/ZeRO-1) sums them first"
               if len(twice) == 1 else
               "some gradients are reduced in a larger layout than their parameter's (a weight "
               "gathered where it is used has its gradient reduced whole before it is sliced) "
               "or in several parts")
            + "; the last few bytes are the loss and grad-norm scalars")
    looped = f.volume(("all-reduce", "reduce-scatter"), _only_batch, in_loop=True)
    if f.pipeline is not None and looped:
        f.notes.append(
            f"{human_bytes(looped)} of the gradient reduction runs inside the pipeline loop: "
            "the pipeline makes only its batch_axes manual (here "
            f"{f.pipeline.batch_axes or 'none'}), so weights used on activations split over "
            "another batch axis get their gradients reduced in every backward iteration "
            "instead of once after the loop")
    kinds = {o["kind"] for o in f.measured["ops"] if _only_batch(o["axes"])}
    if f.stage >= 2 and "reduce-scatter" not in kinds and "all-reduce" in kinds:
        f.notes.append(
            "GSPMD on CPU reduces the ZeRO-2/3 gradients with all-reduce + slice, not "
            "reduce-scatter: the same volume, but a ring all-reduce sends 2(N-1)/N x G per "
            "device instead of (N-1)/N x G. meshpar's explicit reduce-scatter (meshpar.zero) "
            "is off here: a pipeline is active, or a rule splits a parameter over fsdp together "
            "with another axis on one dimension")
    if len(f.batch_axes) == 1:
        n, axis = f.batch_ways, f.batch_axes[0]
        factor, how = {0: (2, "all-reduce"), 1: (2, "reduce-scatter + all-gather"),
                       2: (2, "reduce-scatter + all-gather"),
                       3: (3, "gather fwd + gather bwd + reduce-scatter")}[f.stage]
        measured = sum(c["traffic_bytes_per_step"] for k, c in f.measured["collectives"].items()
                       if k.split("@")[1] == axis)
        f.check(f"ring traffic over {axis}", f"{how}: {factor}(N-1)/N x G, N = {n}",
                factor * (n - 1) / n * f.g, measured)


def _zero_gather_checks(f: _Facts) -> None:
    in_fsdp = lambda axes: FSDP in axes  # noqa: E731
    if f.stage in (1, 2):
        f.check("ZeRO-1/2 updated-parameter all-gather over fsdp",
                "G: each device gathers the others' updated shards once, after the update",
                sum(f.mp[e.path] for e in f.trainer.optimizer_plan.entries
                    if _split(e, f.mesh, (FSDP,)) > 1),
                f.volume(("all-gather",), in_fsdp, phase=("update",)))
    if f.stage < 3:
        return
    if f.pipeline is not None:
        # Inside the stages fsdp stays automatic: each work item gathers its chunk again.
        looped = f.volume(("all-gather",), in_fsdp, in_loop=True)
        f.notes.append(
            f"ZeRO-3 inside pipeline stages: the stage weights are gathered for every microbatch "
            f"(forward and each recompute), {human_bytes(looped)} of all-gathers in the loop "
            "(bubble iterations included) against 2 x G_layers without a pipeline; ZeRO-1 "
            "(or plain data parallelism) suits a pipeline better")
        return
    lay = sum(v for p, v in f.mp.items() if p in f.layered and p in f.fsdp_sharded)
    rest = sum(v for p, v in f.mp.items() if p not in f.layered and p in f.fsdp_sharded)
    times = 2 if f.layer_remat == "full" else 1
    why = ("forward, and again in the backward pass under remat" if times == 2
           else "forward only: the gathered layers are kept for the backward pass")
    f.check("ZeRO-3 all-gathers in the layer loop", f"{times} x G_layers ({why})",
            times * lay, f.volume(("all-gather",), in_fsdp, in_loop=True))
    f.check("ZeRO-3 all-gathers, all", f"{times} x G_layers + G_rest (other weights once)",
            times * lay + rest, f.volume(("all-gather",), in_fsdp))


def _tensor_checks(f: _Facts) -> None:
    if not (f.d_model and f.n_tensor > 1 and f.layers):
        return
    p = f.pipeline
    if p is not None and p.schedule.one_f_one_b:
        f.notes.append(
            f"TP collectives of the {p.schedule.value} schedule are not predicted here: its "
            "backward loop recomputes each chunk inside jax.vjp (see meshpar.parallel.onef1b)")
        return
    if p is None:
        runs, unit = f.layers, f.b / f.batch_ways * f.t * f.d_model * f.act_bytes
        per_layer = f"x {f.layers} layers x B_dev·T·D ({human_bytes(unit)})"
    else:  # each iteration runs one chunk of layers on one microbatch (bubbles counted)
        chunk = p.layers_per_chunk(f.layers)
        runs = chunk * p.iterations
        unit = f.b / p.microbatches / f.batch_ways * f.t * f.d_model * f.act_bytes
        per_layer = (f"x {chunk} layers per chunk x {p.iterations} iterations x one "
                     f"microbatch's B·T·D ({human_bytes(unit)})")
    fwd = {"phase": ("forward",), "in_loop": True}
    if f.strategy.sequence_parallel:
        f.check("SP all-gathers in the layer loop, forward", f"2 per layer {per_layer}",
                2 * runs * unit, f.volume(("all-gather",), _only_tensor, **fwd))
        rs = f.check("SP reduce-scatters in the layer loop, forward (volume)",
                     f"2 per layer {per_layer}, the input of each reduce-scatter",
                     2 * runs * unit,
                     f.volume(("reduce-scatter", "all-reduce"), _only_tensor, **fwd))
        if rs["measured"] and not any(o["kind"] == "reduce-scatter" for o in f.measured["ops"]):
            f.notes.append("sequence parallel: XLA emitted all-reduce + slice where Megatron-SP "
                           "reduce-scatters; same volume, twice the ring traffic")
        return
    f.check("TP all-reduces in the layer loop, forward", f"2 per layer {per_layer}",
            2 * runs * unit, f.volume(("all-reduce",), _only_tensor, **fwd))
    # Gradient accumulation splits the batch: M times as many runs, each 1/M of the bytes.
    accumulate = f.trainer.config.microbatches if p is None else 1
    f.check("TP all-reduce executions in the layer loop, forward",
            f"2 per layer x {runs} layer runs"
            + (f" x {accumulate} microbatches" if accumulate > 1 else ""),
            2 * runs * accumulate,
            f.volume(("all-reduce",), _only_tensor, executions=True, **fwd), unit="ops")
    recomputes = (f.layer_remat == "full") + (p is not None and p.remat)
    per = 2 + 2 * recomputes
    bw = f.check("TP all-reduces in the layer loop, backward",
                 f"{per} per layer {per_layer}: 2 input gradients"
                 + (f" + 2 per forward recompute ({recomputes})" if recomputes else ""),
                 per * runs * unit,
                 f.volume(("all-reduce",), _only_tensor, phase=("backward",), in_loop=True))
    if p is None and per == 4 and abs(bw["measured"] / (runs * unit) - 3) < 0.05:
        f.notes.append(
            "TP backward: 3 x B·T·D per layer, not 4. The recomputed forward keeps only "
            "attention's all-reduce (the MLP output is dead in the backward pass, so XLA drops "
            "it), plus one input gradient for the MLP and one for the fused q/k/v projection "
            "(1 + 1 + 1)")


def _pipeline_checks(f: _Facts) -> None:
    p = f.pipeline
    if not (f.d_model and p is not None):
        return
    micro = f.b / p.microbatches / f.batch_ways * f.t * f.d_model * f.act_bytes
    micro /= f.n_tensor if f.strategy.sequence_parallel else 1
    if p.schedule.one_f_one_b:
        f.check("pipeline collective-permutes",
                f"({p.iterations} forward iterations + 2 x {p.ticks} 1F1B ticks) x one "
                f"microbatch ({human_bytes(micro)}): the forward shift, then activations forward "
                "and gradients back at every tick", (p.iterations + 2 * p.ticks) * micro,
                f.volume(("collective-permute",), lambda a: tuple(a) == (PIPE,)))
    else:
        f.check("pipeline collective-permutes",
                f"2 x {p.iterations} iterations x one microbatch ({human_bytes(micro)}): "
                "forward shift and its transpose", 2 * p.iterations * micro,
                f.volume(("collective-permute",), lambda a: tuple(a) == (PIPE,)))
    # The outputs leave the loop through one psum over the stages; its transpose in the
    # backward pass sums the input gradient over the stages. Scalars ride along.
    f.check("pipeline output + input-gradient all-reduces over pipe",
            f"2 x {p.microbatches} microbatches x {human_bytes(micro)}",
            2 * p.microbatches * micro, f.volume(("all-reduce",), lambda a: tuple(a) == (PIPE,)))


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
        >>> report = explain(trainer, batch, d_model=64, layer_remat="full")
        >>> print(format_explain(report))
    """
    compiled = compiled if compiled is not None else trainer.lower(batch).compile()
    leaves = jax.tree.leaves(batch)
    first = np.asarray(batch["inputs"] if "inputs" in batch else leaves[0])
    f = _Facts(trainer, measure(compiled, mesh=trainer.mesh), int(first.shape[0]),
               int(first.shape[1]) if first.ndim > 1 else 1, d_model, layer_remat)
    layout = trainer.layout
    opt_bytes = _bytes_of(layout.abs_opt_state, layout.opt_shardings)
    # Scalars (Adam's step count) would make K = 2.00001; the formula counts per-parameter state.
    opt_total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                    for x in jax.tree.leaves(layout.abs_opt_state) if x.shape)
    k_opt = opt_total / max(f.plan.bytes_total, 1)  # 2 for Adam: two fp32 moments
    batch_bytes = sum(np.asarray(x).nbytes for x in leaves) / math.prod(
        f.size[a] for a in trainer.batch_axes)

    _memory_checks(f, batch_bytes, k_opt, opt_bytes)
    _reduction_checks(f)
    _zero_gather_checks(f)
    _tensor_checks(f)
    _pipeline_checks(f)
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
        "flops": flops, "checks": f.checks, "notes": f.notes,
    }


# -- the built-in GPT -------------------------------------------------------------------------


def gpt_train_flops(config: Any, /, *, batch_size: int, seq_len: int,
                    pipelined: bool = False) -> float:
    """Analytic FLOPs of one training step of :class:`meshpar.models.GPT`, over all devices.

    Forward: ``2 x matmul params x tokens`` plus attention ``4·B·T²·H·K`` per layer (scores and
    values, the full causal square); backward twice the forward. Each ``"full"`` remat recomputes
    the layers' forward once more (the layer scan's, and the pipeline's stage remat when
    pipelined). Other remat policies save matmul results and are counted as no recompute.

    Example:
        >>> gpt_train_flops(get_preset("tiny"), batch_size=16, seq_len=32)
        486539264.0
    """
    tokens = batch_size * seq_len
    h, k, d, m = config.heads, config.head_size, config.d_model, config.mlp_dim
    attention = config.layers * 4.0 * batch_size * seq_len**2 * h * k
    forward = 2.0 * config.matmul_param_count() * tokens + attention
    layer_forward = 2.0 * config.layers * (4 * d * h * k + 2 * d * m) * tokens + attention
    recomputes = (config.remat == "full") + bool(pipelined)
    return 3 * forward + recomputes * layer_forward


def explain_gpt(
    config: Any, /, *, mesh: jax.sharding.Mesh, strategy: Any = "auto", microbatches: int = 1,
    schedule: str = "gpipe", repeats: int = 1, batch_size: int = 16, seq_len: int | None = None,
    precision: str = "fp32", tx: Any = None,
) -> dict[str, Any]:
    """:func:`explain` for the built-in GPT: build its trainer, compile one step, compare.

    Args:
        config: a :class:`~meshpar.models.GPTConfig`.
        mesh, strategy: the layout.
        microbatches, schedule, repeats, precision: :class:`~meshpar.TrainConfig` fields.
        batch_size, seq_len: the global batch (``seq_len`` defaults to the config's).
        tx: the optimizer (default ``optax.adamw(1e-3)``).

    Raises:
        StrategyError: the batch does not divide over the mesh and microbatches.

    Example:
        >>> report = explain_gpt(get_preset("tiny"), mesh=make_mesh(fsdp=8), strategy="zero3")
        >>> [c["ratio"] for c in report["checks"]]                         # doctest: +SKIP
    """
    seq_len = seq_len or config.seq_len
    strategy = get_strategy(strategy)
    # Check the batch before building anything: Trainer init compiles the model's initialiser.
    accumulate = microbatches if PIPE not in mesh.shape else 1  # else the pipeline's
    strategy.check_batch(mesh, batch_size, microbatches=accumulate)
    trainer = Trainer(
        lambda: GPT(config, rngs=nnx.Rngs(0)), tx if tx is not None else optax.adamw(1e-3),
        lm_loss, mesh=mesh, strategy=strategy,
        # lm_loss is a mean over equal-length rows, each computed on its own: row-separable.
        config=TrainConfig(microbatches=microbatches, precision=precision, schedule=schedule,
                           repeats=repeats, row_separable=True),
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
