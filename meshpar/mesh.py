"""Named device meshes.

meshpar builds every mesh with **Auto** axis types. Auto axes let XLA's sharding propagation
(GSPMD/Shardy) place the intermediates that nobody annotated, let ``with_sharding_constraint``
move data between layouts, work with Flax Linen (whose init fails under Explicit axes) and compose
with partial-manual ``shard_map`` for pipelines. Explicit axes would turn every constraint into an
assert and make contractions over doubly-sharded dimensions raise; meshpar's own rules already
decide every parameter and activation layout, so it gains nothing from them.

Meshes built elsewhere (``jax.make_mesh`` defaults to **Explicit** axes) are accepted like this:

* **Placement** (:func:`meshpar.init_nnx`, :func:`meshpar.init_linen`, the ``plan_*``
  functions) only hands ``out_shardings`` to ``jax.jit``, which axis types do not affect: the
  arrays are placed on the mesh given, Explicit, mixed or Auto, and keep its axis types.
* **Training** (:class:`meshpar.Trainer`) traces meshpar's own step, whose sharding constraints,
  partial-manual ``shard_map`` regions and unannotated intermediates need Auto axes (under
  Explicit axes ``with_sharding_constraint`` rejects them: "can only refer to Auto axes of the
  mesh"). :func:`auto_mesh` gives the Trainer an Auto mesh over the same devices, in the same
  order, with the same axis names and sizes, and says so with a :class:`MeshparWarning`; the
  layout is unchanged. A model that relies on Explicit axes while it is traced (``out_sharding=``
  arguments to Flax layers or ``jnp.einsum``, ``jax.sharding.reshard``) cannot run under Auto
  axes; its first step raises one :class:`~meshpar.errors.MeshError` naming the call to change
  (see :mod:`meshpar.sharding.explicit`).
  A caller's ``jax.set_mesh(explicit_mesh)`` around the Trainer (Flax's Gemma example sets its
  mesh for the whole run) is fine too: meshpar's step traces under its own mesh
  (:func:`meshpar.activate`).
* **Manual** axes belong inside a ``shard_map``; a mesh with them is a :class:`MeshError`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from meshpar.axes import MESH_AXES
from meshpar.errors import MeshError, MeshparWarning

#: The mesh axes meshpar's strategies know, in the order meshpar lays them out by default
#: (outermost first: the innermost axis gets neighbouring devices, which is where tensor parallel
#: traffic wants to be).
KNOWN_AXES = MESH_AXES

_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_mesh(text: str, /) -> dict[str, int]:
    """Parse the CLI form of a mesh, ``"data=2,fsdp=2,tensor=2"``.

    Args:
        text: comma-separated ``axis=size`` pairs; a size of ``-1`` means "the remaining devices".

    Returns:
        An ordered dict of axis name to size.

    Raises:
        MeshError: malformed text, a bad axis name, a repeated axis or a bad size.

    Example:
        >>> parse_mesh("data=2,tensor=-1")
        {'data': 2, 'tensor': -1}
    """
    axes: dict[str, int] = {}
    if not text.strip():
        raise MeshError("mesh spec is empty; expected e.g. 'data=2,fsdp=2,tensor=2'")
    for part in text.split(","):
        name, sep, size = part.strip().partition("=")
        name = name.strip()
        if not sep or not name:
            raise MeshError(f"mesh spec {text!r}: {part.strip()!r} is not of the form axis=size")
        try:
            value = int(size)
        except ValueError:
            raise MeshError(
                f"mesh spec {text!r}: size {size.strip()!r} of axis {name!r} is not an integer"
            ) from None
        if name in axes:
            raise MeshError(f"mesh spec {text!r}: axis {name!r} is given twice")
        axes[name] = value
    _check_axes(axes)
    return axes


def _check_axes(axes: Mapping[str, int]) -> None:
    for name, size in axes.items():
        if not isinstance(name, str) or not _AXIS_NAME.match(name):
            raise MeshError(f"mesh axis name {name!r} is not a valid identifier")
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise MeshError(f"mesh axis {name!r} has size {size!r}; sizes are ints >= 1 or -1")
    if sum(1 for size in axes.values() if size == -1) > 1:
        raise MeshError(f"mesh {dict(axes)}: at most one axis may have size -1")


def resolve_sizes(axes: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Fill in a ``-1`` size and check that the sizes multiply to ``device_count``.

    Raises:
        MeshError: the product does not match the number of devices.
    """
    _check_axes(axes)
    sizes = dict(axes)
    fixed = math.prod(size for size in sizes.values() if size != -1)
    wild = [name for name, size in sizes.items() if size == -1]
    if wild:
        if device_count % fixed:
            raise MeshError(
                f"mesh {dict(axes)}: the fixed axes multiply to {fixed}, which does not divide "
                f"the {device_count} devices, so axis {wild[0]!r}=-1 cannot take the rest"
            )
        sizes[wild[0]] = device_count // fixed
    product = math.prod(sizes.values())
    if product != device_count:
        raise MeshError(
            f"mesh {dict(axes)} has {product} devices (product of the axis sizes) but "
            f"{device_count} devices are available; make the sizes multiply to {device_count} "
            "or give one axis the size -1 to take the rest"
        )
    return sizes


