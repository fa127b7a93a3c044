"""The checks of :func:`meshpar.inspect.explain.explain`: the compiled step's figures beside
what its strategy promises.

Each measured figure is set beside the analytic figure of the strategy (formulas in
:mod:`meshpar.inspect.costs`), with the ratio. ``Ψ`` below is the
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

"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import jax
import numpy as np

from meshpar.axes import BATCH_AXES, FSDP, PIPE, TENSOR
from meshpar.inspect.costs import ring_all_gather, ring_all_reduce, zero_state_bytes
from meshpar.inspect.hlo import CollectiveKind
from meshpar.inspect.report import human_bytes

#: The name of the check that compares the step's model state (params + optimizer state).
STATE_CHECK = "params + optimizer state"

_AR, _AG = CollectiveKind.ALL_REDUCE, CollectiveKind.ALL_GATHER
_RS, _CP = CollectiveKind.REDUCE_SCATTER, CollectiveKind.COLLECTIVE_PERMUTE


class CheckSource(enum.StrEnum):
    """Where a check's measured figure comes from."""

    COMPILED = "compiled"  # the compiled program (memory_analysis, HLO collectives and dots)
    PLAN = "plan"          # meshpar's own sharding plans (bytes per device of each state)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Check:
    """One row of :func:`explain`: an analytic figure beside the measured one.

    ``unit`` is ``"bytes"``, ``"ops"`` (executions) or ``"flop"``; :meth:`as_dict` is the row as
    the JSON report holds it.
    """

    name: str
    formula: str
    analytic: float
    measured: float
    source: CheckSource = CheckSource.COMPILED
    unit: str = "bytes"

    @property
    def ratio(self) -> float | None:
        """measured / analytic (``None`` when the analytic figure is 0)."""
        return self.measured / self.analytic if self.analytic else None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "formula": self.formula, "analytic": self.analytic,
                "measured": self.measured, "ratio": self.ratio, "source": str(self.source),
                "unit": self.unit}
# -- the analytic side ------------------------------------------------------------------------


def _split(entry, mesh, axes) -> int:
    """How many ways ``entry`` is split over the mesh axes in ``axes``."""
    return math.prod(mesh.shape[a] for s in entry.spec if s
                     for a in ((s,) if isinstance(s, str) else s) if a in axes)


def bytes_of(abstract: Any, shardings: Any) -> int:
    """Per-device bytes of an abstract pytree under its shardings."""
    leaves = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
    return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a, s in leaves)


def _only_batch(axes) -> bool:
    return bool(axes) and set(axes) <= set(BATCH_AXES)


def _only_tensor(axes) -> bool:
    return tuple(axes) == (TENSOR,)


@dataclasses.dataclass
class Facts:
    """What the checks need to know about one trainer, batch and compiled program; the checks
    (:class:`Check`) and notes accumulate in it (see :func:`add_checks`)."""

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
              source: CheckSource = CheckSource.COMPILED, unit: str = "bytes") -> Check:
        row = Check(name=name, formula=formula, analytic=float(analytic), measured=float(measured),
                    source=source, unit=unit)
        self.checks.append(row)
        return row

    def volume(self, kinds, axes_ok, *, phase=None, in_loop=None, executions=False) -> float:
        """Bytes per step (or executions) of the collectives that match."""
        return sum((1 if executions else o["bytes"]) * o["trip_count"] for o in self.measured["ops"]
                   if o["kind"] in kinds and axes_ok(tuple(o["axes"]))
                   and (phase is None or o["phase"] in phase)
                   and (in_loop is None or o["in_loop"] == in_loop))


def _memory_checks(f: Facts, batch_bytes: float, k_opt: float, opt_bytes: int) -> None:
    st, n = f.stage, f.n_fsdp
    state = zero_state_bytes(f.g, fsdp=n, zero_stage=st, optimizer_k=k_opt)
    p_a, g_a, o_a = state["params"], state["grads"], state["optimizer"]
    params, grads = ("G/N" if st >= 3 else "G"), ("G/N" if st >= 2 else "G")
    opt = f"{k_opt:g}G{'/N' if st >= 1 else ''}"
    where = f"G = {human_bytes(f.g)}, " + (f"N = fsdp = {n}" if n > 1 else "no fsdp axis")
    # The step's arguments are the donated state plus this device's batch rows.
    row = f.check(STATE_CHECK, f"params {params} + {opt} optimizer state; {where}",
                  p_a + o_a, f.measured["memory"]["argument"] - batch_bytes)
    if st >= 1 and row.ratio and row.ratio > 1.001:
        whole = [e.path for e in f.trainer.optimizer_plan.entries
                 if _split(e, f.mesh, (FSDP,)) == 1]
        f.notes.append("state above the formula: not split over fsdp (no free dimension "
                       "divides it, or a small vector): " + ", ".join(whole))
    plan_total = f.plan.bytes_per_device + f.trainer.grad_plan.bytes_per_device + opt_bytes
    f.check("params + grads + optimizer state",
            f"ZeRO-{st}: {params} + {grads} + {opt} (the 16Ψ/N-style formula; plans)",
            p_a + g_a + o_a, plan_total, source=CheckSource.PLAN)


