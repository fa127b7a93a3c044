"""``meshpar train --tensorboard DIR``: scalars as TensorBoard event files, written by tensorboardX."""

from __future__ import annotations

import os

from tensorboardX import SummaryWriter

#: ``--metrics-file`` key -> TensorBoard tag.
TAGS = {
    "loss": "train/loss", "eval_loss": "eval/loss", "eval_perplexity": "eval/perplexity",
    "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "perf/tokens_per_s",
}


class TensorBoard:
    """The scalars of each ``--metrics-file`` record, under :data:`TAGS`, in ``directory``.

    Example:
        >>> import os, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> directory = os.path.join(tmp.name, "runs", "a")
        >>> tb = TensorBoard(directory)
        >>> tb.write({"step": 0, "loss": 5.5, "lr": 1e-3})
        >>> tb.close()
        >>> [name.startswith("events.out.tfevents") for name in os.listdir(directory)]
        [True]
        >>> tmp.cleanup()
    """

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self._writer = SummaryWriter(logdir=directory)

    def write(self, record: dict) -> None:
        """Add the record's known scalars at its ``step`` (1-based: the step count after it)."""
        for key, tag in TAGS.items():
            if record.get(key) is not None:
                self._writer.add_scalar(tag, float(record[key]), global_step=record["step"] + 1)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
