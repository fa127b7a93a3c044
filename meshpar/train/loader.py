"""Batches of your own data through Grain: shuffled, sharded per process, resumable.

A :class:`ShardedBatches` is a Grain ``MapDataset`` pipeline over :class:`~meshpar.train.files.Windows`:

1. the windows, shuffled with a seed and repeated (Grain draws a new order for every epoch), give
   one *global* order of rows; global batch ``s`` is rows ``s*B .. s*B + B - 1`` of it;
2. each process keeps only *its* rows of every global batch (``rows``: the positions the batch
   sharding gives its devices, :func:`meshpar.backend.distributed.local_slice`), so it reads
   ``B / processes`` windows per step and never the others';
3. those are batched into ``{"inputs", "targets"}`` and read ahead by Grain's threads.

Why not Grain's ``ShardByJaxProcess``: it gives each process a contiguous shard of the *records*
and shuffles inside it, so which rows make up a global batch would depend on the number of
processes. Here the global batch is the same whatever the processes and the mesh, so a
2-process run computes the losses of a 1-process run, and a checkpoint resumes on another
process count. The iterator's state (Grain's ``get_state()``, a count of batches) goes into the
checkpoint; restoring it continues with exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from meshpar.errors import DataError, is_int
from meshpar.train.files import Windows

#: Grain's read-ahead: a few batches in two threads (the step, not the reading, is the work).
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class _RowsOfBatches(grain.MapDataset):
    """Element ``j``: row ``rows[j % b]`` of global batch ``j // b`` of the parent (``b`` rows
    of each batch of ``batch_size``)."""

    def __init__(self, parent: grain.MapDataset, batch_size: int, rows: np.ndarray):
        super().__init__(parent)
        self._batch_size = batch_size
        self._rows = rows
        self._length = len(parent) // batch_size * len(rows)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(int(index), len(self._rows))
        return self._parent[batch * self._batch_size + int(self._rows[row])]

    def __str__(self) -> str:
        return f"RowsOfBatches(batch_size={self._batch_size}, rows={len(self._rows)})"


def _inputs_targets(windows: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


class ShardedBatches:
    """Global batches of ``batch_size`` windows; this process reads only ``rows`` of each.

    Args:
        windows: the data (:func:`meshpar.train.files.open_token_files`).
        batch_size: rows of a global batch.
        rows: the positions of this process's rows in a global batch, in the order it feeds
            them (default: all; several processes: see :func:`local_rows`).
        seed: the shuffle seed.
        shuffle: shuffle and repeat forever (training); ``False`` reads the windows once, in
            order (evaluation).

    Raises:
        DataError: fewer windows than one global batch.

    Example:
        >>> import numpy as np
        >>> from meshpar.train.files import Windows
        >>> windows = Windows((np.arange(1000, dtype=np.uint16),), ("a.bin",), seq_len=8)
        >>> data = ShardedBatches(windows, batch_size=16, seed=0)
        >>> it = data.iterator()
        >>> batch = next(it)
        >>> batch["inputs"].shape, batch["inputs"].dtype, batch["targets"].shape
        ((16, 8), dtype('int32'), (16, 8))
        >>> state = it.get_state()                # save it; data.iterator(state) resumes
        >>> state
        {'next_index': 1}
    """

    def __init__(self, windows: Windows, *, batch_size: int, rows: Sequence[int] | None = None,
                 seed: int = 0, shuffle: bool = True):
        if not is_int(batch_size, minimum=1):
            raise DataError(f"ShardedBatches: batch_size={batch_size!r} must be an int >= 1")
        if len(windows) < batch_size:
            raise DataError(
                f"the data has {len(windows)} windows of --seq-len {windows.seq_len} + 1 tokens, "
                f"fewer than one batch of --batch-size {batch_size}; use more data, a shorter "
                "--seq-len or a smaller --batch-size"
            )
        rows = np.arange(batch_size) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or len(rows) == 0 or rows.min() < 0 or rows.max() >= batch_size:
            raise DataError(f"ShardedBatches: rows must be positions in [0, {batch_size})")
        self.windows = windows
        self.batch_size = batch_size
        self.rows = rows
        ds = grain.MapDataset.source(windows)
        if shuffle:
            ds = ds.shuffle(seed=seed).repeat()
        self._ds = (_RowsOfBatches(ds, batch_size, rows)
                    .batch(len(rows), drop_remainder=True).map(_inputs_targets))

    @property
    def num_batches(self) -> int | None:
        """Global batches in one pass (``None`` when shuffled: the batches never end)."""
        return len(self._ds) if len(self._ds) < 2**40 else None

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``index`` (random access)."""
        return self._ds[index]

    def iterator(self, state: dict[str, Any] | None = None) -> grain.DatasetIterator:
        """A Grain iterator from the start, or from a saved ``get_state()``.

        Example:
            >>> import numpy as np
            >>> from meshpar.train.files import Windows
            >>> windows = Windows((np.arange(1000, dtype=np.uint16),), ("a.bin",), seq_len=8)
            >>> data = ShardedBatches(windows, batch_size=16, seed=0)
            >>> it = data.iterator()
            >>> first, saved_state = next(it), it.get_state()
            >>> second = next(it)
            >>> resumed = data.iterator(saved_state)
            >>> bool((next(resumed)["inputs"] == second["inputs"]).all())
            True
        """
        it = iter(self._ds.to_iter_dataset(_READ))
        if state is not None:
            it.set_state(state)
        return it
