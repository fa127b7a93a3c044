"""Pipeline schedules as pure tables: which microbatch (and repeat) each stage runs when.

Everything here is plain Python and NumPy: no JAX, no devices. :func:`schedule_table` and
:func:`repeat_table` are what :func:`meshpar.parallel.pipeline.pipeline_apply` *executes* (it embeds them as
constants and looks up its slot each iteration), so a picture drawn from them is the loop.

The schedules, with ``P`` stages, ``M`` microbatches and ``v`` repeats (``v = 1`` for GPipe):

* Work items are numbered ``k = r*M + m`` (repeat ``r``, microbatch ``m``). Stage ``s`` runs item
  ``k = t - s`` at iteration ``t`` when ``0 <= k < v*M``; otherwise it idles (a *bubble*).
  That is ``v*M + P - 1`` iterations, of which each stage idles ``P - 1``.
* **gpipe** (``v = 1``): microbatch ``m`` enters stage 0 at iteration ``m`` and leaves the last
  stage at ``m + P - 1``.
* **circular** (``v > 1``, "interleaved"/looped): stage ``s`` holds ``v`` chunks of layers, chunk
  ``r`` being layers ``(r*P + s)*c ... (r*P + s)*c + c - 1``; a microbatch goes round the ring of
  stages ``v`` times. Microbatch ``m``, repeat ``r`` leaves the last stage at ``r*M + m + P - 1``
  and needs stage 0 again at ``(r+1)*M + m``, so the schedule needs ``M >= P`` (it waits in a
  buffer on stage 0 for ``M - P`` iterations). The bubble fraction falls from
  ``(P-1)/(M+P-1)`` to ``(P-1)/(v*M+P-1)``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from meshpar.axes import PIPE
from meshpar.errors import StrategyError, is_int

Schedule = Literal["gpipe", "circular"]
SCHEDULES: tuple[str, ...] = ("gpipe", "circular")


def _check_int(name: str, value: object, minimum: int) -> int:
    if not is_int(value, minimum=minimum):
        raise StrategyError(f"PipelineConfig.{name}={value!r} must be an int >= {minimum}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How layers are split into stages and how microbatches flow through them.

    Attributes:
        stages: pipeline stages ``P``; the size of the ``axis`` mesh axis.
        microbatches: microbatches ``M`` the batch is split into.
        schedule: ``"gpipe"`` or ``"circular"`` (each stage holds ``repeats`` chunks of layers
            and microbatches go round the ring ``repeats`` times).
        repeats: ``v``, chunks per stage; must be 1 for gpipe.
        axis: the mesh axis the stages live on.
        remat: recompute each stage during the backward pass, keeping only its input per
            iteration (see :mod:`meshpar.parallel.pipeline`).
        batch_axes: mesh axes that split each microbatch's batch dimension while *replicating*
            the stage weights (data parallelism). The pipeline runs them as manual axes too, so
            that the weight gradient is summed over them once, after the loop, instead of being
            all-reduced in every backward iteration. Leave out axes that shard weights (``fsdp``,
            ``tensor``): they stay automatic inside each stage.

    Raises:
        StrategyError: a field out of range, ``repeats != 1`` for gpipe, or a circular schedule
            with ``repeats > 1`` and fewer microbatches than stages.

    Example:
        >>> cfg = PipelineConfig(stages=4, microbatches=8, schedule="circular", repeats=2)
        >>> cfg.iterations, round(cfg.bubble_fraction, 3)
        (19, 0.158)
    """

    stages: int
    microbatches: int
    schedule: Schedule = "gpipe"
    repeats: int = 1
    axis: str = PIPE
    remat: bool = True
    batch_axes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_int("stages", self.stages, 1)
        _check_int("microbatches", self.microbatches, 1)
        _check_int("repeats", self.repeats, 1)
        if self.schedule not in SCHEDULES:
            raise StrategyError(
                f"PipelineConfig.schedule={self.schedule!r}; expected one of {SCHEDULES}"
            )
        if self.schedule == "gpipe" and self.repeats != 1:
            raise StrategyError(
                f"PipelineConfig: schedule='gpipe' runs each stage's layers once, so repeats must "
                f"be 1, got repeats={self.repeats}; use schedule='circular' for repeats > 1"
            )
        if self.schedule == "circular" and self.repeats > 1 and self.microbatches < self.stages:
            raise StrategyError(
                f"PipelineConfig: the circular schedule needs microbatches >= stages (a "
                f"microbatch leaving the last stage must find stage 0 free of the first pass), "
                f"got microbatches={self.microbatches} < stages={self.stages}; use at least "
                f"{self.stages} microbatches or the gpipe schedule"
            )
        if not isinstance(self.axis, str) or not self.axis:
            raise StrategyError(f"PipelineConfig.axis={self.axis!r} must be a mesh axis name")
        if isinstance(self.batch_axes, str):
            # A bare string would iterate as characters; accept it as one axis name.
            object.__setattr__(self, "batch_axes", (self.batch_axes,))
        object.__setattr__(self, "batch_axes", tuple(self.batch_axes))
        if self.axis in self.batch_axes or len(set(self.batch_axes)) != len(self.batch_axes):
            raise StrategyError(
                f"PipelineConfig.batch_axes={self.batch_axes} must be distinct mesh axes other "
                f"than the stage axis {self.axis!r}"
            )

    @property
    def iterations(self) -> int:
        """Loop iterations: ``v*M + P - 1`` (``M + P - 1`` for gpipe)."""
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble_fraction(self) -> float:
        """Fraction of stage-iterations that idle: ``(P-1) / (v*M + P - 1)``."""
        return (self.stages - 1) / self.iterations

    def layers_per_chunk(self, num_layers: int) -> int:
        """Layers in one stage chunk: ``num_layers / (stages * repeats)``.

        Raises:
            StrategyError: ``num_layers`` is not divisible by ``stages * repeats``.
        """
        chunks = self.stages * self.repeats
        if not is_int(num_layers, minimum=1) or num_layers % chunks:
            raise StrategyError(
                f"pipeline: {num_layers!r} layers cannot be split into stages={self.stages} x "
                f"repeats={self.repeats} = {chunks} equal chunks; use a layer count divisible "
                f"by {chunks}"
            )
        return num_layers // chunks

    def validate(self, num_layers: int, global_batch: int, mesh) -> None:
        """Check that this pipeline fits a model, a batch and a mesh.

        Args:
            num_layers: layers in the stacked layer tree.
            global_batch: examples per step, split into ``microbatches``.
            mesh: the :class:`jax.sharding.Mesh` (anything with a ``shape`` mapping).

        Raises:
            StrategyError: layers not divisible by ``stages * repeats``; ``microbatches`` not
                dividing ``global_batch``; the microbatch size not divisible by the
                ``batch_axes``; the stage axis or a batch axis missing from the mesh, or the
                stage axis's size differing from ``stages``.

        Example:
            >>> PipelineConfig(stages=2, microbatches=4).validate(8, 32, make_mesh(pipe=2, data=4))
        """
        self.layers_per_chunk(num_layers)
        shape = dict(mesh.shape)
        if self.axis not in shape:
            raise StrategyError(
                f"pipeline: stage axis {self.axis!r} is not in the mesh {shape}; build the mesh "
                f"with {self.axis}={self.stages}"
            )
        if shape[self.axis] != self.stages:
            raise StrategyError(
                f"pipeline: stages={self.stages} but mesh axis {self.axis!r} has size "
                f"{shape[self.axis]}; they must be equal"
            )
        for axis in self.batch_axes:
            if axis not in shape:
                raise StrategyError(
                    f"pipeline: batch axis {axis!r} is not in the mesh {shape}"
                )
        if not is_int(global_batch, minimum=1) or global_batch % self.microbatches:
            raise StrategyError(
                f"pipeline: microbatches={self.microbatches} does not divide the global batch "
                f"{global_batch!r}; pick a batch size that is a multiple of {self.microbatches}"
            )
        micro = global_batch // self.microbatches
        ways = int(np.prod([shape[a] for a in self.batch_axes], dtype=np.int64))
        if micro % ways:
            raise StrategyError(
                f"pipeline: microbatch size {micro} (global batch {global_batch} / "
                f"{self.microbatches} microbatches) is not divisible by batch axes "
                f"{self.batch_axes} of size {ways}"
            )


