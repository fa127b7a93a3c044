"""A host batch as the train step takes it: a pytree of arrays with one leading batch dimension.

:func:`batch_arrays` checks a batch before anything is placed or traced, naming the key of a
leaf that is not an array, has no batch dimension, or disagrees with the others on the batch
size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from meshpar.errors import StrategyError


def batch_arrays(batch: Mapping[str, Any]) -> tuple[list[Any], Any, int]:
    """The leaves of a host batch (NumPy arrays, or ``jax.ShapeDtypeStruct``s kept as they are),
    its tree structure and its number of rows, after checking that every leaf is an array with
    one leading batch dimension of one common size (a :class:`StrategyError` naming the key).

    Example:
        >>> arrays, treedef, rows = batch_arrays({"x": np.zeros((16, 8)), "y": np.zeros(16)})
        >>> rows
        16
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    if not leaves:
        raise StrategyError("the batch is empty: it has no arrays")
    arrays, rows = [], {}
    for path, leaf in leaves:
        key = jax.tree_util.keystr(path) or "<batch>"
        if isinstance(leaf, jax.ShapeDtypeStruct):
            x = leaf
        else:
            try:
                x = np.asarray(leaf)
            except Exception as err:  # noqa: BLE001 - whatever NumPy refuses
                raise StrategyError(
                    f"batch leaf {key} is a {type(leaf).__name__}, not an array ({err})"
                ) from None
            if x.dtype == object:
                raise StrategyError(f"batch leaf {key} is a {type(leaf).__name__}, not an array")
        if len(x.shape) == 0:
            raise StrategyError(
                f"batch leaf {key} is a scalar; every leaf needs a leading batch dimension "
                "(give per-example values, or close over constants in loss_fn)"
            )
        rows.setdefault(x.shape[0], []).append(key)
        arrays.append(x)
    if len(rows) > 1:
        sizes = ", ".join(f"{keys[0]}: {n}" for n, keys in sorted(rows.items()))
        raise StrategyError(
            f"batch leaves disagree on the batch size (first dimension): {sizes}; every "
            "leaf needs one row per example"
        )
    return arrays, treedef, arrays[0].shape[0]
