"""Candidate layouts: one frozen :class:`Layout` per mesh factorisation and option set, and
:func:`enumerate_layouts`, which lists those a model's dimensions allow.

A layout is everything ``meshpar train`` takes besides the model: the mesh
``pipe x data x fsdp x tensor`` (laid out in that order, outermost first, so ``tensor`` gets
neighbouring devices), the ZeRO stage over ``fsdp``, microbatches, the pipeline
:class:`~meshpar.parallel.schedule.Schedule` (GPipe, circular, 1F1B, interleaved 1F1B) and its
repeats, the layer remat policy and the compute precision.
"""

from __future__ import annotations

import dataclasses
import itertools
import shlex
from collections.abc import Sequence

from meshpar.axes import DATA, FSDP, PIPE, TENSOR
from meshpar.errors import PlanError, StrategyError
from meshpar.parallel.schedule import PipelineConfig, Schedule, parse_schedule
from meshpar.sharding.strategy import Strategy, get_strategy
from meshpar.train import TrainConfig

#: The mesh axes the planner factorises the devices into, outermost first.
AXES = (PIPE, DATA, FSDP, TENSOR)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """One candidate layout (see the module docstring).

    ``remat`` is the GPT's layer remat policy, or ``None`` for a model whose remat the planner
    does not choose (:func:`meshpar.planner.plan` with your own ``make_model``). ``schedule``
    takes a :class:`~meshpar.parallel.schedule.Schedule` or its string (stored as the enum).

    Raises:
        PlanError: a schedule or repeats on a layout without a pipe axis, or a pipeline that
            :class:`~meshpar.parallel.schedule.PipelineConfig` refuses (an unknown schedule,
            repeats that do not suit it, fewer microbatches than stages for 1F1B, ...).

    Example:
        >>> Layout(data=2, fsdp=4, zero_stage=3).mesh_text
        'data=2,fsdp=4'
        >>> Layout(pipe=4, data=2, microbatches=8, schedule="interleaved-1f1b", repeats=2).label
        'pipe=4,data=2 mb8 interleaved-1f1bx2 fp32'
    """

    pipe: int = 1
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    zero_stage: int = 0
    microbatches: int = 1
    schedule: Schedule = Schedule.GPIPE
    repeats: int = 1
    remat: str | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        try:
            schedule = parse_schedule(self.schedule, what="Layout.schedule")
        except StrategyError as err:
            raise PlanError(str(err)) from None
        object.__setattr__(self, "schedule", schedule)
        if self.pipe == 1:
            # Without a pipe axis there is no pipeline to schedule: meshpar train refuses
            # --schedule/--repeats there, so the layout must not carry them either.
            if schedule is not Schedule.GPIPE or self.repeats != 1:
                raise PlanError(
                    f"Layout(pipe=1, schedule={schedule.value!r}, repeats={self.repeats}): a "
                    "schedule and repeats need a pipe axis of size > 1")
            return
        try:
            # The one source of the schedules' rules (M >= P for 1F1B, M a multiple of P for
            # interleaved 1F1B, repeats per schedule), so a layout is one meshpar train runs.
            PipelineConfig(stages=self.pipe, microbatches=self.microbatches, schedule=schedule,
                           repeats=self.repeats)
        except StrategyError as err:
            raise PlanError(f"{self.mesh_text}: {err}") from None

    @property
    def devices(self) -> int:
        return self.pipe * self.data * self.fsdp * self.tensor

    @property
    def mesh_shape(self) -> dict[str, int]:
        """Axis name -> size, outermost first, axes of size 1 left out (``{"data": 1}`` for one
        device)."""
        shape = {a: getattr(self, a) for a in AXES if getattr(self, a) > 1}
        return shape or {DATA: 1}

    @property
    def mesh_text(self) -> str:
        return ",".join(f"{a}={n}" for a, n in self.mesh_shape.items())

    @property
    def label(self) -> str:
        """A short name for tables: mesh, ZeRO stage, microbatches, schedule, remat, precision."""
        parts = [self.mesh_text]
        if self.fsdp > 1:
            parts.append(f"z{self.zero_stage}")
        if self.microbatches > 1:
            parts.append(f"mb{self.microbatches}")
        if self.pipe > 1:
            name = self.schedule.value
            parts.append(name if self.repeats == 1 else f"{name}x{self.repeats}")
        if self.remat is not None:
            parts.append(f"remat={self.remat}")
        parts.append(self.precision)
        return " ".join(parts)

    def strategy(self) -> Strategy:
        """The :class:`~meshpar.Strategy`: ``auto`` (ZeRO over ``fsdp``, Megatron TP over
        ``tensor``) at this ZeRO stage."""
        return get_strategy("auto", zero_stage=self.zero_stage)

    def train_config(self, **extra) -> TrainConfig:
        """The :class:`~meshpar.TrainConfig` fields this layout sets (``extra``: the others)."""
        return TrainConfig(microbatches=self.microbatches, precision=self.precision,
                           schedule=self.schedule, repeats=self.repeats, **extra)

    def train_args(self) -> list[str]:
        """``meshpar train``'s layout flags for this layout."""
        args = ["--mesh", self.mesh_text, "--strategy", "auto", "--zero", str(self.zero_stage),
                "--microbatches", str(self.microbatches), "--precision", self.precision]
        if self.pipe > 1:
            args += ["--schedule", self.schedule.value, "--repeats", str(self.repeats)]
        if self.remat is not None:
            args += ["--remat", self.remat]
        return args

    def trainer_code(self) -> str:
        """The ``Trainer`` arguments of this layout, as Python."""
        return (f"mp.Trainer(make_model, tx, loss_fn, mesh=mp.make_mesh({self.mesh_text!r}), "
                f"strategy=mp.get_strategy('auto', zero_stage={self.zero_stage}), "
                f"config=mp.TrainConfig(microbatches={self.microbatches}, "
                f"precision={self.precision!r}, schedule={self.schedule.value!r}, "
                f"repeats={self.repeats}))")

    def command(self, model_args: Sequence[str], *, batch_size: int) -> str:
        """A ready ``meshpar train`` command line (``model_args``: the model flags)."""
        args = ["meshpar", "train", *model_args, *self.train_args(), "--batch-size",
                str(batch_size)]
        if self.devices != 8:
            args += ["--cpu-devices", str(self.devices)]
        return shlex.join(args)