def make_mesh(
    axes: Mapping[str, int] | str | None = None,
    /,
    *,
    devices: Sequence[jax.Device] | None = None,
    **sizes: int,
) -> Mesh:
    """Build a :class:`jax.sharding.Mesh` with Auto axes from named sizes.

    Axes may be given as a mapping, as the CLI string or as keywords; their order is the mesh's
    axis order (outermost first). Any axis name is allowed; ``data``, ``fsdp``, ``tensor`` and
    ``pipe`` are the ones meshpar's strategies use.

    Args:
        axes: a mapping or ``"data=2,tensor=4"`` string; alternative to keywords.
        devices: the devices to use (default: all of ``jax.devices()``).
        **sizes: axis sizes as keywords, e.g. ``data=2, fsdp=-1``.

    Returns:
        A mesh whose axis types are all ``AxisType.Auto``.

    Raises:
        MeshError: no axes, a repeated axis, a bad size, or sizes that do not multiply to the
            number of devices.

    Example:
        >>> mesh = make_mesh(data=2, fsdp=2, tensor=2)   # on 8 devices
        >>> dict(mesh.shape)
        {'data': 2, 'fsdp': 2, 'tensor': 2}
    """
    if isinstance(axes, str):
        axes = parse_mesh(axes)
    merged: dict[str, int] = dict(axes or {})
    for name, size in sizes.items():
        if name in merged:
            raise MeshError(f"mesh axis {name!r} is given twice")
        merged[name] = size
    if not merged:
        raise MeshError("make_mesh needs at least one axis, e.g. make_mesh(data=-1)")
    devs = list(devices) if devices is not None else jax.devices()
    resolved = resolve_sizes(merged, len(devs))
    # jax.make_mesh orders devices by the physical topology on TPU/GPU (plain order on CPU).
    return jax.make_mesh(
        tuple(resolved.values()),
        tuple(resolved),
        axis_types=(AxisType.Auto,) * len(resolved),
        devices=devs,
    )


def format_mesh(mesh: Mesh, /) -> str:
    """The CLI form of a mesh, e.g. ``"data=2,fsdp=2,tensor=2"``."""
    return ",".join(f"{name}={size}" for name, size in mesh.shape.items())


def _types_text(mesh: Mesh) -> str:
    return ", ".join(f"{name}={size} {t.name}" for (name, size), t in
                     zip(mesh.shape.items(), mesh.axis_types))


def _fix(mesh: Mesh) -> str:
    return (
        f"build the mesh with mp.make_mesh({', '.join(f'{n}={s}' for n, s in mesh.shape.items())})"
        f" or jax.make_mesh(..., axis_types=(AxisType.Auto,) * {len(mesh.axis_names)})"
    )


def check_mesh(mesh: Mesh, /, *, caller: str = "meshpar") -> None:
    """Raise :class:`MeshError` unless ``mesh`` is a concrete mesh without Manual axes.

    Example:
        >>> check_mesh(make_mesh(data=-1), caller="init_nnx")
    """
    if not isinstance(mesh, Mesh):
        raise MeshError(
            f"{caller}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}; build one "
            "with mp.make_mesh(data=2, fsdp=-1)"
        )
    if any(t == AxisType.Manual for t in mesh.axis_types):
        raise MeshError(
            f"{caller}: the mesh has Manual axes ({_types_text(mesh)}); Manual axes exist only "
            f"inside a shard_map, and meshpar needs a mesh it can shard over: {_fix(mesh)}"
        )


def auto_mesh(mesh: Mesh, /, *, caller: str = "meshpar") -> Mesh:
    """``mesh`` with Auto axes: itself if it has only Auto axes, else the same devices, axis
    names and sizes with Auto axis types, announced with a :class:`MeshparWarning`.

    meshpar's train step needs Auto axes (see the module docstring); the layout meshpar computes
    is the same on either mesh, so the conversion changes no placement.

    Args:
        mesh: a :class:`jax.sharding.Mesh`, e.g. from ``jax.make_mesh`` (Explicit by default).
        caller: who asks, for the messages (``"Trainer"``).

    Returns:
        A mesh whose axis types are all ``AxisType.Auto``.

    Raises:
        MeshError: ``mesh`` is not a concrete ``Mesh``, or it has Manual axes.

    Example:
        >>> import warnings
        >>> explicit = jax.make_mesh((4, 2), ("fsdp", "tensor"))     # Explicit axes
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     auto_mesh(explicit, caller="Trainer").axis_types
        (Auto, Auto)
        >>> [w.category.__name__ for w in caught]
        ['MeshparWarning']
    """
    check_mesh(mesh, caller=caller)
    types = tuple(mesh.axis_types)
    if all(t == AxisType.Auto for t in types):
        return mesh
    warnings.warn(
        f"{caller}: the mesh has Explicit axes ({_types_text(mesh)}); meshpar trains on Auto "
        "axes and uses an Auto mesh over the same devices, axis names and sizes (the layout is "
        "the same). Code in the model that needs Explicit axes (out_sharding= arguments, "
        f"jax.sharding.reshard) will not trace. To silence this, {_fix(mesh)}",
        MeshparWarning,
        stacklevel=3,
    )
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(types))
