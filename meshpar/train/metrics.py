"""What one optimizer step reports: :class:`StepMetrics`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

# The keys in the order Trainer.step's dict had them; the last two only when they apply.
_KEYS = ("grad_norm", "loss", "step_time_s", "skipped", "loss_weight", "aux")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class StepMetrics(Mapping[str, Any]):
    """The metrics of one :meth:`~meshpar.Trainer.step`.

    Read them as attributes (``metrics.loss``) or, as before this was a class, as a read-only
    mapping (``metrics["loss"]``, ``metrics.get("aux")``, ``dict(metrics)``); the mapping has
    ``loss_weight`` only for a :class:`~meshpar.train.loss.Ratio` loss and ``aux`` only when the
    loss returns aux values. ``json.dumps`` needs ``dict(metrics)``.

    Attributes:
        loss: the step's loss (for a ratio loss, summed numerator over summed weight).
        grad_norm: the global gradient norm.
        step_time_s: wall time of the step on the host, in seconds.
        skipped: the update was not applied (non-finite loss with ``on_nonfinite="skip"``).
        loss_weight: a ratio loss's summed weight over the global batch, else ``None``.
        aux: the loss's aux values, reduced over shards and microbatches (scalars as floats,
            arrays as NumPy arrays), else ``None``.
    """

    loss: float
    grad_norm: float
    step_time_s: float
    skipped: bool
    loss_weight: float | None = None
    aux: Any = None

    def _keys(self) -> tuple[str, ...]:
        return tuple(k for k in _KEYS
                     if k not in ("loss_weight", "aux") or getattr(self, k) is not None)

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __repr__(self) -> str:
        return f"StepMetrics({', '.join(f'{k}={self[k]!r}' for k in self)})"
