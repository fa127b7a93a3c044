"""Parameters placed by rules, and created directly in their shardings.

``plan_params`` reads each parameter's logical axes (NNX ``out_sharding`` metadata, Linen
``LogicallyPartitioned`` names, or a path rule), resolves them through :class:`~meshpar.sharding.rules.Rules`
and returns the shardings together with a :class:`ShardingPlan` that records how every parameter
was placed. ``init_nnx`` / ``init_linen`` then run the model's own initialiser under ``jax.jit``
with those ``out_shardings``, so every device only ever materialises its own shard: ``eval_shape``
→ specs → jit. Values equal an unsharded init with the same seed (JAX's threefry is
partitionable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshpar.errors import RuleError, UnannotatedParameterError
from meshpar.keypath import path_str
from meshpar.mesh import check_mesh
from meshpar.sharding.rules import LogicalAxes, Resolution, Rules


class Source(enum.Enum):
    """Where a placement's logical axes came from (its ``value`` is how reports name it)."""

    ANNOTATION = "annotation"
    #: The annotation names the mesh's axes (or is a ``PartitionSpec``).
    MESH_AXES = "mesh-axis annotation"
    #: A path rule matched (:attr:`ParamPlacement.path_rule` is its pattern).
    PATH_RULE = "path rule"
    #: Non-parameter state without axes (replicated without a fallback).
    STATE = "state"
    #: A parameter with no axes and no matching path rule (replicated, a fallback).
    UNANNOTATED = "unannotated"

    def label(self, path_rule: str | None = None) -> str:
        """How reports and errors name it; a path rule with its pattern."""
        return f"{self.value} {path_rule!r}" if self is Source.PATH_RULE else self.value


@dataclasses.dataclass(frozen=True)
class ParamPlacement:
    """How one parameter (or other state leaf) was placed."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    logical: LogicalAxes | None
    source_kind: Source
    resolution: Resolution
    sharding: NamedSharding
    path_rule: str | None = None  # the matching path rule's pattern (Source.PATH_RULE)

    @property
    def source(self) -> str:
        """The source as reports print it: ``"annotation"``, ``"mesh-axis annotation"``,
        ``"path rule '<regex>'"``, ``"unannotated"`` or ``"state"``."""
        return self.source_kind.label(self.path_rule)

    @property
    def spec(self) -> PartitionSpec:
        return self.resolution.spec

    @property
    def per_device_shape(self) -> tuple[int, ...]:
        return tuple(self.sharding.shard_shape(self.shape))

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def bytes_total(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def bytes_per_device(self) -> int:
        return math.prod(self.per_device_shape) * self.itemsize

    @property
    def replicated(self) -> bool:
        return self.bytes_per_device == self.bytes_total and self.sharding.mesh.size > 1


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """The placement of every leaf of a model's state on one mesh."""

    mesh: Mesh
    rules: Rules
    entries: tuple[ParamPlacement, ...]

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """Every replication the rules did not ask for: indivisible dims, unannotated params and
        logical names that no rule maps (see :attr:`unmatched`)."""
        out = []
        for e in self.entries:
            out += [f"{e.path}: {f} -> replicated" for f in e.resolution.fallbacks]
            if e.source_kind is Source.UNANNOTATED:
                out.append(f"{e.path}: no logical axes and no path rule -> replicated")
            out += [
                f"{e.path}: logical axis {name!r} ({e.source}) has no rule -> replicated; add a "
                f"rule ({name!r}, <mesh axis>) or ({name!r}, None)"
                for name in e.resolution.unmatched
            ]
        return tuple(out)

    @property
    def unmatched(self) -> dict[str, tuple[str, ...]]:
        """``{logical name: parameter paths}`` for every name that no rule maps (replicated).

        Example:
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.sharding.rules import Rules
            >>> class KeyValue(nnx.Module):
            ...     def __init__(self, rngs):
            ...         normal, axes = nnx.initializers.normal(0.02), ("embed", "kv_heads")
            ...         self.wk = nnx.Param(normal(rngs.params(), (64, 2)), out_sharding=axes)
            ...         self.wv = nnx.Param(normal(rngs.params(), (64, 2)), out_sharding=axes)
            >>> with nnx.use_eager_sharding(False):
            ...     _, state = nnx.split(nnx.eval_shape(lambda: KeyValue(nnx.Rngs(0))))
            >>> rules = Rules.table([("embed", "fsdp")])           # nothing for kv_heads
            >>> _, plan = plan_nnx_state(state, mesh=make_mesh(fsdp=8), rules=rules)
            >>> plan.unmatched
            {'kv_heads': ('wk', 'wv')}
        """
        out: dict[str, list[str]] = {}
        for e in self.entries:
            for name in e.resolution.unmatched:
                out.setdefault(name, []).append(e.path)
        return {name: tuple(paths) for name, paths in out.items()}

    @property
    def bytes_total(self) -> int:
        return sum(e.bytes_total for e in self.entries)

    @property
    def bytes_per_device(self) -> int:
        return sum(e.bytes_per_device for e in self.entries)

    def __getitem__(self, path: str) -> ParamPlacement:
        for e in self.entries:
            if e.path == path:
                return e
        raise KeyError(path)


