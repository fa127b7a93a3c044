"""ZeRO-2/3 gradients with the collectives written out: per-layer gathers, reduce-scattered grads.

Under GSPMD the gradient of an ``fsdp``-split parameter is a per-device partial sum that XLA has
to reduce into shards. XLA's GPU and TPU pipelines rewrite the all-reduce + slice that GSPMD emits
into a reduce-scatter; the CPU pipeline does not, and a ring all-reduce sends twice the bytes of
a reduce-scatter (ZeRO-3 at 4Ψ per device and step instead of the paper's 3Ψ). So the trainer runs
the loss and its gradient in a ``shard_map`` that is manual over the batch axes (``data``,
``fsdp``) while ``tensor`` stays automatic, and says what it wants:

* **ZeRO-3**: parameters enter as their ``fsdp`` shards. Those of a layer stack run by
  :func:`meshpar.scan_layers` are all-gathered inside the scan body, one layer at a time (under
  remat the backward pass gathers each layer again); all other parameters are gathered once at
  the start of the forward pass. Autodiff transposes every ``all_gather`` into a
  ``psum_scatter``, so gradients leave the backward pass reduce-scattered, layer by layer.
* **ZeRO-2**: parameters are whole; each microbatch's local gradient is ``psum_scatter``-ed into
  the sharded accumulation buffer.
* Over ``data``, and for leaves the rules leave unsplit over ``fsdp``, gradients stay per-device
  partial sums through the microbatch loop and are summed once after it, as for DP.
* Every gather and reduce-scatter runs along dimension 0: a leaf split over ``fsdp`` on a later
  dimension has that dimension moved first (a shard-sized transpose) and back after, which XLA
  folds into the neighbouring dots instead of copying whole gradients into a transposed layout.

The manual path is taken when every parameter and gradient is either whole or split over
``fsdp`` alone on one dimension (never on the ``layers`` dimension of a stack) and no pipeline is
active, and kept when the model runs its stacks through :func:`meshpar.scan_layers`. Otherwise
(unusual user rules, a model that scans a stack itself) the step stays with GSPMD, which is
correct but sends the all-reduce.

Length: about 560 lines, one concept (the explicit ZeRO-2/3 collectives and when they apply); most
of it the bf16-as-bits gathers and the per-dimension moves XLA:CPU needs (each with its reason).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshpar.axes import FSDP
from meshpar.errors import StackNotScanned
from meshpar.parallel.layout import manual_axes


@dataclasses.dataclass
class _Stacked:
    """The stacked parameters of the current trace that wait for a per-layer gather."""

    # id(array the model sees) -> the gather of one layer's slice of it
    gathers: dict[int, Callable[[jax.Array], jax.Array]]
    used: set[int]


#: Up-front (non-stack) ZeRO-3 leaves up to this many bytes per device are gathered together
#: (:meth:`ManualZero._prepare`); larger ones alone. About the bytes a core copies in the time
#: one rendezvous of the emulated devices costs (a few hundred microseconds): below it,
#: concatenating is cheaper than another collective.
JOINT_GATHER_BYTES = 1 << 20


_STACKED: contextvars.ContextVar[_Stacked | None] = contextvars.ContextVar(
    "meshpar_zero_stacked", default=None
)


def _gather(x: jax.Array, dim: int, auto_spec: PartitionSpec, /) -> jax.Array:
    """All-gather ``x`` over ``fsdp`` along ``dim``; its transpose is a reduce-scatter.

    ``auto_spec`` is the leaf's split over the axes that are still automatic (``tensor``). An
    explicit collective in a region where ``tensor`` is automatic makes the partitioner
    replicate its operand over ``tensor`` first (a ``tensor`` all-gather, and ``tensor`` times
    the bytes over ``fsdp``), so the gather runs in a nested ``shard_map`` that is manual over
    those axes too: each device gathers only its own ``tensor`` slice.
    """
    auto = _auto_axes()
    if not auto:
        return _gather_major(x, dim)
    return jax.shard_map(
        lambda v: _gather_major(v, dim),
        mesh=jax.sharding.get_abstract_mesh(), in_specs=auto_spec, out_specs=auto_spec,
        axis_names=set(auto),
    )(x)


def _gather_major(x: jax.Array, dim: int) -> jax.Array:
    # Gather along the major-most dimension and transpose the whole array back: XLA folds that
    # transpose into the consuming dot, and in the backward pass the reduce-scatter gets its
    # operand with the split dimension major-most straight from the dot. Gathering along a
    # minor dimension instead made XLA:CPU copy every layer's gradient into a transposed layout
    # before its reduce-scatter (w_out, wo of the GPT). Measured on the 20m preset, 8 emulated
    # devices, interleaved pairs: fsdp=8 step 0.95x, fsdp=4,tensor=2 0.97x of the minor gather.
    # (For dim 0 both moveaxis calls are the identity.)
    if x.dtype == jnp.bfloat16:
        return _gather_bf16_bits(x, dim)
    whole = jax.lax.all_gather(jnp.moveaxis(x, dim, 0), FSDP, axis=0, tiled=True)
    return jnp.moveaxis(whole, 0, dim)


def _gather_bf16_bits_impl(x: jax.Array, dim: int) -> jax.Array:
    # XLA:CPU (jaxlib 0.10.2) upcasts a bf16 all-gather to fp32 (convert, fp32 gather, convert):
    # 2.3x the time of an fp32 gather of the same array. Its bits as uint16 travel as they are:
    # 0.33x the bf16 path (a 32000 x 256 table over fsdp=8; benchmarks/README.md, "bf16 on XLA:CPU").
    bits = jax.lax.bitcast_convert_type(jnp.moveaxis(x, dim, 0), jnp.uint16)
    whole = jax.lax.all_gather(bits, FSDP, axis=0, tiled=True)
    return jnp.moveaxis(jax.lax.bitcast_convert_type(whole, jnp.bfloat16), 0, dim)


_gather_bf16_bits = jax.custom_vjp(_gather_bf16_bits_impl, nondiff_argnums=(1,))
_gather_bf16_bits.defvjp(
    lambda x, dim: (_gather_bf16_bits_impl(x, dim), None),
    # What autodiff of the bf16 gather gives, as XLA:CPU runs it: an fp32 reduce-scatter of
    # the bf16 cotangent, rounded to bf16.
    lambda dim, _, g: (_scatter_major(g.astype(jnp.float32), dim).astype(jnp.bfloat16),),
)


def _scatter_major(g: jax.Array, dim: int) -> jax.Array:
    """Reduce-scatter ``g`` over ``fsdp`` along ``dim``, with the operand's ``dim`` major-most
    (see :func:`_gather_major`: XLA then takes it straight from the dot that made it)."""
    part = jax.lax.psum_scatter(jnp.moveaxis(g, dim, 0), FSDP, scatter_dimension=0, tiled=True)
    return jnp.moveaxis(part, 0, dim)


@dataclasses.dataclass(frozen=True)
class _ManualGather:
    """One leaf's manual ZeRO-3 gather (``dim``, its split over the automatic axes); a callable
    like the other per-leaf gathers, and combinable with its neighbours by :func:`_gather_all`."""

    dim: int
    auto_spec: PartitionSpec

    def __call__(self, x: jax.Array) -> jax.Array:
        return _gather(x, self.dim, self.auto_spec)


def _gather_all(xs: list[jax.Array], dims: list[int], auto_specs: list[PartitionSpec]
                ) -> list[jax.Array]:
    """:func:`_gather` of one layer's leaves (or of the small up-front ones) as one all-gather
    per dtype (its transpose: one reduce-scatter). Each collective is a rendezvous of every
    device: on XLA:CPU's emulated devices their number, more than their bytes, made the step (a
    GPT layer's 12 leaves: 23 gathers and 12 reduce-scatters per layer and step with one per
    leaf)."""
    auto = _auto_axes()
    if not auto:
        return _gather_major_all(xs, dims)
    # One nested shard_map per set of automatic axes the leaves are split over: a concatenation
    # of leaves that vary over different axes would vary over all of them.
    out: list[jax.Array | None] = [None] * len(xs)
    groups: dict[frozenset, list[int]] = {}
    for i, spec in enumerate(auto_specs):
        axes = frozenset(a for e in spec if e is not None
                         for a in (e if isinstance(e, tuple) else (e,)))
        groups.setdefault(axes, []).append(i)
    for idx in groups.values():
        got = jax.shard_map(
            lambda *vs, idx=idx: tuple(_gather_major_all(list(vs), [dims[i] for i in idx])),
            mesh=jax.sharding.get_abstract_mesh(), in_specs=tuple(auto_specs[i] for i in idx),
            out_specs=tuple(auto_specs[i] for i in idx), axis_names=set(auto),
        )(*[xs[i] for i in idx])
        for i, g in zip(idx, got):
            out[i] = g
    return out


def _gather_major_all(xs: list[jax.Array], dims: list[int]) -> list[jax.Array]:
    out: list[jax.Array | None] = [None] * len(xs)
    for dtype in dict.fromkeys(x.dtype for x in xs):
        idx = [i for i, x in enumerate(xs) if x.dtype == dtype]
        if len(idx) == 1:
            got = [_gather_major(xs[idx[0]], dims[idx[0]])]
        elif dtype == jnp.bfloat16:
            got = _gather_bf16_flat([xs[i] for i in idx], tuple(dims[i] for i in idx))
        else:
            got = _gather_flat([xs[i] for i in idx], tuple(dims[i] for i in idx))
        for i, g in zip(idx, got):
            out[i] = g
    return out


def _gather_flat_impl(xs: list[jax.Array], dims: tuple[int, ...]) -> list[jax.Array]:
    # Each leaf's split dimension major-most (as _gather_major), flattened, all concatenated:
    # one [n, total] all-gather, then each leaf sliced back out.
    majors = [jnp.moveaxis(x, d, 0) for x, d in zip(xs, dims)]
    whole = jax.lax.all_gather(jnp.concatenate([m.reshape(-1) for m in majors]), FSDP)
    n, out, start = whole.shape[0], [], 0
    for m, d in zip(majors, dims):
        part = whole[:, start:start + m.size].reshape(n * m.shape[0], *m.shape[1:])
        out.append(jnp.moveaxis(part, 0, d))
        start += m.size
    return out


def _scatter_flat(gs: list[jax.Array], dims: tuple[int, ...]) -> list[jax.Array]:
    """The transpose of :func:`_gather_flat`: the cotangents concatenated into one [n, total]
    buffer and reduce-scattered once.

    Autodiff's own transpose of the slices is a pad of each cotangent to the whole buffer and a
    chain of adds: on issue 13's small preset (12 leaves per layer, fsdp=8) that chain was 9.5%
    of the step's op time, against one write per leaf for the concatenation. Same values:
    padding adds zeros only.
    """
    n = jax.lax.axis_size(FSDP)
    majors = [jnp.moveaxis(g, d, 0) for g, d in zip(gs, dims)]
    flat = jnp.concatenate([m.reshape(n, -1) for m in majors], axis=1)
    mine = jax.lax.psum_scatter(flat, FSDP, scatter_dimension=0)
    out, start = [], 0
    for m, d in zip(majors, dims):
        size = m.size // n
        part = mine[start:start + size].reshape(m.shape[0] // n, *m.shape[1:])
        out.append(jnp.moveaxis(part, 0, d))
        start += size
    return out


_gather_flat = jax.custom_vjp(_gather_flat_impl, nondiff_argnums=(1,))
_gather_flat.defvjp(lambda xs, dims: (_gather_flat_impl(xs, dims), None),
                    lambda dims, _, gs: (_scatter_flat(list(gs), dims),))


def _gather_bf16_flat_impl(xs: list[jax.Array], dims: tuple[int, ...]) -> list[jax.Array]:
    bits = [jax.lax.bitcast_convert_type(x, jnp.uint16) for x in xs]
    return [jax.lax.bitcast_convert_type(w, jnp.bfloat16) for w in _gather_flat_impl(bits, dims)]


def _gather_bf16_flat_bwd(dims, _, gs):
    # As _gather_bf16_bits: an fp32 reduce-scatter of the bf16 cotangents, rounded to bf16.
    parts = _scatter_flat([g.astype(jnp.float32) for g in gs], dims)
    return ([p.astype(jnp.bfloat16) for p in parts],)


_gather_bf16_flat = jax.custom_vjp(_gather_bf16_flat_impl, nondiff_argnums=(1,))
_gather_bf16_flat.defvjp(lambda xs, dims: (_gather_bf16_flat_impl(xs, dims), None),
                         _gather_bf16_flat_bwd)


def _auto_axes() -> tuple[str, ...]:
    abstract = jax.sharding.get_abstract_mesh()
    if abstract is None or abstract.empty:
        return ()
    # Size-1 axes too: a bf16 reduce-scatter next to an automatic axis of any size aborts
    # XLA:CPU's compiler (AllReducePromotion); inside the nested shard_map it compiles.
    return tuple(a for a in abstract.shape if a not in manual_axes())


def layer_gather(stack_state: Any, /) -> Callable[[Any], Any] | None:
    """The per-layer ZeRO-3 gather for a layer stack's state, or ``None`` outside manual ZeRO-3.

    :func:`meshpar.scan_layers` calls it with the stacked state (``[layers, ...]`` leaves) before
    its scan and applies the returned function to each layer's slice inside the scan body.
    """
    pending = _STACKED.get()
    if pending is None:
        return None
    leaves, treedef = jax.tree.flatten(stack_state)
    fns = [pending.gathers.get(id(leaf)) for leaf in leaves]
    pending.used.update(id(leaf) for leaf, fn in zip(leaves, fns) if fn is not None)
    if all(fn is None for fn in fns):
        return None

    manual = [i for i, fn in enumerate(fns) if isinstance(fn, _ManualGather)]

    def gather(layer_state: Any) -> Any:
        layer_leaves = jax.tree.leaves(layer_state)
        out = [x if fn is None or i in manual else fn(x)
               for i, (x, fn) in enumerate(zip(layer_leaves, fns))]
        if manual:
            got = _gather_all([layer_leaves[i] for i in manual], [fns[i].dim for i in manual],
                              [fns[i].auto_spec for i in manual])
            for i, g in zip(manual, got):
                out[i] = g
        return treedef.unflatten(out)

    return gather


@contextlib.contextmanager
def stacked_scope() -> Iterator[_Stacked]:
    """Collect, for one trace of the loss, the stacked parameters that :func:`layer_gather`
    gathers one layer at a time."""
    pending = _Stacked({}, set())
    token = _STACKED.set(pending)
    try:
        yield pending
    finally:
        _STACKED.reset(token)


@dataclasses.dataclass(frozen=True)
class GatherAtUse:
    """ZeRO-3 on GSPMD's paths: each ``fsdp``-split parameter constrained to its layout without
    ``fsdp`` where the model uses it — per layer inside :func:`meshpar.scan_layers`, up front
    for the others — as ZeRO-3 prescribes, instead of leaving the gather to the partitioner.

    It also keeps clear of an XLA:CPU miscompile (jax 0.10.2, Shardy): with the batch split over
    ``data`` and ``fsdp`` and a weight split over ``fsdp`` and ``tensor`` used as it is stored,
    the gradients of the layers before it came out wrong on a ``data=2,fsdp=2,tensor=2`` mesh
    (a three-matmul repro is in ``tests/test_zoo.py``); constrained at use they are exact.

    Attributes:
        shardings: per parameter leaf, its sharding at use, or ``None`` (not split over fsdp).
        stacked: per parameter leaf, whether it belongs to a layer stack (leading ``layers``).
    """

    shardings: tuple[NamedSharding | None, ...]
    stacked: tuple[bool, ...]
    upfront_count: int = 0
    upfront_bytes: int = 0

    @classmethod
    def build(cls, *, mesh: Mesh, zero_stage: int, abs_params: Any,
              param_shardings: Any) -> GatherAtUse | None:
        """The gathers for a trainer's parameters, or ``None`` below ZeRO-3 or without fsdp.

        Example:
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset
            >>> from meshpar.sharding.strategy import get_strategy
            >>> from meshpar.train.plan import plan_training
            >>> mesh = make_mesh(fsdp=4, tensor=2)
            >>> plan = plan_training(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                      mesh=mesh, strategy=get_strategy("zero3"))
            >>> gather = GatherAtUse.build(mesh=mesh, zero_stage=3, abs_params=plan.abs_params,
            ...                            param_shardings=plan.param_shardings)
            >>> sum(gather.stacked), gather.upfront_count   # 12 in the stack, 4 gathered first
            (12, 4)
            >>> GatherAtUse.build(mesh=mesh, zero_stage=2, abs_params=plan.abs_params,
            ...                   param_shardings=plan.param_shardings) is None
            True
        """
        if zero_stage < 3 or mesh.shape.get(FSDP, 1) == 1:
            return None
        variables = jax.tree.leaves(abs_params, is_leaf=lambda v: isinstance(v, nnx.Variable))
        shardings = jax.tree.leaves(param_shardings)
        out = []
        for v, s in zip(variables, shardings):
            spec = _without(s.spec, (FSDP,))
            # A pipelined stack (stage layout) is left to the partitioner inside the stages.
            staged = isinstance(v, nnx.Variable) and tuple(
                v.get_metadata().get("out_sharding") or ())[:1] in (("stages",), ("repeats",))
            out.append(None if spec == s.spec or staged else NamedSharding(mesh, spec))
        if not any(out):
            return None
        stacked = tuple(_is_stacked(v) for v in variables)
        upfront = [v.get_value() for v, s, st in zip(variables, out, stacked) if s and not st]
        return cls(tuple(out), stacked, len(upfront),
                   sum(math.prod(a.shape) * a.dtype.itemsize for a in upfront))

    def prepare(self, params: Any, pending: _Stacked) -> Any:
        """Constrain what no stack holds now; register stacks for :func:`layer_gather`."""
        leaves, treedef = jax.tree.flatten(params)
        out = []
        for x, sharding, stacked in zip(leaves, self.shardings, self.stacked):
            if sharding is not None and stacked:
                layer = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
                pending.gathers[id(x)] = lambda v, layer=layer: jax.lax.with_sharding_constraint(v, layer)
            elif sharding is not None:
                x = jax.lax.with_sharding_constraint(x, sharding)
            out.append(x)
        return treedef.unflatten(out)


def _is_stacked(v: Any) -> bool:
    return isinstance(v, nnx.Variable) and \
        tuple(v.get_metadata().get("out_sharding") or ())[:1] == ("layers",)


def _fsdp_dim(spec: PartitionSpec, batch_axes: tuple[str, ...]) -> int | None:
    """The dimension split over ``fsdp`` alone; ``None`` if none; raises ``ValueError`` when the
    spec uses the batch axes in a way the manual path does not handle."""
    found = None
    for i, entry in enumerate(spec):
        names = entry if isinstance(entry, tuple) else (entry,)
        used = [n for n in names if n in batch_axes]
        if not used:
            continue
        if used != [FSDP] or len(names) != 1 or found is not None:
            raise ValueError(spec)
        found = i
    return found


def _without(spec: PartitionSpec, axes: tuple[str, ...]) -> PartitionSpec:
    def keep(entry):
        names = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,))
                      if n is not None and n not in axes)
        return names[0] if len(names) == 1 else (names or None)

    return PartitionSpec(*(keep(e) for e in spec))


@dataclasses.dataclass(frozen=True)
class ManualZero:
    """How one trainer's ZeRO-2/3 step reduces gradients by hand (see the module docstring).

    Attributes:
        mesh: the device mesh.
        batch_axes: the mesh axes the batch is split over (``fsdp`` among them).
        param_dims: per parameter leaf, the dimension split over ``fsdp`` in storage (ZeRO-3).
        grad_dims: per parameter leaf, the dimension split over ``fsdp`` in the gradient layout.
        stacked: per parameter leaf, whether it belongs to a layer stack (leading ``layers``).
        auto_specs: per parameter leaf, its stored spec without the batch (manual) axes.
    """

    mesh: Mesh
    batch_axes: tuple[str, ...]
    param_dims: tuple[int | None, ...]
    grad_dims: tuple[int | None, ...]
    stacked: tuple[bool, ...]
    auto_specs: tuple[PartitionSpec, ...]
    upfront_count: int = 0
    upfront_bytes: int = 0

    @classmethod
    def build(cls, *, mesh: Mesh, batch_axes: tuple[str, ...], zero_stage: int, abs_params: Any,
              param_shardings: Any, grad_shardings: Any, pipelined: bool) -> ManualZero | None:
        """The manual plan for a trainer, or ``None`` where the step stays with GSPMD.

        Example:
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset
            >>> from meshpar.sharding.strategy import get_strategy
            >>> from meshpar.train.plan import plan_training
            >>> mesh = make_mesh(fsdp=4, tensor=2)
            >>> plan = plan_training(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                      mesh=mesh, strategy=get_strategy("zero3"))
            >>> manual = ManualZero.build(
            ...     mesh=mesh, batch_axes=("fsdp",), zero_stage=3, abs_params=plan.abs_params,
            ...     param_shardings=plan.param_shardings, grad_shardings=plan.grad_shardings,
            ...     pipelined=False)
            >>> manual.param_dims[:4]          # per leaf, the dimension split over fsdp
            (None, 1, 1, 1)
        """
        if pipelined or zero_stage < 2 or mesh.shape.get(FSDP, 1) == 1:
            return None
        variables = jax.tree.leaves(abs_params, is_leaf=lambda v: isinstance(v, nnx.Variable))
        p_specs = [s.spec for s in jax.tree.leaves(param_shardings)]
        g_specs = [s.spec for s in jax.tree.leaves(grad_shardings)]
        if not (len(variables) == len(p_specs) == len(g_specs)):
            return None
        try:
            p_dims = tuple(_fsdp_dim(s, batch_axes) for s in p_specs)
            g_dims = tuple(_fsdp_dim(s, batch_axes) for s in g_specs)
        except ValueError:
            return None
        stacked = tuple(_is_stacked(v) for v in variables)
        for p, g, s in zip(p_dims, g_dims, stacked):
            if p is not None and (p != g or (s and p == 0)):
                return None
        auto_specs = tuple(_without(s, batch_axes) for s in p_specs)
        # ZeRO-3 gathers what no scan_layers stack holds once, at the start of the step.
        upfront = [v.get_value() for v, d, s in zip(variables, p_dims, stacked)
                   if d is not None and not s]
        upfront_bytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in upfront)
        return cls(mesh, batch_axes, p_dims, g_dims, stacked, auto_specs, len(upfront),
                   upfront_bytes)

    # -- inside the shard_map --------------------------------------------------------------

    def _spec(self, dim: int | None, ndim: int) -> PartitionSpec:
        if dim is None:
            return PartitionSpec()
        return PartitionSpec(*([None] * dim), FSDP, *([None] * (ndim - dim - 1)))

    def _prepare(self, leaves: list[jax.Array], pending: _Stacked) -> list[jax.Array]:
        # ZeRO-3: gather what is not a stack now; register stacks for scan_layers.
        # The small up-front leaves (the GPT's position table and final layer norm) are gathered
        # as one (one all-gather, one reduce-scatter of their gradients): on emulated devices a
        # collective costs its rendezvous, not its bytes (issue 13's small model, fsdp=8, bf16:
        # a 256-element gather took 4.1% of the step's op time, its gradient's reduce-scatter
        # 1.4%). The large ones stay alone: in a joint buffer the embedding table's gradient is
        # copied whole into the concatenation (once split over embed, also transposed: a third of
        # the fsdp=8 step's op time).
        out = list(leaves)
        small: list[int] = []
        for i, (x, d, s, spec) in enumerate(zip(leaves, self.param_dims, self.stacked,
                                                self.auto_specs)):
            if d is not None and s:
                # The scan removes the leading layer axis: the split dimension moves down one.
                pending.gathers[id(x)] = _ManualGather(d - 1, PartitionSpec(*spec[1:]))
            elif d is not None and x.size * x.dtype.itemsize <= JOINT_GATHER_BYTES:
                small.append(i)
            elif d is not None:
                out[i] = _gather(x, d, spec)
        if small:
            got = _gather_all([leaves[i] for i in small], [self.param_dims[i] for i in small],
                              [self.auto_specs[i] for i in small])
            for i, g in zip(small, got):
                out[i] = g
        return out

    def loss_and_grads(self, piece_fn: Callable[..., tuple[jax.Array, Any]], params: Any,
                       rest: Any, micro: Any, *, microbatches: int) -> tuple[Any, Any, Any]:
        """Summed loss pieces and gradients over devices and microbatches, in the ZeRO layout.

        Args:
            piece_fn: ``piece_fn(params, rest, batch, prepare) -> (numerator, (piece,
                new_rest))`` (:class:`meshpar.train.loss.Piece`); it must call ``params =
                prepare(params)`` after any cast and before building the model.
            params, rest: the parameters (in their stored shardings) and other model state.
            micro: the batch as ``[microbatches, rows, ...]`` leaves, rows over the batch axes.
            microbatches: the number of microbatches.

        Returns:
            ``(pieces, grads, new_rest)``: the pieces and the gradients of their numerators,
            each summed over every device and microbatch (the caller divides by the summed
            weight).
        """
        axes = self.batch_axes
        others = tuple(a for a in axes if a != FSDP)
        p_leaves, treedef = jax.tree.flatten(params)
        in_p = [self._spec(d, x.ndim) for d, x in zip(self.param_dims, p_leaves)]
        out_g = [self._spec(d, x.ndim) for d, x in zip(self.grad_dims, p_leaves)]
        # A gradient is reduce-scattered over fsdp when its leaf is split there (ZeRO-3 by the
        # transposed gather, ZeRO-2 by hand); the rest is summed once at the end.
        scattered = [g is not None for g in self.grad_dims]
        n_fsdp = self.mesh.shape[FSDP]
        reduced_shapes = [
            tuple(n // n_fsdp if i == gd else n for i, n in enumerate(x.shape))
            for x, gd in zip(p_leaves, self.grad_dims)
        ]

        def local(p_leaves, rest, micro):
            # Varying (per-device) copies, taken outside autodiff: the gradients of the copies
            # are local partial sums, so no reduction is inserted inside the loops.
            p_leaves = [
                jax.lax.pcast(x, others if d is not None else axes, to="varying")
                if (others if d is not None else axes) else x
                for x, d in zip(p_leaves, self.param_dims)
            ]

            def grads_of(rest, mb):
                def f(p_leaves, rest):
                    with stacked_scope() as pending:
                        failed_inside: list[BaseException] = []

                        def prepare(p):
                            try:
                                return treedef.unflatten(self._prepare(jax.tree.leaves(p), pending))
                            except Exception as err:
                                failed_inside.append(err)
                                raise

                        try:
                            return piece_fn(treedef.unflatten(p_leaves), rest, mb, prepare)
                        except Exception as err:
                            unused = set(pending.gathers) - pending.used
                            # Only a model that failed on a stacked shard is told to fall back;
                            # an error in meshpar's own gathers must surface as it is.
                            if unused and not failed_inside:
                                raise StackNotScanned(
                                    "the parameters of a layer stack (first logical axis "
                                    "'layers') arrive as fsdp shards to be gathered one layer at "
                                    "a time by meshpar.scan_layers, but the model used them "
                                    "without it"
                                ) from err
                            raise

                (_, (piece, rest)), grads = jax.value_and_grad(f, has_aux=True)(p_leaves, rest)
                grads = [
                    _scatter_major(g.astype(jnp.float32), gd)
                    if gd is not None and pd is None else g.astype(jnp.float32)
                    for g, pd, gd in zip(grads, self.param_dims, self.grad_dims)
                ]
                return piece, grads, rest

            if microbatches == 1:
                pieces, acc, rest = grads_of(rest, jax.tree.map(lambda x: x[0], micro))
            else:
                def body(carry, mb):
                    acc, pieces, rest = carry
                    piece, grads, rest = grads_of(rest, mb)
                    return ([a + g for a, g in zip(acc, grads)], pieces + piece, rest), None

                # Zero accumulators of the reduced (local) shapes, typed like the gradients.
                zeros = [
                    jax.lax.pcast(jnp.zeros(shape, jnp.float32), axes, to="varying")
                    for shape in reduced_shapes
                ]
                first = jax.tree.map(lambda x: x[0], micro)
                zero = jax.tree.map(
                    lambda s: jax.lax.pcast(jnp.zeros(s.shape, s.dtype), axes, to="varying"),
                    jax.eval_shape(lambda: grads_of(rest, first)[0]),
                )
                (acc, pieces, rest), _ = jax.lax.scan(body, (zeros, zero, rest), micro)
            grads = [
                (jax.lax.psum(g, others) if others else g) if s else jax.lax.psum(g, axes)
                for g, s in zip(acc, scattered)
            ]
            return jax.lax.psum(pieces, axes), grads, rest

        pieces, g_leaves, rest = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(in_p, PartitionSpec(), PartitionSpec(None, axes)),
            out_specs=(PartitionSpec(), out_g, PartitionSpec()),
            axis_names=set(axes),
        )(p_leaves, rest, micro)
        return pieces, treedef.unflatten(g_leaves), rest
