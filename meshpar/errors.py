"""Exception types raised by meshpar.

Every error meshpar raises for bad user input is a subclass of :class:`MeshparError`, which is a
``ValueError`` so that callers who already catch ``ValueError`` keep working. Messages name the
offending parameter, axis and sizes and suggest a fix.
"""

from __future__ import annotations

import numpy as np


def is_int(value: object, /, *, minimum: int | None = None, numpy: bool = True) -> bool:
    """Whether ``value`` is an int (not a bool) ``>= minimum``: the check behind many of the
    errors below. ``numpy=False`` also turns away NumPy integers.

    Example:
        >>> is_int(2, minimum=1), is_int(True), is_int(np.int64(3), numpy=False)
        (True, False, False)
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer) if numpy else int):
        return False
    return minimum is None or value >= minimum


class MeshparError(ValueError):
    """Base class of every user-facing meshpar error."""


class DeviceEmulationError(MeshparError, RuntimeError):
    """CPU device emulation was requested after JAX had started its backend."""


class MeshError(MeshparError):
    """A mesh description does not fit the devices (bad product, unknown or repeated axis)."""


class RuleError(MeshparError):
    """A sharding rule table is malformed or names a mesh axis the mesh does not have."""


class RuleConflictError(RuleError):
    """Two rule sets disagree, or two dimensions of one tensor need the same mesh axis."""


class IndivisibleError(RuleError):
    """A tensor dimension is not divisible by the size of the mesh axes it is mapped to."""


class UnannotatedParameterError(RuleError):
    """Strict rules: a parameter has no logical axes and no path rule matched it, or a logical
    axis name (of a parameter or an activation) has no rule."""


class StrategyError(MeshparError):
    """A strategy cannot be applied to this mesh, model or batch."""


class StackNotScanned(StrategyError):
    """The model used a stacked parameter outside :func:`meshpar.scan_layers` under ZeRO-3.

    The trainer catches it and lets GSPMD reduce the gradients instead (see
    :attr:`meshpar.Trainer.explicit_zero`).
    """


class TrainingError(MeshparError, RuntimeError):
    """Training cannot continue (for example, a non-finite loss)."""


class CheckpointError(MeshparError):
    """A checkpoint cannot be saved or restored (missing, partial, corrupted or mismatched)."""


class DistributedError(MeshparError):
    """A multi-process setting is missing, malformed, or applied too late."""


class LaunchError(MeshparError):
    """A launcher usage error; reported on stderr with exit code 2."""


class UsageError(MeshparError):
    """Bad command-line input (exit status 2)."""


class PlanError(MeshparError):
    """The planner (:mod:`meshpar.planner`) found no layout: none fits the memory, or the device
    count has no factorisation the model's dimensions divide."""


class ProfileError(MeshparError):
    """A hardware profile is unknown (the message lists the valid names) or malformed (it names
    the key and the value)."""


class DataError(MeshparError):
    """Training data or a tokenizer cannot be used: no file matches, a file is empty or too short
    for the sequence length, a token id or the tokenizer's vocabulary does not fit the model."""


class MeshparWarning(UserWarning):
    """Something meshpar changed on the user's behalf and reports (e.g. Explicit mesh axes made
    Auto for training); filter it with ``warnings.filterwarnings("ignore", category=...)``."""
