"""The options of the train step: :class:`TrainConfig`, a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from typing import Literal

from meshpar.errors import StrategyError, is_int
from meshpar.parallel.schedule import Schedule, parse_schedule


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of the train step.

    Attributes:
        microbatches: gradient-accumulation steps per optimizer step (``lax.scan``).
        precision: ``"fp32"``, or ``"bf16"`` for bf16 compute with fp32 parameters, gradients
            and optimizer state.
        offload_optimizer: keep optimizer state in ``pinned_host`` memory.
        on_nonfinite: ``"raise"`` (stop with the step number; the state is left as it was before
            the step) or ``"skip"`` (drop that update, count it in the metrics).
        donate: donate the state buffers to the step.
        schedule: pipeline :class:`~meshpar.parallel.schedule.Schedule` (or its string):
            ``"gpipe"``, ``"circular"``, ``"1f1b"`` or ``"interleaved-1f1b"``; used when the mesh
            has a ``pipe`` axis of size > 1, where ``microbatches`` are the pipeline's
            microbatches.
        repeats: chunks of layers per stage (``v``) for the circular and interleaved-1f1b
            schedules.
        pipeline_remat: whether a pipeline recomputes each stage's forward in its backward pass
            (:attr:`~meshpar.parallel.schedule.PipelineConfig.remat`); ``None`` takes the
            schedule's default: ``True`` for gpipe and circular (without it their loop keeps
            every intermediate of every microbatch), ``False`` for the 1F1B schedules (they keep
            each in-flight chunk's residuals, a number of them set by the stages, not by the
            microbatches, and skip one forward per chunk; ``True`` keeps only stage inputs
            instead: less memory under a layer remat of ``none``, and needed under ``offload``).
        row_separable: declare that the loss is a mean, or a :class:`~meshpar.train.loss.Ratio`, of
            per-row terms and that the model computes each row of the batch on its own (no
            batch statistics, no batch-wide terms such as an MoE balance loss). meshpar may then
            run the step batch-local, each device on its own rows: ZeRO-2/3 with written-out
            reduce-scatters (:mod:`meshpar.parallel.zero`) and DP/ZeRO-1 accumulation with one reduction
            after the loop. Models with non-parameter state (RNG streams, batch statistics) stay
            global regardless. What applies is listed in :attr:`Trainer.fallbacks`.
        allow_unused_axes: run even if a mesh axis of size > 1 is used by nothing (every device
            along it repeats the same work); the axes are then in :attr:`Trainer.unused_axes`.
    """

    microbatches: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    offload_optimizer: bool = False
    on_nonfinite: Literal["raise", "skip"] = "raise"
    donate: bool = True
    schedule: Schedule = Schedule.GPIPE
    repeats: int = 1
    pipeline_remat: bool | None = None
    row_separable: bool = False
    allow_unused_axes: bool = False

    def __post_init__(self) -> None:
        if not is_int(self.microbatches, minimum=1, numpy=False):
            raise StrategyError(f"microbatches={self.microbatches!r}; expected an int >= 1")
        if self.precision not in ("fp32", "bf16"):
            raise StrategyError(f"precision={self.precision!r}; expected 'fp32' or 'bf16'")
        object.__setattr__(self, "schedule", parse_schedule(self.schedule))
        if not is_int(self.repeats, minimum=1, numpy=False):
            raise StrategyError(f"repeats={self.repeats!r}; expected an int >= 1")
        if self.schedule in (Schedule.GPIPE, Schedule.ONE_F_ONE_B) and self.repeats != 1:
            other = "circular" if self.schedule is Schedule.GPIPE else "interleaved-1f1b"
            raise StrategyError(
                f"repeats={self.repeats} needs schedule='{other}'; {self.schedule.value} runs "
                "each stage's layers once"
            )
        if self.schedule is Schedule.INTERLEAVED_1F1B and self.repeats < 2:
            raise StrategyError(
                f"schedule='interleaved-1f1b' needs repeats >= 2 chunks per stage, got "
                f"repeats={self.repeats}; use schedule='1f1b' for one chunk per stage"
            )
        if self.pipeline_remat is not None and not isinstance(self.pipeline_remat, bool):
            raise StrategyError(
                f"pipeline_remat={self.pipeline_remat!r}; expected None (the schedule's "
                "default), True or False"
            )
        if self.on_nonfinite not in ("raise", "skip"):
            raise StrategyError(f"on_nonfinite={self.on_nonfinite!r}; expected 'raise' or 'skip'")
        if not isinstance(self.row_separable, bool):
            raise StrategyError(f"row_separable={self.row_separable!r}; expected True or False")
        if not isinstance(self.allow_unused_axes, bool):
            raise StrategyError(
                f"allow_unused_axes={self.allow_unused_axes!r}; expected True or False"
            )