# Typed PRNG keys (nnx.Rngs state, dtype 'key<fry>') have no NumPy dtype: their size is that of
# their uint32 payload (two words for threefry), recorded by name when a placement is made.
_KEY_ITEMSIZE: dict[str, int] = {}


def _itemsize(dtype_name: str) -> int:
    return _KEY_ITEMSIZE.get(dtype_name) or np.dtype(dtype_name).itemsize


def _dtype_name(dtype: Any) -> str:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        _KEY_ITEMSIZE[str(dtype)] = int(math.prod(dtype._impl.key_shape)) * 4
        return str(dtype)
    return np.dtype(dtype).name


def _place(
    path: str,
    shape: tuple[int, ...],
    dtype: Any,
    logical: LogicalAxes | None,
    *,
    is_param: bool,
    mesh: Mesh,
    rules: Rules,
    skip_axes: Sequence[str],
) -> ParamPlacement:
    source, path_rule = Source.ANNOTATION, None
    if logical is not None and (
        isinstance(logical, PartitionSpec)
        or any(n in mesh.axis_names for a in logical
               for n in ((a,) if isinstance(a, str) else a or ()))
    ):
        source = Source.MESH_AXES
    if logical is None:
        match = rules.path_axes(path) if is_param else None
        if match is not None:
            rule, logical = match
            source, path_rule = Source.PATH_RULE, rule.pattern
        elif not is_param:
            source = Source.STATE
        else:
            if rules.strict:
                raise UnannotatedParameterError(
                    f"parameter {path} (shape {shape}) has no logical axes and no path rule "
                    "matches it; annotate it (nnx.Param(..., out_sharding=(...)) or "
                    "nn.with_logical_partitioning) or add a path rule, e.g. "
                    f"Rules.table(..., paths=[({path.split('/')[-1]!r}, {(None,) * len(shape)})])"
                )
            source = Source.UNANNOTATED
    axes = logical if logical is not None else (None,) * len(shape)
    if len(axes) != len(shape):
        raise RuleError(
            f"parameter {path} has shape {shape} (rank {len(shape)}) but {len(axes)} logical "
            f"axes {tuple(axes)} ({source.label(path_rule)})"
        )
    resolution = rules.resolve(axes, shape, mesh, name=path, skip_axes=skip_axes)
    return ParamPlacement(
        path, shape, _dtype_name(dtype), _plain_axes(logical), source, resolution,
        NamedSharding(mesh, resolution.spec), path_rule=path_rule,
    )


def _plain_axes(logical: Any) -> LogicalAxes | None:
    # A PartitionSpec is kept as such while placing (it marks a mesh-axis annotation), and
    # recorded as a plain tuple: entries are names, tuples of names or None.
    if logical is None:
        return None
    return tuple(a if a is None or isinstance(a, str) else tuple(a) for a in logical)