def _item_table(config: PipelineConfig) -> np.ndarray:
    # Work item k = t - s run by stage s at iteration t, or -1 for a bubble.
    s = np.arange(config.stages)[:, None]
    t = np.arange(config.iterations)[None, :]
    k = t - s
    return np.where((k >= 0) & (k < config.repeats * config.microbatches), k, -1)


def schedule_table(config: PipelineConfig, /) -> np.ndarray:
    """The microbatch each stage runs at each iteration.

    Args:
        config: the pipeline.

    Returns:
        ``int32[stages, iterations]``: the microbatch index stage ``s`` computes at iteration
        ``t``, or ``-1`` for a bubble. For the circular schedule each microbatch appears once per
        repeat on every stage; :func:`repeat_table` says which repeat.

    Example:
        >>> schedule_table(PipelineConfig(stages=2, microbatches=3))
        array([[ 0,  1,  2, -1],
               [-1,  0,  1,  2]], dtype=int32)
    """
    k = _item_table(config)
    return np.where(k >= 0, k % config.microbatches, -1).astype(np.int32)


def repeat_table(config: PipelineConfig, /) -> np.ndarray:
    """The repeat (chunk of layers on that stage) each stage runs at each iteration.

    Args:
        config: the pipeline.

    Returns:
        ``int32[stages, iterations]``: the repeat ``r`` of the work item stage ``s`` runs at
        iteration ``t`` (always 0 for gpipe), or ``-1`` for a bubble. Stage ``s`` running repeat
        ``r`` applies layer chunk ``r*stages + s``.

    Example:
        >>> repeat_table(PipelineConfig(stages=2, microbatches=2, schedule="circular", repeats=2))
        array([[ 0,  0,  1,  1, -1],
               [-1,  0,  0,  1,  1]], dtype=int32)
    """
    k = _item_table(config)
    return np.where(k >= 0, k // config.microbatches, -1).astype(np.int32)