def _factorisations(n: int, k: int):
    if k == 1:
        yield (n,)
        return
    for d in range(1, n + 1):
        if n % d == 0:
            for rest in _factorisations(n // d, k - 1):
                yield (d, *rest)


@dataclasses.dataclass(frozen=True)
class Dims:
    """The model dimensions that constrain the factorisation (``None``: not known, not
    checked before compiling).

    Attributes:
        layers: the repeated-block depth (``pipe x repeats`` must divide it).
        heads, mlp_dim: what tensor parallel splits (``tensor`` must divide them).
    """

    layers: int | None = None
    heads: int | None = None
    mlp_dim: int | None = None


#: The schedules :func:`enumerate_layouts` tries on a pipelined factorisation, and the repeats
#: (chunks per stage) of the interleaved ones.
PIPELINE_SCHEDULES: tuple[Schedule, ...] = tuple(Schedule)
INTERLEAVED_REPEATS: tuple[int, ...] = (2,)


def _short(err: StrategyError) -> str:
    # PipelineConfig's message up to its explanation: "schedule='1f1b' needs microbatches >=
    # stages", enough for a line of the rejected list.
    text = str(err).removeprefix("PipelineConfig: ")
    return text.split(" (")[0].split(";")[0]


def _pipeline_options(pipe: int, m: int, pairs: Sequence[tuple[Schedule, int]]
                      ) -> tuple[list[tuple[Schedule, int]], list[str]]:
    """Those of the (schedule, repeats) ``pairs`` a pipeline of ``pipe`` stages and ``m``
    microbatches allows (:class:`PipelineConfig`'s own checks), and why each other is out."""
    ok, why = [], []
    for sched, rep in pairs:
        try:
            PipelineConfig(stages=pipe, microbatches=m, schedule=sched, repeats=rep)
        except StrategyError as err:
            why.append(f"{sched.value} x{rep}: {_short(err)}")
            continue
        ok.append((sched, rep))
    return ok, why


def enumerate_layouts(
    devices: int, /, *, batch_size: int, dims: Dims = Dims(), devices_per_node: int | None = None,
    remats: Sequence[str | None] = (None,), precisions: Sequence[str] = ("fp32",),
    microbatches: Sequence[int] = (1, 2, 4), zero_stages: Sequence[int] = (1, 2, 3),
    pipeline: bool = True, schedules: Sequence[Schedule | str] = PIPELINE_SCHEDULES,
    repeats: Sequence[int] = INTERLEAVED_REPEATS,
    pipe_microbatches: Sequence[int] | None = None,
) -> tuple[list[Layout], list[str]]:
    """Every layout of ``devices`` devices the model's dimensions and the batch allow.

    Factorisations ``pipe x data x fsdp x tensor`` of ``devices`` with ``tensor`` inside a node
    and dividing ``heads`` and ``mlp_dim``, ``pipe`` dividing ``layers``, ``data x fsdp x
    microbatches`` dividing the batch; ZeRO ``zero_stages`` when ``fsdp > 1`` (0 otherwise: a
    replicated ``fsdp`` is ``data``). With a pipe axis: ``pipe``, ``2 pipe`` and ``4 pipe``
    microbatches (or ``pipe_microbatches``), each with every schedule of ``schedules`` its
    :class:`~meshpar.parallel.schedule.PipelineConfig` accepts: ``gpipe`` and ``1f1b`` (one chunk
    per stage; 1F1B needs ``M >= P``), ``circular`` and ``interleaved-1f1b`` with each of
    ``repeats`` chunks per stage where ``pipe x repeats`` divides the depth (circular needs
    ``M >= P``, interleaved 1F1B ``M`` a multiple of ``P``).

    Args:
        devices: the device count to factorise.
        batch_size: the global batch (rows).
        dims: the model dimensions that constrain the factorisation.
        devices_per_node: the node size ``tensor`` must stay within (``None``: no limit).
        remats, precisions: the layer remat policies and compute precisions to try.
        microbatches: microbatch counts of an unpipelined layout.
        zero_stages: ZeRO stages over ``fsdp`` when ``fsdp > 1``.
        pipeline: whether the model has a layer stack to pipeline (``False``: ``pipe = 1``).
        schedules: the pipeline schedules to try.
        repeats: chunks per stage for the interleaved schedules.
        pipe_microbatches: microbatch counts of a pipelined layout (default ``P, 2P, 4P``).

    Returns:
        ``(layouts, rejected)``: the layouts, and one line per factorisation (or pipeline
        schedule) left out and why.

    Example:
        >>> layouts, _ = enumerate_layouts(8, batch_size=16, dims=Dims(layers=2, heads=4))
        >>> len(layouts) > 10
        True
        >>> layouts, _ = enumerate_layouts(8, batch_size=16, dims=Dims(layers=4, heads=4))
        >>> sorted({lay.schedule.value for lay in layouts if lay.pipe == 2})
        ['1f1b', 'circular', 'gpipe', 'interleaved-1f1b']
    """
    schedules = [parse_schedule(s, what="enumerate_layouts(schedules=...)") for s in schedules]
    out, rejected = [], []
    for pipe, data, fsdp, tensor in _factorisations(devices, 4):
        name = f"pipe={pipe},data={data},fsdp={fsdp},tensor={tensor}"
        why = []
        if devices_per_node and tensor > devices_per_node:
            why.append(f"tensor={tensor} spans more than a node ({devices_per_node} devices)")
        for dim, value in (("heads", dims.heads), ("mlp_dim", dims.mlp_dim)):
            if value is not None and value % tensor:
                why.append(f"{dim}={value} is not divisible by tensor={tensor}")
        if pipe > 1 and not pipeline:
            why.append("the model has no layer stack to pipeline")
        if pipe > 1 and dims.layers is not None and dims.layers % pipe:
            why.append(f"layers={dims.layers} is not divisible by pipe={pipe}")
        if batch_size % (data * fsdp):
            why.append(f"batch {batch_size} is not divisible by data x fsdp = {data * fsdp}")
        if why:
            rejected.append(f"{name}: {'; '.join(why)}")
            continue
        rows = batch_size // (data * fsdp)
        zs = zero_stages if fsdp > 1 else (0,)
        if pipe > 1:
            counts = pipe_microbatches or (pipe, 2 * pipe, 4 * pipe)
            mbs = [m for m in counts if rows % m == 0 and batch_size % m == 0]
        else:
            mbs = [m for m in microbatches if rows % m == 0]
        if not mbs:
            rejected.append(f"{name}: {rows} rows per device split into no microbatch count")
            continue
        options = {m: [(Schedule.GPIPE, 1)] for m in mbs}
        if pipe > 1:
            pairs, deep = [], []
            for sched in schedules:
                for rep in (repeats if sched.interleaved else (1,)):
                    if dims.layers is not None and dims.layers % (pipe * rep):
                        deep.append(f"{sched.value} x{rep}")
                    else:
                        pairs.append((sched, rep))
            if deep:
                rejected.append(f"{name}: {', '.join(deep)} left out: layers={dims.layers} is "
                                f"not divisible by pipe x repeats")
            for m in mbs:
                options[m], left_out = _pipeline_options(pipe, m, pairs)
                if left_out:
                    rejected.append(f"{name}, M={m}: {'; '.join(left_out)}")
        # ZeRO stage, microbatches, schedule, remat, precision, outermost first: with
        # schedules=("gpipe", "circular") the list is the one from before 1F1B was planned, so
        # seeded samples of it (plan_memory.py, bench_plan.py) stay comparable.
        for z, m in itertools.product(zs, mbs):
            for (sched, rep), remat, prec in itertools.product(options[m], remats, precisions):
                out.append(Layout(pipe=pipe, data=data, fsdp=fsdp, tensor=tensor, zero_stage=z,
                                  microbatches=m, schedule=sched, repeats=rep, remat=remat,
                                  precision=prec))
    return out, rejected
