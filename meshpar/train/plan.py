"""The layout of a training run, worked out without compiling or allocating anything.

:func:`plan_training` is what :class:`meshpar.Trainer` does before it builds anything, and what
``meshpar inspect`` reports: the abstract model, the pipeline (when the mesh has a ``pipe`` axis),
and the shardings of parameters, gradients, optimizer state and non-parameter model state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshpar.axes import BATCH_AXES, DATA, PIPE
from meshpar.errors import StrategyError
from meshpar.parallel.pipeline import stack_stages, unstack_stages
from meshpar.parallel.schedule import PipelineConfig, Schedule, default_remat
from meshpar.sharding.placement import ShardingPlan, abstract_nnx, plan_nnx_state
from meshpar.sharding.strategy import Strategy
from meshpar.train.state import named_leaves


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _axes(v: Any) -> tuple:
    if not _is_var(v):
        return ()
    return tuple(v.get_metadata().get("out_sharding") or ())


def stack_state(abs_params: nnx.State, abs_rest: nnx.State, /) -> list[tuple[str, Any]]:
    """``(path, Variable)`` of the non-parameter state inside a layer stack: leaves under a module
    whose parameters carry a leading ``layers`` axis, with that many rows (RNG streams and batch
    statistics of the stacked layers).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from meshpar.sharding.placement import abstract_nnx
        >>> class Block(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.w = nnx.Param(jnp.zeros((16, 16)), out_sharding=("embed", "mlp"))
        ...         self.drop = nnx.Dropout(0.1, rngs=rngs)
        >>> class Model(nnx.Module):
        ...     def __init__(self, rngs):
        ...         @nnx.split_rngs(splits=4)
        ...         @nnx.vmap(in_axes=(0,), out_axes=0,
        ...                   transform_metadata={nnx.PARTITION_NAME: "layers"})
        ...         def make_blocks(rngs):
        ...             return Block(rngs)
        ...         self.blocks = make_blocks(rngs)
        >>> _, abs_params, abs_rest = abstract_nnx(lambda: Model(nnx.Rngs(0)))
        >>> [(path, type(v).__name__) for path, v in stack_state(abs_params, abs_rest)]
        [('blocks/drop/rngs/count', 'RngCount'), ('blocks/drop/rngs/key', 'RngKey')]
    """
    lengths = {path.split("/")[0]: v.get_value().shape[0] for path, v in named_leaves(abs_params)
               if _axes(v)[:1] == ("layers",)}
    return [(path, v) for path, v in named_leaves(abs_rest)
            if path.split("/")[0] in lengths
            and tuple(getattr(v.get_value(), "shape", ()))[:1] == (lengths[path.split("/")[0]],)]


def replicating_batch_axes(mesh: Mesh, /, *, zero_stage: int) -> tuple[str, ...]:
    """The mesh's batch axes that replicate the weights: ``data``, and ``fsdp`` below ZeRO-3.

    A pipeline runs them manual inside its stages (weight gradients summed once after the loop)
    unless its layer stack holds state (:func:`pipeline_config`).

    Example:
        >>> from meshpar.mesh import make_mesh
        >>> replicating_batch_axes(make_mesh(pipe=2, data=2, fsdp=2), zero_stage=1)
        ('data', 'fsdp')
    """
    return tuple(a for a in BATCH_AXES if a in mesh.shape and (a == DATA or zero_stage < 3))


def pipeline_config(abs_params: nnx.State, /, *, mesh: Mesh, microbatches: int,
                    schedule: Schedule | str, repeats: int, zero_stage: int = 0,
                    state_in_stack: Sequence[tuple[str, Any]] = (),
                    remat: bool | None = None):
    """The pipeline for a mesh with a ``pipe`` axis of size > 1 (else ``None``), and the depth.

    ``remat``: :attr:`PipelineConfig.remat`, ``None`` for the schedule's default
    (:func:`~meshpar.parallel.schedule.default_remat`).

    ``state_in_stack`` (from :func:`stack_state`): the layers' RNG streams and batch statistics,
    which the stages carry; the batch axes then stay automatic (see
    :mod:`meshpar.parallel.pipeline`, "State").

    Raises:
        StrategyError: no parameter has a leading ``layers`` axis (no repeated block), stacks
            disagree on their depth, or the depth does not split into ``stages × repeats``.
    """
    stages = mesh.shape.get(PIPE, 1)
    if stages == 1:
        return None, None
    lengths = {
        v.get_value().shape[0]
        for v in jax.tree.leaves(abs_params, is_leaf=_is_var)
        if _is_var(v) and _axes(v)[:1] == ("layers",)
    }
    if not lengths:
        raise StrategyError(
            f"the mesh has pipe={stages}, but the model has no repeated block: no parameter's "
            "first logical axis is 'layers'. Create the block stack with nnx.vmap and "
            "transform_metadata={nnx.PARTITION_NAME: 'layers'} and run it with "
            "meshpar.scan_layers, or drop the pipe axis"
        )
    if len(lengths) > 1:
        raise StrategyError(
            f"parameters with a leading 'layers' axis disagree on its size: {sorted(lengths)}"
        )
    config = PipelineConfig(
        stages=stages, microbatches=microbatches, schedule=schedule, repeats=repeats,
        remat=default_remat(schedule) if remat is None else remat,
        # The batch axes that replicate the weights run manual inside the stages, so weight
        # gradients are summed once after the loop instead of in every backward iteration (see
        # meshpar.parallel.pipeline). fsdp replicates them too below ZeRO-3; tensor stays automatic.
        # Not with state in the stack: dropout masks and batch statistics must cover the whole
        # microbatch, which only automatic axes see.
        batch_axes=() if state_in_stack else replicating_batch_axes(mesh, zero_stage=zero_stage),
    )
    num_layers = lengths.pop()
    config.layers_per_chunk(num_layers)
    return config, num_layers


def _stage_axes(pipeline) -> tuple[str, ...]:
    return ("stages",) if pipeline.repeats == 1 else ("repeats", "stages")


def to_stage_layout(params: nnx.State, pipeline, /) -> nnx.State:
    """``[layers, ...]`` stack parameters -> ``[(repeats,) stages, layers/chunk, ...]``."""
    def one(v):
        axes = _axes(v)
        if not (_is_var(v) and axes[:1] == ("layers",)):
            return v
        value = stack_stages(v.get_value(), stages=pipeline.stages, repeats=pipeline.repeats)
        return v.replace(value, out_sharding=(*_stage_axes(pipeline), *axes))

    return jax.tree.map(one, params, is_leaf=_is_var)


def to_flat_layout(params: nnx.State, pipeline, /) -> nnx.State:
    """The inverse of :func:`to_stage_layout`: the model's own ``[layers, ...]`` layout."""
    lead = len(_stage_axes(pipeline))

    def one(v):
        axes = _axes(v)
        if not (_is_var(v) and axes[:1] in (("stages",), ("repeats",))):
            return v
        value = unstack_stages(v.get_value(), stages=pipeline.stages, repeats=pipeline.repeats)
        return v.replace(value, out_sharding=axes[lead:])

    return jax.tree.map(one, params, is_leaf=_is_var)


def place_like_params(
    tree: Any, params_abstract: Any, param_shardings: Any, *, mesh: Mesh, what: str
) -> Any:
    """Shardings for a pytree whose array leaves mirror parameters (optimizer state).

    Each leaf is matched to the parameter whose key path is a suffix of the leaf's path and has
    the same shape; scalars (step counts) are replicated.

    Raises:
        StrategyError: a non-scalar leaf mirrors no parameter, so it cannot be placed.
    """
    by_path: dict[tuple, tuple[tuple[int, ...], NamedSharding]] = {}
    flat_p, _ = jax.tree_util.tree_flatten_with_path(params_abstract)
    flat_s = jax.tree_util.tree_leaves(param_shardings)
    for (path, leaf), sharding in zip(flat_p, flat_s):
        by_path[tuple(path)] = (tuple(leaf.shape), sharding)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        path = tuple(path)
        for i in range(len(path)):
            hit = by_path.get(path[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        if len(leaf.shape) == 0:
            return replicated
        raise StrategyError(
            f"{what} leaf {jax.tree_util.keystr(path)} with shape {tuple(leaf.shape)} mirrors no "
            "parameter, so the strategy cannot place it; use an optimizer whose state has the "
            "parameters' structure (optax transformations do) or place it yourself"
        )

    return jax.tree_util.tree_map_with_path(one, tree)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingPlan:
    """Everything about a run's layout, decided before anything is compiled.

    Attributes:
        strategy: the strategy as applied to this mesh (see :meth:`Strategy.for_mesh`).
        graphdef: the model's graph definition (split as ``nnx.Param, ...``).
        abs_params: abstract parameters in the layout the step uses (stage layout if pipelined).
        abs_rest: abstract non-parameter model state.
        pipeline: the :class:`~meshpar.parallel.schedule.PipelineConfig`, or ``None``.
        num_layers: depth of the pipelined stack (``None`` without a pipeline).
        params, gradients, optimizer: the :class:`ShardingPlan` of each.
        param_shardings, grad_shardings, rest_shardings: the shardings of each, as trees.
        abs_opt_state: abstract optimizer state (``None`` without an optimizer).
        opt_shardings: shardings of the optimizer state (``None`` without an optimizer).
        stack_state: ``(path, Variable)`` of the non-parameter state inside the layer stack
            (:func:`stack_state`), which a pipeline's stages carry.

    Built with keywords only (fifteen fields: a positional call is too easy to get wrong).
    """

    strategy: Strategy
    graphdef: Any
    abs_params: nnx.State
    abs_rest: nnx.State
    pipeline: Any
    num_layers: int | None
    params: ShardingPlan
    param_shardings: Any
    gradients: ShardingPlan
    grad_shardings: Any
    optimizer: ShardingPlan
    rest_shardings: Any
    abs_opt_state: Any
    opt_shardings: Any
    stack_state: tuple = ()


def plan_training(
    make_model: Callable[[], nnx.Module],
    /,
    *,
    mesh: Mesh,
    strategy: Strategy,
    tx: optax.GradientTransformation | None = None,
    microbatches: int = 1,
    schedule: Schedule | str = "gpipe",
    repeats: int = 1,
    offload_optimizer: bool = False,
    pipeline_remat: bool | None = None,
) -> TrainingPlan:
    """Work out where every parameter, gradient and optimizer-state leaf lives.

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset
        >>> from meshpar.sharding.strategy import get_strategy
        >>> make_model = lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0))
        >>> plan = plan_training(make_model, mesh=make_mesh(fsdp=4, tensor=2),
        ...                      strategy=get_strategy("zero3"), tx=optax.adamw(1e-3))
        >>> plan.params.bytes_total, plan.params.bytes_per_device   # fp32: 4 x param_count()
        (472064, 61184)
    """
    strategy = strategy.for_mesh(mesh)
    graphdef, abs_params, abs_rest = abstract_nnx(make_model)
    in_stack = tuple(stack_state(abs_params, abs_rest))
    pipeline, num_layers = pipeline_config(
        abs_params, mesh=mesh, microbatches=microbatches, schedule=schedule, repeats=repeats,
        zero_stage=strategy.zero_stage, state_in_stack=in_stack, remat=pipeline_remat,
    )
    if pipeline is not None:
        abs_params = jax.eval_shape(lambda p: to_stage_layout(p, pipeline), abs_params)
    param_rules = strategy.param_rules(mesh)
    param_shardings, params = plan_nnx_state(abs_params, mesh=mesh, rules=param_rules)
    rest_shardings, _ = plan_nnx_state(abs_rest, mesh=mesh, rules=param_rules)
    grad_shardings, gradients = plan_nnx_state(
        abs_params, mesh=mesh, rules=strategy.gradient_rules(mesh)
    )
    opt_param_shardings, optimizer = plan_nnx_state(
        abs_params, mesh=mesh, rules=strategy.optimizer_rules(mesh)
    )
    abs_opt = opt_shardings = None
    if tx is not None:
        abs_opt = jax.eval_shape(tx.init, abs_params)
        opt_shardings = place_like_params(
            abs_opt, abs_params, opt_param_shardings, mesh=mesh, what="optimizer state"
        )
        if offload_optimizer:
            opt_shardings = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_shardings)
    return TrainingPlan(
        strategy=strategy, graphdef=graphdef, abs_params=abs_params, abs_rest=abs_rest,
        pipeline=pipeline, num_layers=num_layers, params=params, param_shardings=param_shardings,
        gradients=gradients, grad_shardings=grad_shardings, optimizer=optimizer,
        rest_shardings=rest_shardings, abs_opt_state=abs_opt, opt_shardings=opt_shardings,
        stack_state=in_stack,
    )


def unused_mesh_axes(plan: TrainingPlan, mesh: Mesh, /) -> tuple[str, ...]:
    """The mesh axes of size > 1 that nothing in a planned training run uses.

    An axis is used when it splits the batch (:meth:`Strategy.batch_axes`), carries the stages of
    an active pipeline (``pipe``), appears in the ``PartitionSpec`` of a planned parameter,
    gradient, optimizer-state or non-parameter-state sharding, or is named by a rule of the
    strategy's compute (activation) rules. Along any other axis every device would hold the same
    data and repeat the same work.

    Args:
        plan: the run's layout, from :func:`plan_training`.
        mesh: the mesh it was planned for.

    Returns:
        The unused axes' names, in mesh order (empty when every axis of size > 1 is used).

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset
        >>> from meshpar.sharding.strategy import get_strategy
        >>> make_model = lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0))
        >>> plan = plan_training(make_model, mesh=make_mesh(data=2, foo=4),
        ...                      strategy=get_strategy("dp"), tx=optax.adamw(1e-3))
        >>> unused_mesh_axes(plan, plan.params.mesh)
        ('foo',)
    """
    used = set(Strategy.batch_axes(mesh))
    if plan.pipeline is not None:
        used.add(PIPE)
    for placements in (plan.params, plan.gradients, plan.optimizer):
        for entry in placements.entries:
            used.update(_spec_axes(entry.spec))
    # Optimizer-state leaves are placed like parameters and the non-parameter state by the
    # parameter rules, but read their shardings too: they are what the step actually uses.
    for tree in (plan.rest_shardings, plan.opt_shardings):
        for sharding in jax.tree.leaves(tree):
            if isinstance(sharding, NamedSharding):
                used.update(_spec_axes(sharding.spec))
    # Activations: the rules are all we know before tracing (the model decides whether it calls
    # meshpar.constrain with those names), so a compute rule naming an axis counts as a use --
    # except the identity rows every mesh axis gets (an axis name used as a logical name asks
    # for that axis): they would make every axis look used.
    for rule in plan.strategy.compute_rules(mesh).logical:
        if rule.mesh_axes != (rule.logical,):
            used.update(rule.mesh_axes)
    return tuple(a for a, size in mesh.shape.items() if size > 1 and a not in used)


def unused_axes_error(axes: tuple[str, ...], mesh: Mesh, /) -> StrategyError:
    """The :class:`StrategyError` for mesh ``axes`` that nothing uses.

    See :func:`unused_mesh_axes`; the message names each axis and its size and gives the fixes.

    Example:
        >>> from meshpar.mesh import make_mesh
        >>> err = unused_axes_error(("foo",), make_mesh(foo=8))
        >>> type(err).__name__, str(err).split(":")[0]
        ('StrategyError', 'mesh axis foo=8 is used by nothing')
        >>> "Drop it from the mesh (e.g. data=8)" in str(err)
        True
    """
    named = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
    it, them = ("they", "them") if len(axes) > 1 else ("it", "it")
    # The suggested mesh gives the idle devices to data parallelism, keeping the device count.
    spare = math.prod(mesh.shape[a] for a in axes)
    kept = {a: n for a, n in mesh.shape.items() if a not in axes}
    kept[DATA] = kept.get(DATA, 1) * spare
    order = (PIPE, DATA)
    suggested = ",".join(
        f"{a}={kept[a]}" for a in sorted(kept, key=lambda a: order.index(a) if a in order else 2)
    )
    return StrategyError(
        f"mesh {'axes' if len(axes) > 1 else 'axis'} {named} {'are' if len(axes) > 1 else 'is'} "
        f"used by nothing: {it} split{'' if len(axes) > 1 else 's'} neither the batch (the "
        "batch axes are data and fsdp) nor a pipeline (pipe), and no parameter, gradient, "
        f"optimizer-state, model-state or activation rule maps to {them}, so every device along "
        f"{them} would repeat the same work. Drop {them} from the mesh (e.g. {suggested}), add a "
        f"rule that uses {them} (e.g. Strategy(extra_param_rules=Rules.table([('embed', "
        f"{axes[0]!r})]))), or pass TrainConfig(allow_unused_axes=True) to run anyway"
    )


def _spec_axes(spec: PartitionSpec) -> set[str]:
    out: set[str] = set()
    for entry in spec:
        if isinstance(entry, str):
            out.add(entry)
        elif isinstance(entry, tuple):
            out.update(entry)
    return out
