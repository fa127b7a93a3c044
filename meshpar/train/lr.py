"""Learning-rate schedules: linear warm-up, then cosine, linear or no decay."""

from __future__ import annotations

import enum

import optax

from meshpar.errors import UsageError, is_int


class LRSchedule(enum.Enum):
    """The decay after warm-up (``--lr-schedule``)."""

    COSINE = "cosine"  #: cosine from the peak down to ``final_fraction`` of it
    LINEAR = "linear"  #: a straight line from the peak down to ``final_fraction`` of it
    CONSTANT = "constant"  #: stay at the peak


def default_warmup(steps: int) -> int:
    """The warm-up ``meshpar train`` uses without ``--warmup-steps``: 10% of the run, 1 to 20 steps.

    Example:
        >>> default_warmup(300), default_warmup(3)
        (20, 1)
    """
    return max(1, min(20, steps // 10))


def lr_schedule(kind: LRSchedule, *, peak: float, steps: int, warmup: int,
                final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then ``kind``'s decay until ``steps``.

    Args:
        kind: the decay.
        peak: the learning rate at the end of warm-up.
        steps: the run's length (the decay ends there).
        warmup: warm-up steps (0: start at the peak).
        final_fraction: where cosine and linear decay end, as a fraction of ``peak``.

    Raises:
        UsageError: ``warmup`` is negative, or ``peak <= 0``.

    A warm-up as long as the run leaves a decay of one step (what ``meshpar train`` does by
    default for a 1-step run); ``meshpar train`` refuses an explicit ``--warmup-steps`` that long.

    Example:
        >>> s = lr_schedule(LRSchedule.LINEAR, peak=1.0, steps=10, warmup=2)
        >>> [round(float(s(i)), 2) for i in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.55, 0.1]
    """
    kind = LRSchedule(kind)
    if not is_int(warmup, minimum=0):
        raise UsageError(f"--warmup-steps {warmup}: must be an int >= 0")
    if not peak > 0:
        raise UsageError(f"--lr {peak}: must be > 0")
    if kind is LRSchedule.COSINE:
        # max(1, ...): optax needs a decay of at least one step even without warm-up.
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1),
                                                  peak * final_fraction)
    pieces, bounds = [], []
    if warmup:
        pieces.append(optax.linear_schedule(0.0, peak, warmup))
        bounds.append(warmup)
    if kind is LRSchedule.LINEAR:
        pieces.append(optax.linear_schedule(peak, peak * final_fraction, max(1, steps - warmup)))
    else:
        pieces.append(optax.constant_schedule(peak))
    return optax.join_schedules(pieces, bounds) if bounds else pieces[0]
