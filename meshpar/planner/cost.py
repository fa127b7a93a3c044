"""The step-time model: compute + exposed communication + pipeline bubble.

For one layout on one :class:`~meshpar.planner.hardware.HardwareProfile`:

* **compute** = FLOPs per device (remat recompute included, pipeline bubble iterations not) over
  the peak FLOP/s of the compute dtype. On a profile that measured its memory-bound rates
  (:attr:`~meshpar.planner.hardware.HardwareProfile.matmul_bandwidth`: the calibrated ``cpu``
  profile), plus, from the compiled program, the matmuls' operand and result bytes over that
  bandwidth (a small or narrow per-device matmul runs far below the peak) and the bytes moved
  outside matmuls and collectives (:func:`meshpar.inspect.hlo.memory_traffic`: layer norms,
  softmax, the optimizer update, gradient accumulation, copies) over the memory bandwidth
  (:meth:`~meshpar.planner.hardware.HardwareProfile.compute_seconds`). Emulated CPU devices
  share the host's cores, so these per-device rates were measured with every device busy: the
  step is the total work over the cores either way. Before compiling, there are no such bytes:
  the analytic estimate is FLOPs over the peak.
* **communication**, per collective (kind, mesh axes): ``traffic / bandwidth + executions x
  latency``, with the per-device ring traffic and the executions read from the compiled program
  (:func:`meshpar.inspect.measure.measure`, trip counts included) or from the analytic formulas
  of :mod:`meshpar.inspect.costs`. The link is the intra-node one when the group's devices lie in
  one node: the mesh is laid out ``pipe, data, fsdp, tensor`` outermost first, so a group over
  axis ``a`` spans ``size(a) x`` (the sizes of the axes inside it) consecutive devices.
* **overlap model** (what can run under compute, per collective kind): the ZeRO parameter
  all-gathers over ``fsdp`` (prefetched a layer ahead) and the gradient reductions (all-reduce or
  reduce-scatter) over the batch axes ``data``/``fsdp`` (issued as the backward pass produces each
  layer's gradient) are *hideable*; Megatron's activation all-reduces over ``tensor``, the
  pipeline's collective-permutes over ``pipe`` and all-to-alls are on the critical path and always
  *exposed*. ``exposed = critical + max(0, hideable - overlap x compute)``, where ``overlap`` is
  the profile's fraction (1 on GPUs/TPUs with asynchronous collectives, 0 on emulated CPU devices,
  which run collectives on the cores that compute).
* **bubble** = ``compute x f / (1 - f)`` with ``f`` the schedule's
  :attr:`~meshpar.parallel.schedule.PipelineConfig.bubble_fraction`: under GPipe and circular
  every stage idles ``P - 1`` of its ``v M + P - 1`` iterations; under 1F1B and interleaved 1F1B
  ``f`` is the idle share of the backward loop's ticks (:func:`~meshpar.parallel.schedule.
  onef1b_table`), applied to the whole step (the forward-only loop before it idles ``P - 1`` of
  ``v M + P - 1`` iterations, a smaller share at ``M >= P``). On a profile with ``shared_cores``
  (emulated CPU devices) the bubble is 0: an idle stage's cores run the busy stages' work.

The model is documented, not fitted: ``benchmarks/bench_plan.py`` measures how well it ranks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

from meshpar.axes import DATA, FSDP, PIPE, TENSOR
from meshpar.inspect import costs
from meshpar.parallel.schedule import PipelineConfig, Schedule
from meshpar.planner.hardware import HardwareProfile
from meshpar.planner.layout import AXES

#: Axes whose all-gathers (ZeRO parameters) and reductions (gradients) can hide under compute.
HIDEABLE_AXES = (DATA, FSDP)
HIDEABLE_KINDS = ("all-gather", "all-reduce", "reduce-scatter")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One kind of collective over some mesh axes, summed over a step.

    Attributes:
        kind: ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``collective-permute``,
            ``all-to-all``.
        axes: the mesh axes of its groups.
        traffic: bytes each device sends per step.
        executions: how many times it runs per step.
    """

    kind: str
    axes: tuple[str, ...]
    traffic: float
    executions: int = 1

    @property
    def hideable(self) -> bool:
        return self.kind in HIDEABLE_KINDS and bool(self.axes) and all(
            a in HIDEABLE_AXES for a in self.axes)


@dataclasses.dataclass(frozen=True)
class StepTime:
    """A predicted step time and its parts (seconds)."""

    compute: float
    comm_per_axis: dict[str, float]
    hideable: float
    critical: float
    exposed: float
    bubble: float
    step: float
    mfu: float