def _annotation(names: Any, *, path: str) -> LogicalAxes | PartitionSpec | None:
    """Logical axes from sharding metadata: a sequence of names / tuples of names / None, or a
    ``PartitionSpec`` whose entries are mesh axis names (kept, so the source says so)."""
    if names is None:
        return None
    if isinstance(names, PartitionSpec):
        return names
    if isinstance(names, NamedSharding):
        # A concrete sharding fixes the mesh too; meshpar places on its own mesh by the spec.
        return names.spec
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise RuleError(
            f"parameter {path}: sharding metadata {names!r} is not a sequence of axis names; "
            "annotate with a tuple such as ('embed', 'mlp') or a PartitionSpec"
        )
    return tuple(names)


def _nnx_logical(variable: nnx.Variable, *, path: str = "") -> LogicalAxes | PartitionSpec | None:
    meta = variable.get_metadata()
    # 'out_sharding' is the current key; the two older ones still work in flax 0.12 with a warning.
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            return _annotation(names, path=path)
    return None


def plan_nnx_state(
    state: nnx.State, /, *, mesh: Mesh, rules: Rules, skip_axes: Sequence[str] = ()
) -> tuple[nnx.State, ShardingPlan]:
    """Shardings for an (abstract) NNX state, and the plan that explains them.

    Returns:
        ``(shardings, plan)``: ``shardings`` has the structure of ``state`` with a
        ``NamedSharding`` in place of each array, ready for ``jax.jit(out_shardings=...)``.

    Example:
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset
        >>> from meshpar.sharding.strategy import get_strategy
        >>> mesh = make_mesh(fsdp=4, tensor=2)
        >>> rules = get_strategy("zero3").param_rules(mesh)
        >>> with nnx.use_eager_sharding(False):   # abstract: nothing is allocated
        ...     graphdef, state = nnx.split(nnx.eval_shape(
        ...         lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0))))
        >>> shardings, plan = plan_nnx_state(state, mesh=mesh, rules=rules)
        >>> shardings["tok_embed"].spec                    # ("vocab", "embed")
        P('tensor', 'fsdp')
        >>> len(plan.entries), plan.fallbacks
        (16, ())
    """
    rules.validate(mesh)
    entries: list[ParamPlacement] = []

    def one(path, variable):
        value = variable.get_value()
        entry = _place(
            path_str(path), tuple(value.shape), value.dtype,
            _nnx_logical(variable, path=path_str(path)),
            is_param=isinstance(variable, nnx.Param), mesh=mesh, rules=rules, skip_axes=skip_axes,
        )
        entries.append(entry)
        return variable.replace(entry.sharding)

    shardings = jax.tree_util.tree_map_with_path(
        one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return shardings, ShardingPlan(mesh, rules, tuple(entries))


def _no_mesh_context() -> contextlib.AbstractContextManager:
    # Under a user's `jax.set_mesh(...)`, nnx.eval_shape turns every variable's metadata into a
    # NamedSharding on that mesh and rejects logical names ("Resource axis: embed ... is not
    # found in mesh"). meshpar resolves the names itself, so the model is built with no mesh.
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))


def init_nnx(
    factory: Callable[[], nnx.Module], /, *, mesh: Mesh, rules: Rules
) -> tuple[nnx.Module, ShardingPlan]:
    """Build an NNX module with every variable created directly in its sharding.

    Args:
        factory: a no-argument callable that builds the module (it owns its ``nnx.Rngs``).
        mesh: the device mesh.
        rules: the parameter rules.

    Returns:
        ``(model, plan)``: the module holding sharded arrays, and how each was placed.

    Raises:
        MeshError: the mesh has Manual axes. Explicit axes are fine here: the arrays are placed
            on ``mesh`` and keep its axis types (see :mod:`meshpar.mesh`).

    Example:
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset
        >>> from meshpar.sharding.strategy import get_strategy
        >>> mesh = make_mesh(fsdp=4, tensor=2)
        >>> rules = get_strategy("zero3").param_rules(mesh)
        >>> model, plan = init_nnx(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
        ...                        mesh=mesh, rules=rules)
        >>> model.tok_embed[...].sharding.spec
        P('tensor', 'fsdp')
    """
    check_mesh(mesh, caller="init_nnx")
    with nnx.use_eager_sharding(False), _no_mesh_context():
        abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings, plan = plan_nnx_state(abstract_state, mesh=mesh, rules=rules)

    def build():
        with nnx.use_eager_sharding(False):
            return nnx.split(factory())[1]

    with _no_mesh_context():
        state = jax.jit(build, out_shardings=shardings)()
    return nnx.merge(graphdef, state), plan