def _reduction_checks(f: Facts) -> None:
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
                  f.volume((_AR, _RS), _only_batch))
    excess = row.measured - analytic
    if row.ratio and row.ratio > 1.02:
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
    looped = f.volume((_AR, _RS), _only_batch, in_loop=True)
    if f.pipeline is not None and looped:
        f.notes.append(
            f"{human_bytes(looped)} of the gradient reduction runs inside the pipeline loop: "
            "the pipeline makes only its batch_axes manual (here "
            f"{f.pipeline.batch_axes or 'none'}), so weights used on activations split over "
            "another batch axis get their gradients reduced in every backward iteration "
            "instead of once after the loop")
    kinds = {o["kind"] for o in f.measured["ops"] if _only_batch(o["axes"])}
    if f.stage >= 2 and _RS not in kinds and _AR in kinds:
        f.notes.append(
            "GSPMD on CPU reduces the ZeRO-2/3 gradients with all-reduce + slice, not "
            "reduce-scatter: the same volume, but a ring all-reduce sends 2(N-1)/N x G per "
            "device instead of (N-1)/N x G. meshpar's explicit reduce-scatter (meshpar.zero) "
            "is off here: a pipeline is active, or a rule splits a parameter over fsdp together "
            "with another axis on one dimension")
    if len(f.batch_axes) == 1:
        n, axis = f.batch_ways, f.batch_axes[0]
        # DP: one all-reduce of G; ZeRO-1/2: a reduce-scatter of G and an all-gather of the
        # updated G; ZeRO-3: the parameters gathered forward and backward + a reduce-scatter.
        analytic, factor, how = {
            0: (ring_all_reduce(f.g, n), 2, "all-reduce"),
            1: (2 * ring_all_gather(f.g, n), 2, "reduce-scatter + all-gather"),
            2: (2 * ring_all_gather(f.g, n), 2, "reduce-scatter + all-gather"),
            3: (3 * ring_all_gather(f.g, n), 3, "gather fwd + gather bwd + reduce-scatter"),
        }[f.stage]
        measured = sum(c["traffic_bytes_per_step"] for c in f.measured["collectives"].values()
                       if c["axes"] == [axis])
        f.check(f"ring traffic over {axis}", f"{how}: {factor}(N-1)/N x G, N = {n}",
                analytic, measured)


def _zero_gather_checks(f: Facts) -> None:
    in_fsdp = lambda axes: FSDP in axes  # noqa: E731
    if f.stage in (1, 2):
        f.check("ZeRO-1/2 updated-parameter all-gather over fsdp",
                "G: each device gathers the others' updated shards once, after the update",
                sum(f.mp[e.path] for e in f.trainer.optimizer_plan.entries
                    if _split(e, f.mesh, (FSDP,)) > 1),
                f.volume((_AG,), in_fsdp, phase=("update",)))
    if f.stage < 3:
        return
    if f.pipeline is not None:
        # Inside the stages fsdp stays automatic: each work item gathers its chunk again.
        looped = f.volume((_AG,), in_fsdp, in_loop=True)
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
            times * lay, f.volume((_AG,), in_fsdp, in_loop=True))
    f.check("ZeRO-3 all-gathers, all", f"{times} x G_layers + G_rest (other weights once)",
            times * lay + rest, f.volume((_AG,), in_fsdp))