def span(axes: Iterable[str], mesh_shape: Mapping[str, int]) -> int:
    """How many consecutive devices a group over ``axes`` spans: the mesh is laid out in
    :data:`~meshpar.planner.layout.AXES` order (outermost first), so a group over axis ``a``
    spans ``a`` and every axis inside it."""
    order = [a for a in AXES if a in mesh_shape] + [a for a in mesh_shape if a not in AXES]
    outermost = min((order.index(a) for a in axes if a in order), default=len(order))
    return math.prod(mesh_shape[a] for a in order[outermost:])


def step_time(*, flops_per_device: float, collectives: Iterable[Collective],
              mesh_shape: Mapping[str, int], hardware: HardwareProfile, precision: str,
              bubble_fraction: float = 0.0, model_flops: float | None = None,
              matmul_bytes: float = 0.0, memory_bytes: float = 0.0) -> StepTime:
    """Predict one step's time (see the module docstring for the model).

    Args:
        flops_per_device: compute FLOPs per device and step, without bubble iterations.
        collectives: the step's collectives per kind and axes.
        mesh_shape: axis -> size.
        hardware: the profile.
        precision: ``"fp32"`` or ``"bf16"`` (the peak used).
        bubble_fraction: the pipeline's idle fraction (0 without a pipeline).
        model_flops: useful FLOPs of the step over all devices (no recompute), for the MFU.
        matmul_bytes, memory_bytes: per device and step, the matmuls' operand and result bytes
            and the bytes moved outside matmuls and collectives (from the compiled program);
            counted only on a profile with ``matmul_bandwidth``.

    Example:
        >>> from meshpar.planner.hardware import load_profile
        >>> t = step_time(flops_per_device=1e12,
        ...               collectives=[Collective("all-reduce", ("data",), 1e9)],
        ...               mesh_shape={"data": 8}, hardware=load_profile("h100-sxm"),
        ...               precision="bf16")
        >>> round(t.compute * 1e3, 2), round(t.step * 1e3, 2)   # ms: the all-reduce hides it
        (1.01, 2.23)
    """
    compute = hardware.compute_seconds(flops_per_device, precision, matmul_bytes=matmul_bytes,
                                       memory_bytes=memory_bytes)
    per_axis: dict[str, float] = {}
    hideable = critical = 0.0
    for c in collectives:
        bandwidth, latency = hardware.link(span(c.axes, mesh_shape))
        t = c.traffic / bandwidth + c.executions * latency
        key = "+".join(c.axes) or "-"
        per_axis[key] = per_axis.get(key, 0.0) + t
        if c.hideable:
            hideable += t
        else:
            critical += t
    exposed = critical + max(0.0, hideable - hardware.overlap * compute)
    f = bubble_fraction
    # Devices sharing one pool of cores (emulated CPU devices) lend an idle stage's cores to the
    # busy ones: the bubble adds no time there.
    bubble = compute * f / (1 - f) if f and not hardware.shared_cores else 0.0
    step = compute + exposed + bubble
    devices = math.prod(mesh_shape.values())
    mfu = (model_flops / (devices * hardware.peak(precision) * step)) if model_flops and step else 0.0
    return StepTime(compute, per_axis, hideable, critical, exposed, bubble, step, mfu)


def measured_collectives(measured: Mapping) -> list[Collective]:
    """The :class:`Collective` rows of :func:`meshpar.inspect.measure.measure`'s output."""
    return [Collective(row["kind"], tuple(row["axes"]), float(row["traffic_bytes_per_step"]),
                       int(row["executions"]))
            for row in measured["collectives"].values()]


def parameter_collectives(*, mesh_shape: Mapping[str, int], zero_stage: int, param_bytes: float,
                          microbatches: int = 1, layers: int = 1) -> list[Collective]:
    """The collectives the parameters alone fix, whatever the model: the gradient's all-reduce
    over ``data``; over ``fsdp`` the weights' all-gather (ZeRO-3: forward and backward, every
    microbatch) and the gradient's reduce-scatter. ``param_bytes`` is the fp32 parameter bytes
    one device holds before ZeRO (split by ``tensor`` and ``pipe`` only); ``layers`` the
    collectives' count for their latency (ZeRO-3 gathers a layer at a time). Activation
    collectives (tensor parallelism's, a pipeline's permutes) need the model's shapes and are
    not here.

    Example:
        >>> [c.kind for c in parameter_collectives(mesh_shape={"data": 2, "fsdp": 4},
        ...                                        zero_stage=3, param_bytes=4e6)]
        ['all-reduce', 'all-gather', 'reduce-scatter']
    """
    n = dict(mesh_shape)
    out = []
    if n.get(DATA, 1) > 1:
        out.append(Collective("all-reduce", (DATA,),
                              costs.ring_all_reduce(param_bytes, n[DATA]), 1))
    if n.get(FSDP, 1) > 1:
        f = n[FSDP]
        gathers = (2 if zero_stage >= 3 else 1) * (microbatches if zero_stage >= 3 else 1)
        out.append(Collective("all-gather", (FSDP,),
                              gathers * costs.ring_all_gather(param_bytes, f), 2 * layers))
        out.append(Collective("reduce-scatter", (FSDP,),
                              costs.ring_all_gather(param_bytes, f), layers))
    return out


