"""The state a step reads and writes (:class:`TrainState`), and how it leaves the devices: typed
PRNG keys as their integer payload, leaves named by path."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from meshpar.keypath import path_str


def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def is_prng_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def named_leaves(state: Any) -> list[tuple[str, Any]]:
    """``(path, Variable)`` of every leaf of an NNX state."""
    return [(path_str(path), v) for path, v in
            jax.tree_util.tree_flatten_with_path(state, is_leaf=is_variable)[0]]


def describe_state(leaves: list[tuple[str, Any]], limit: int = 4) -> str:
    names = [f"{path} ({type(v).__name__})" for path, v in leaves]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def keys_to_data(tree: Any) -> Any:
    # Typed PRNG keys (nnx.Rngs state) travel as their uint32 payload: checkpoint formats and
    # host transfers know plain integer arrays only.
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, tree)


def data_to_keys(tree: Any, template: Any) -> Any:
    def one(x, t):
        t = t.get_value() if is_variable(t) else t
        return jax.random.wrap_key_data(x, impl=t.dtype._impl) if is_prng_key(t) else x

    return jax.tree.map(one, tree, template)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step reads and writes: a pytree, donated to the step."""

    step: jax.Array
    params: nnx.State
    rest: nnx.State  # non-parameter model state (RNG counters, batch stats, ...)
    opt_state: Any
