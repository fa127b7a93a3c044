"""The active activation layout, and :func:`constrain` for use inside models.

Models annotate activations with logical names (``constrain(x, ("batch", "seq", "embed"))``);
the layout that is active while the model is *traced* says which mesh and which compute rules
those names resolve through. meshpar's train step activates the strategy's layout inside the
function it jits, so a layout never leaks from one compiled program into another.

Outside any layout (a plain single-device run), :func:`constrain` returns its input unchanged:
there is no mesh to constrain to, and the same model code must run unsharded.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshpar.sharding.rules import Rules


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh, the compute rules activation names resolve through, and an optional pipeline.

    ``pipeline`` is a :class:`meshpar.parallel.schedule.PipelineConfig` when the layer stack runs as
    pipeline stages (see :func:`meshpar.parallel.stack.scan_layers`).
    """

    mesh: Mesh
    rules: Rules
    pipeline: Any = None

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int], *,
             name: str = "activation") -> PartitionSpec:
        """The PartitionSpec of an activation, leaving out axes that are manual here."""
        return self.rules.resolve(
            logical_axes, shape, self.mesh, name=name, skip_axes=manual_axes()
        ).spec


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("meshpar_layout", default=None)


def manual_axes() -> tuple[str, ...]:
    """The mesh axes that are manual in the current trace (in a partial-manual ``shard_map``)."""
    # Inside a partial-manual shard_map (the pipeline), the manual axes cannot appear in a
    # sharding constraint; the abstract mesh in context tells which they are.
    abstract = jax.sharding.get_abstract_mesh()
    if abstract is None or abstract.empty:
        return ()
    return tuple(getattr(abstract, "manual_axes", ()))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules, /, *, pipeline: Any = None) -> Iterator[Layout]:
    """Make ``(mesh, rules)`` the layout that :func:`constrain` resolves through.

    Use it *inside* the function you jit, so the layout belongs to that trace.

    Example:
        >>> import jax.numpy as jnp
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.sharding.rules import Rules
        >>> mesh = make_mesh(data=8)
        >>> rules = Rules.table([("batch", "data"), ("embed", None)])
        >>> @jax.jit
        ... def step(x):
        ...     with activate(mesh, rules):     # a model's constrain() calls resolve here
        ...         return constrain(jnp.tanh(x), ("batch", "embed"))
        >>> step(jnp.ones((8, 4))).sharding.spec
        P('data',)
    """
    rules.validate(mesh)
    token = _ACTIVE.set(Layout(mesh, rules, pipeline))
    try:
        with _own_mesh_context(mesh):
            yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def _own_mesh_context(mesh: Mesh) -> contextlib.AbstractContextManager:
    # A caller's `jax.set_mesh(m)` around meshpar's step (Flax's Gemma example sets its mesh,
    # Explicit, for the whole run) makes JAX check every traced op against m's axis types:
    # "context mesh ... (Explicit, Explicit) should match the aval mesh ... (Auto, Auto)". The
    # step's arrays live on meshpar's mesh, so its trace runs under that mesh instead. Without a
    # caller's mesh, or inside a shard_map (manual axes), nothing changes.
    current = jax.sharding.get_abstract_mesh()
    if current is None or current.empty or current.manual_axes or current == mesh.abstract_mesh:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def active_layout() -> Layout | None:
    """The layout made active by :func:`activate`, or ``None``."""
    return _ACTIVE.get()


def constrain(
    x: jax.Array, logical_axes: Sequence[str | tuple[str, ...] | None], /
) -> jax.Array:
    """Constrain an activation (or a weight about to be used) to its logical layout.

    Args:
        x: the array, inside a traced function.
        logical_axes: one logical name, tuple of names or ``None`` per dimension of ``x``;
            mesh-axis names (``("fsdp", None, "tensor")``) resolve through the compute rules too.

    Returns:
        ``x`` with a sharding constraint from the active layout, or ``x`` itself when no layout
        is active.

    Raises:
        RuleError: wrong number of names; IndivisibleError: a dimension does not divide.

    Example:
        >>> import jax.numpy as jnp
        >>> h = jnp.ones((8, 16, 64))
        >>> constrain(h, ("batch", "seq", "embed")) is h   # no active layout: unchanged
        True

        Under :func:`activate` (inside the function meshpar jits) the same call adds a sharding
        constraint.
    """
    layout = _ACTIVE.get()
    if layout is None:
        return x
    spec = layout.spec(logical_axes, x.shape)
    abstract = jax.sharding.get_abstract_mesh()
    mesh = abstract if (abstract is not None and not abstract.empty and abstract.manual_axes) else layout.mesh
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