def analytic_gpt_collectives(*, mesh_shape: Mapping[str, int], zero_stage: int,
                             param_bytes: float, layers: int, rows: int, seq_len: int,
                             d_model: int, remat: str, microbatches: int,
                             pipelined: bool, schedule: Schedule | str | None = None,
                             repeats: int = 1) -> list[Collective]:
    """The GPT's collectives by formula (:mod:`meshpar.inspect.costs`), before compiling.

    ``param_bytes`` is the fp32 parameter bytes one device holds before ZeRO (split only by
    ``tensor`` and ``pipe``); ``rows`` the per-device rows of the whole step. The pipeline's
    permutes: with ``schedule`` (and ``repeats``), :func:`pipeline_permutes` (every iteration
    and 1F1B tick); without, one permute per microbatch each way (no bubble iterations, no
    repeats, no 1F1B loop: the estimate before the 1F1B schedules were planned).
    """
    n = dict(mesh_shape)
    out = parameter_collectives(mesh_shape=mesh_shape, zero_stage=zero_stage,
                                param_bytes=param_bytes, microbatches=microbatches, layers=layers)
    if n.get(TENSOR, 1) > 1:
        act = rows * seq_len * d_model * 4
        out.append(Collective("all-reduce", (TENSOR,), costs.megatron_tp_bytes(
            layers=layers, activation_bytes=act, n=n[TENSOR],
            recompute_per_layer=1 if remat == "full" else 0), (5 * layers + 2) * microbatches))
    if n.get(PIPE, 1) > 1:
        act = rows * seq_len * d_model * 4
        if schedule is None:
            out.append(Collective("collective-permute", (PIPE,), 2.0 * act, 2 * microbatches))
        else:
            out.append(pipeline_permutes(stages=n[PIPE], microbatches=microbatches,
                                         schedule=schedule, repeats=repeats,
                                         activation_bytes=act))
    return out


def pipeline_permutes(*, stages: int, microbatches: int, schedule: Schedule | str = "gpipe",
                      repeats: int = 1, activation_bytes: float) -> Collective:
    """The pipeline's ``collective-permute`` over ``pipe`` in one step, by schedule.

    Every iteration of a pipeline loop permutes one microbatch's stage activation
    (``activation_bytes / microbatches``), bubble iterations included (the ``ppermute`` is
    outside the ``lax.cond`` that skips their compute): GPipe and circular run ``v M + P - 1``
    iterations forward and as many backward (autodiff of the loop). 1F1B and interleaved 1F1B
    run a forward loop of :attr:`~meshpar.parallel.schedule.PipelineConfig.iterations`
    iterations, then a backward loop of :attr:`~meshpar.parallel.schedule.PipelineConfig.ticks`
    ticks, each with two permutes (forward and back) that also carry the channels of the stack's
    boundary values (:mod:`meshpar.parallel.routes`): forward loop, the activation forward and
    the stack's input and output back (3 activations); backward loop, the activation and the
    output gradient forward, the gradient, the stack's input and its input gradient back (5).
    (The reshards of those values into and out of their blocks, all-to-alls and a few
    permutes of ``M / P`` activations each, are left out.)

    Args:
        stages, microbatches, schedule, repeats: the pipeline (as
            :class:`~meshpar.parallel.schedule.PipelineConfig`).
        activation_bytes: the stage activations of the whole step on one device (all its
            microbatches), e.g. ``rows x seq x d_model x itemsize``.

    Example:
        >>> pipeline_permutes(stages=4, microbatches=4, activation_bytes=400.0)
        Collective(kind='collective-permute', axes=('pipe',), traffic=1400.0, executions=14)
        >>> pipeline_permutes(stages=4, microbatches=4, schedule="1f1b", activation_bytes=400.0)
        Collective(kind='collective-permute', axes=('pipe',), traffic=8100.0, executions=38)
    """
    config = PipelineConfig(stages=stages, microbatches=microbatches, schedule=schedule,
                            repeats=repeats)
    one = activation_bytes / microbatches
    if config.schedule.one_f_one_b:
        count = 2 * config.iterations + 2 * config.ticks
        moved = 3 * config.iterations + 5 * config.ticks
    else:
        count = moved = 2 * config.iterations
    return Collective("collective-permute", (PIPE,), moved * one, count)