def _tensor_checks(f: Facts) -> None:
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
                2 * runs * unit, f.volume((_AG,), _only_tensor, **fwd))
        rs = f.check("SP reduce-scatters in the layer loop, forward (volume)",
                     f"2 per layer {per_layer}, the input of each reduce-scatter",
                     2 * runs * unit,
                     f.volume((_RS, _AR), _only_tensor, **fwd))
        if rs.measured and not any(o["kind"] == _RS for o in f.measured["ops"]):
            f.notes.append("sequence parallel: XLA emitted all-reduce + slice where Megatron-SP "
                           "reduce-scatters; same volume, twice the ring traffic")
        return
    f.check("TP all-reduces in the layer loop, forward", f"2 per layer {per_layer}",
            2 * runs * unit, f.volume((_AR,), _only_tensor, **fwd))
    # Gradient accumulation splits the batch: M times as many runs, each 1/M of the bytes.
    accumulate = f.trainer.config.microbatches if p is None else 1
    f.check("TP all-reduce executions in the layer loop, forward",
            f"2 per layer x {runs} layer runs"
            + (f" x {accumulate} microbatches" if accumulate > 1 else ""),
            2 * runs * accumulate,
            f.volume((_AR,), _only_tensor, executions=True, **fwd), unit="ops")
    recomputes = (f.layer_remat == "full") + (p is not None and p.remat)
    per = 2 + 2 * recomputes
    bw = f.check("TP all-reduces in the layer loop, backward",
                 f"{per} per layer {per_layer}: 2 input gradients"
                 + (f" + 2 per forward recompute ({recomputes})" if recomputes else ""),
                 per * runs * unit,
                 f.volume((_AR,), _only_tensor, phase=("backward",), in_loop=True))
    if p is None and per == 4 and abs(bw.measured / (runs * unit) - 3) < 0.05:
        f.notes.append(
            "TP backward: 3 x B·T·D per layer, not 4. The recomputed forward keeps only "
            "attention's all-reduce (the MLP output is dead in the backward pass, so XLA drops "
            "it), plus one input gradient for the MLP and one for the fused q/k/v projection "
            "(1 + 1 + 1)")


def _pipeline_checks(f: Facts) -> None:
    p = f.pipeline
    if not (f.d_model and p is not None):
        return
    micro = f.b / p.microbatches / f.batch_ways * f.t * f.d_model * f.act_bytes
    micro /= f.n_tensor if f.strategy.sequence_parallel else 1
    if p.schedule.one_f_one_b:
        f.check("pipeline collective-permutes in the loops",
                f"(3 x {p.iterations} forward iterations + 5 x {p.ticks} 1F1B ticks) x one "
                f"microbatch ({human_bytes(micro)}): forward loop, the activation forward and "
                "the stack's input and output on their channels back; 1F1B loop, the activation "
                "and the output gradient forward, the gradient, the stack's input and its input "
                "gradient back (meshpar.parallel.routes)",
                (3 * p.iterations + 5 * p.ticks) * micro,
                f.volume((_CP,), lambda a: tuple(a) == (PIPE,), in_loop=True))
        # The stack's boundary values enter and leave the loops in blocks over the stages,
        # resharded from and to the batch's rows (all-to-alls): no all-reduce of them.
        return
    f.check("pipeline collective-permutes",
            f"2 x {p.iterations} iterations x one microbatch ({human_bytes(micro)}): "
            "forward shift and its transpose", 2 * p.iterations * micro,
            f.volume((_CP,), lambda a: tuple(a) == (PIPE,)))
    # The outputs leave the loop through one psum over the stages; its transpose in the
    # backward pass sums the input gradient over the stages. Scalars ride along.
    f.check("pipeline output + input-gradient all-reduces over pipe",
            f"2 x {p.microbatches} microbatches x {human_bytes(micro)}",
            2 * p.microbatches * micro, f.volume((_AR,), lambda a: tuple(a) == (PIPE,)))


def add_checks(f: Facts, /, *, batch_bytes: float, optimizer_k: float, optimizer_bytes: int) -> None:
    """Append every check and note that applies to ``f``'s layout: memory, gradient
    reduction, ZeRO gathers, tensor parallel, pipeline.

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> from meshpar.inspect.measure import measure
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset, lm_loss
        >>> from meshpar.train import Trainer
        >>> from meshpar.train.data import TokenBatches
        >>> trainer = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
        ...                   optax.adamw(1e-3), lm_loss, mesh=make_mesh(fsdp=8), strategy="zero3")
        >>> compiled = trainer.lower(TokenBatches(batch_size=16, seq_len=32).batch(0)).compile()
        >>> layout = trainer.layout
        >>> opt_bytes = bytes_of(layout.abs_opt_state, layout.opt_shardings)
        >>> facts = Facts(trainer, measure(compiled, mesh=trainer.mesh), 16, 32, 64, "full")
        >>> add_checks(facts, batch_bytes=0, optimizer_k=2.0, optimizer_bytes=opt_bytes)
        >>> for check in facts.checks[:3]:              # check.ratio: measured / analytic
        ...     print(check.name)
        params + optimizer state
        params + grads + optimizer state
        gradient reduction over fsdp
    """
    _memory_checks(f, batch_bytes, optimizer_k, optimizer_bytes)
    _reduction_checks(f)
    _zero_gather_checks(f)
    _tensor_checks(f)
    _pipeline_checks(f)