def plan_linen(
    boxed: Any, /, *, mesh: Mesh, rules: Rules, skip_axes: Sequence[str] = ()
) -> tuple[Any, ShardingPlan]:
    """Shardings for (abstract) Linen variables boxed with ``nn.with_logical_partitioning``.

    Returns:
        ``(shardings, plan)``, ``shardings`` shaped like the *unboxed* variables.
    """
    rules.validate(mesh)
    entries: list[ParamPlacement] = []
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731

    def one(path, leaf):
        names = (_annotation(leaf.names, path=path_str(path))
                 if isinstance(leaf, nn.Partitioned) else None)
        value = leaf.unbox() if is_box(leaf) else leaf
        collection = path_str(path[:1])
        entry = _place(
            path_str(path), tuple(value.shape), value.dtype, names,
            is_param=collection == "params", mesh=mesh, rules=rules, skip_axes=skip_axes,
        )
        entries.append(entry)
        return entry.sharding

    shardings = jax.tree_util.tree_map_with_path(one, boxed, is_leaf=is_box)
    return shardings, ShardingPlan(mesh, rules, tuple(entries))


def init_linen(
    module: nn.Module, rng: jax.Array, /, *args: Any, mesh: Mesh, rules: Rules
) -> tuple[Any, ShardingPlan]:
    """Initialise a Linen module with every variable created directly in its sharding.

    Args:
        module: the Linen module (annotated with ``nn.with_logical_partitioning``).
        rng: the init PRNG key.
        *args: example inputs for ``module.init``.
        mesh: the device mesh (Auto, Explicit or mixed axes: only ``out_shardings`` use it).
        rules: the parameter rules.

    Returns:
        ``(variables, plan)``: unboxed variables holding sharded arrays, and the plan.

    Example:
        >>> import flax.linen as nn
        >>> import jax.numpy as jnp
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.sharding.rules import Rules
        >>> class MLP(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         init = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
        ...                                             ("embed", "mlp"))
        ...         return nn.Dense(256, kernel_init=init, use_bias=False)(x)
        >>> mesh = make_mesh(fsdp=4, tensor=2)
        >>> rules = Rules.table([("embed", "fsdp"), ("mlp", "tensor")])
        >>> x = jnp.ones((8, 64))
        >>> variables, plan = init_linen(MLP(), jax.random.key(0), x, mesh=mesh, rules=rules)
        >>> variables["params"]["Dense_0"]["kernel"].sharding.spec
        P('fsdp', 'tensor')
    """
    check_mesh(mesh, caller="init_linen")
    abstract = jax.eval_shape(module.init, rng, *args)
    shardings, plan = plan_linen(abstract, mesh=mesh, rules=rules)
    init = jax.jit(lambda r, *a: nn.meta.unbox(module.init(r, *a)), out_shardings=shardings)
    return init(rng, *args), plan


def abstract_nnx(factory: Callable[[], nnx.Module], /) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``nnx.split(model, nnx.Param, ...)`` of the module ``factory`` would build, allocating nothing.

    Returns:
        ``(graphdef, params, rest)`` with ``jax.ShapeDtypeStruct`` values.

    Example:
        >>> from flax import nnx
        >>> from meshpar.models import GPT, get_preset
        >>> graphdef, params, rest = abstract_nnx(lambda: GPT(get_preset("tiny"),
        ...                                                   rngs=nnx.Rngs(0)))
        >>> params["tok_embed"].get_value()
        ShapeDtypeStruct(shape=(256, 64), dtype=float32)
        >>> len(jax.tree.leaves(rest))                     # no batch statistics, no RNG state
        0
    """
    with nnx.use_eager_sharding(False), _no_mesh_context():
        return nnx.split(nnx.eval_shape(factory), nnx.Param, ...)
