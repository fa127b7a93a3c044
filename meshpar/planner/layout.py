"""Candidate layouts: one frozen :class:`Layout` per mesh factorisation and option set, and
:func:`enumerate_layouts`, which lists those a model's dimensions allow.

A layout is everything ``meshpar train`` takes besides the model: the mesh
``pipe x data x fsdp x tensor`` (laid out in that order, outermost first, so ``tensor`` gets
neighbouring devices), the ZeRO stage over ``fsdp``, microbatches, the pipeline schedule and its
repeats, the layer remat policy and the compute precision.
"""

from __future__ import annotations

import dataclasses
import itertools
import shlex
from collections.abc import Sequence

from meshpar.axes import DATA, FSDP, PIPE, TENSOR
from meshpar.sharding.strategy import Strategy, get_strategy
from meshpar.train import TrainConfig

#: The mesh axes the planner factorises the devices into, outermost first.
AXES = (PIPE, DATA, FSDP, TENSOR)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """One candidate layout (see the module docstring).

    ``remat`` is the GPT's layer remat policy, or ``None`` for a model whose remat the planner
    does not choose (:func:`meshpar.planner.plan` with your own ``make_model``).

    Example:
        >>> Layout(data=2, fsdp=4, zero_stage=3).mesh_text
        'data=2,fsdp=4'
    """

    pipe: int = 1
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    zero_stage: int = 0
    microbatches: int = 1
    schedule: str = "gpipe"
    repeats: int = 1
    remat: str | None = None
    precision: str = "fp32"

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
            parts.append(self.schedule if self.repeats == 1 else f"{self.schedule}x{self.repeats}")
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
            args += ["--schedule", self.schedule, "--repeats", str(self.repeats)]
        if self.remat is not None:
            args += ["--remat", self.remat]
        return args

    def trainer_code(self) -> str:
        """The ``Trainer`` arguments of this layout, as Python."""
        return (f"mp.Trainer(make_model, tx, loss_fn, mesh=mp.make_mesh({self.mesh_text!r}), "
                f"strategy=mp.get_strategy('auto', zero_stage={self.zero_stage}), "
                f"config=mp.TrainConfig(microbatches={self.microbatches}, "
                f"precision={self.precision!r}, schedule={self.schedule!r}, "
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


def enumerate_layouts(
    devices: int, /, *, batch_size: int, dims: Dims = Dims(), devices_per_node: int | None = None,
    remats: Sequence[str | None] = (None,), precisions: Sequence[str] = ("fp32",),
    microbatches: Sequence[int] = (1, 2, 4), zero_stages: Sequence[int] = (1, 2, 3),
    pipeline: bool = True,
) -> tuple[list[Layout], list[str]]:
    """Every layout of ``devices`` devices the model's dimensions and the batch allow.

    Factorisations ``pipe x data x fsdp x tensor`` of ``devices`` with ``tensor`` inside a node
    and dividing ``heads`` and ``mlp_dim``, ``pipe`` dividing ``layers``, ``data x fsdp x
    microbatches`` dividing the batch; ZeRO ``zero_stages`` when ``fsdp > 1`` (0 otherwise: a
    replicated ``fsdp`` is ``data``); with a pipe axis ``pipe``, ``2 pipe`` and ``4 pipe``
    microbatches and the circular schedule with 2 repeats where the depth allows.

    Returns:
        ``(layouts, rejected)``: the layouts, and one line per factorisation left out and why.

    Example:
        >>> layouts, _ = enumerate_layouts(8, batch_size=16, dims=Dims(layers=2, heads=4))
        >>> len(layouts) > 10
        True
    """
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
            mbs = [m for m in (pipe, 2 * pipe, 4 * pipe) if rows % m == 0 and batch_size % m == 0]
            schedules = [("gpipe", 1)]
            if dims.layers is not None and dims.layers % (2 * pipe) == 0:
                schedules.append(("circular", 2))
        else:
            mbs = [m for m in microbatches if rows % m == 0]
            schedules = [("gpipe", 1)]
        if not mbs:
            rejected.append(f"{name}: {rows} rows per device split into no microbatch count")
            continue
        for z, m, (sched, rep), remat, prec in itertools.product(zs, mbs, schedules, remats,
                                                                 precisions):
            if sched == "circular" and m < pipe:
                continue
            out.append(Layout(pipe=pipe, data=data, fsdp=fsdp, tensor=tensor, zero_stage=z,
                              microbatches=m, schedule=sched, repeats=rep, remat=remat,
                              precision=prec))
    return out, rejected
