"""Low-communication data parallel: DiLoCo (and Streaming DiLoCo) over a ``diloco`` mesh axis.

DiLoCo (Douillard et al., 2023) trains R replicas of the model, one per position along the
``diloco`` mesh axis. Each replica group (itself sharded over ``data``, ``fsdp`` and ``tensor`` as
the strategy says) runs H *inner* optimizer steps on its own share of every global batch without
any communication over ``diloco``; every H steps the *pseudo-gradient* (the parameters at the
round's start minus the replica's parameters now) is averaged over the axis -- one reduction of
the parameters' size, optionally in bf16 -- an *outer* optimizer (Nesterov SGD by default, any
optax transformation) updates the shared parameters, and every replica starts the next round
from them. Streaming DiLoCo (2025) splits the parameters into F fragments and synchronises
fragment f at step offset ``f * H // F`` of every round, so the peak bandwidth is 1/F.

How it runs (the design):

* The inner state (:class:`~meshpar.train.state.TrainState`: parameters, inner optimizer state,
  model state, step) carries a leading replica dimension ``[R, ...]`` sharded over ``diloco``;
  every other dimension keeps the strategy's layout. The inner step is the ordinary
  :class:`~meshpar.train.trainer.Trainer` step of one replica, ``jax.vmap``-ped over the replicas
  with ``spmd_axis_name="diloco"``, so GSPMD keeps replica r on the devices at position r of the
  axis and the compiled inner step holds **no collective over** ``diloco`` (checked in the
  tests from the HLO). The batch-local ``shard_map`` paths of the Trainer (manual ZeRO-2/3
  reduce-scatters, DP accumulation reduced once) are not written to run under that ``vmap``, so
  inside each replica the step takes the GSPMD paths; :attr:`DiLoCoTrainer.fallbacks` says so.
* The outer step is a separate jitted program per fragment: it computes the replicas'
  pseudo-gradients, casts them to ``reduce_dtype``, sums them in a ``shard_map`` manual over
  ``diloco`` only (one ``psum`` per parameter leaf, the only collective over the axis), applies
  the outer transformation to the shared parameters and broadcasts them back to every replica.
  The inner optimizer state of each replica is kept (as in the paper and MaxText). Model state
  (``rest``: RNG streams, batch statistics) is per replica and never synchronised; each
  replica's RNG keys are folded with its index, so replicas draw different dropout masks.
* The host decides when a fragment synchronises (after inner step t, fragment f does when
  ``t % H == f * H // F``), so the inner step compiles once.

Equivalence: with H = 1, one fragment, outer SGD with learning rate 1 and no momentum, a round
is ``theta <- mean_r(theta_r)``, which is data parallelism exactly when the inner optimizer is
linear in the gradient (SGD, with or without momentum); for Adam the average of R updates is not
the update of the averaged gradient. Each replica's step skips its own update on a non-finite
loss (replicas do not talk between synchronisations).

Metrics: the loss is the global batch's (each replica's numerator and weight, added up on the
host; with several processes these few scalars per replica are first gathered on the host side,
outside the compiled step); ``grad_norm`` is the mean of the replicas' own gradient norms (no replica sees the
others' gradients). :meth:`DiLoCoTrainer.communication` gives the bytes each device sends over
``diloco`` per step next to what data parallelism over an axis of the same size would send.

Checkpoints (:meth:`DiLoCoTrainer.checkpoint_state`) hold the outer state (shared parameters
and outer optimizer state per fragment) and every replica's inner state, so a resume mid-round
on the same number of replicas continues exactly. On another number of replicas
(:meth:`DiLoCoTrainer.load_checkpoint_state` sees it from the arrays' leading dimension) every
new replica starts from the shared parameters of each fragment's last synchronisation with the
replicas' mean inner optimizer state and replica 0's model state: the work done since the last
synchronisation is dropped, which is what DiLoCo loses when a worker disappears.

This module is about 820 lines: one concept (the DiLoCo trainer and its state); much of it is
docstrings and the checkpoint and resize handling.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshpar.axes import DILOCO, PIPE
from meshpar.errors import CheckpointError, StrategyError, TrainingError, is_int
from meshpar.keypath import path_str
from meshpar.mesh import auto_mesh
from meshpar.sharding.strategy import Strategy
from meshpar.train.config import TrainConfig
from meshpar.train.metrics import StepMetrics
from meshpar.train.state import TrainState, is_prng_key
from meshpar.train.paths import Fallback
from meshpar.train.trainer import Trainer


def _default_outer() -> optax.GradientTransformation:
    # The DiLoCo paper's outer optimizer: Nesterov momentum SGD, lr 0.7, momentum 0.9.
    return optax.sgd(0.7, momentum=0.9, nesterov=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiLoCoConfig:
    """Options of DiLoCo (see :mod:`meshpar.train.diloco`).

    Attributes:
        inner_steps: H, inner optimizer steps per round (>= 1).
        outer_optimizer: any optax ``GradientTransformation``, applied to the averaged
            pseudo-gradient; default Nesterov SGD (lr 0.7, momentum 0.9), as in the paper.
        streaming_fragments: F, fragments of the parameters synchronised at staggered steps
            (1: plain DiLoCo; at most H).
        reduce_dtype: ``"fp32"`` or ``"bf16"``, the dtype the pseudo-gradients travel in.

    Example:
        >>> import optax
        >>> config = DiLoCoConfig(inner_steps=32,
        ...                       outer_optimizer=optax.sgd(0.7, momentum=0.9, nesterov=True))
        >>> config.inner_steps, config.streaming_fragments, config.reduce_dtype
        (32, 1, 'fp32')
    """

    inner_steps: int
    outer_optimizer: optax.GradientTransformation = dataclasses.field(default_factory=_default_outer)
    streaming_fragments: int = 1
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        if not is_int(self.inner_steps, minimum=1, numpy=False):
            raise StrategyError(
                f"DiLoCoConfig: inner_steps={self.inner_steps!r}; expected an int H >= 1 (inner "
                "optimizer steps between two synchronisations over the diloco axis)"
            )
        if not isinstance(self.outer_optimizer, optax.GradientTransformation):
            raise StrategyError(
                f"DiLoCoConfig: outer_optimizer is a {type(self.outer_optimizer).__name__}, not "
                "an optax GradientTransformation; pass e.g. optax.sgd(0.7, momentum=0.9, "
                "nesterov=True)"
            )
        if not is_int(self.streaming_fragments, minimum=1, numpy=False) or (
                self.streaming_fragments > self.inner_steps):
            raise StrategyError(
                f"DiLoCoConfig: streaming_fragments={self.streaming_fragments!r}; expected an int "
                f"in [1, inner_steps={self.inner_steps}] (each fragment synchronises at its own "
                "step of the round)"
            )
        if self.reduce_dtype not in ("fp32", "bf16"):
            raise StrategyError(
                f"DiLoCoConfig: reduce_dtype={self.reduce_dtype!r}; expected 'fp32' or 'bf16'"
            )

    def offset(self, fragment: int) -> int:
        """The step of the round at which ``fragment`` synchronises: ``fragment * H // F``.

        Example:
            >>> DiLoCoConfig(inner_steps=32, streaming_fragments=4).offset(3)
            24
        """
        return fragment * self.inner_steps // self.streaming_fragments

    def due(self, steps_done: int) -> tuple[int, ...]:
        """The fragments that synchronise after inner step number ``steps_done`` (1-based).

        Example:
            >>> DiLoCoConfig(inner_steps=4, streaming_fragments=2).due(6)
            (1,)
        """
        return tuple(f for f in range(self.streaming_fragments)
                     if steps_done > 0 and steps_done % self.inner_steps == self.offset(f))


@dataclasses.dataclass(frozen=True)
class Communication:
    """Bytes each device sends over ``diloco`` (ring all-reduce: ``2 (R-1)/R`` of the buffer).

    Attributes:
        per_sync: per fragment, the bytes of one synchronisation.
        per_step: the average per inner step (the sum of ``per_sync`` over one round, / H).
        dp_per_step: what data parallelism over an axis of the same size sends per step (the
            fp32 gradient, in its strategy layout, all-reduced every step).
    """

    per_sync: tuple[float, ...]
    per_step: float
    dp_per_step: float


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DiLoCoState:
    """The whole DiLoCo state: a pytree, donated to the inner and outer steps.

    ``inner`` leaves have a leading replica dimension; ``outer_params[f]`` maps each leaf name of
    fragment f to the shared parameter (the round's start), ``outer_opt[f]`` is the outer
    optimizer state of fragment f; ``step`` counts inner steps.
    """

    step: jax.Array
    inner: TrainState
    outer_params: tuple[dict[str, jax.Array], ...]
    outer_opt: tuple[Any, ...]


def _distinct_streams(inner: TrainState, replicas: int) -> TrainState:
    """``inner`` with replica r's RNG keys (``nnx.Rngs`` streams) folded with r.

    The replicas start as copies of one state; without this, every replica would draw the same
    dropout masks for its own rows (a global batch on one device draws a different mask per
    row).
    """
    def one(x):
        if not is_prng_key(x):
            return x
        # Per-layer streams of a stacked block ([R, layers]) fold the same replica index.
        flat = x.reshape(replicas, -1)
        fold = jax.vmap(jax.vmap(jax.random.fold_in, in_axes=(0, None)))
        return fold(flat, jnp.arange(replicas, dtype=jnp.uint32)).reshape(x.shape)

    return dataclasses.replace(inner, rest=jax.tree.map(one, inner.rest))


def _leaf_name(path) -> str:
    # Dots, not slashes: the names are dict keys in checkpoints, where a slash would read as nesting.
    name = path_str(path)
    return (name[:-len("/value")] if name.endswith("/value") else name).replace("/", ".")


def _stacked(sharding: NamedSharding) -> NamedSharding:
    return NamedSharding(sharding.mesh, PartitionSpec(DILOCO, *sharding.spec),
                         memory_kind=sharding.memory_kind)


def _shard_bytes(shape, dtype, sharding) -> int:
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


class DiLoCoTrainer:
    """Trains R replicas of a model along the ``diloco`` mesh axis, synchronising every H steps.

    Args:
        make_model, tx, loss_fn: as for :class:`~meshpar.train.trainer.Trainer`; ``tx`` is the
            inner optimizer of every replica.
        mesh: a mesh with a ``diloco`` axis (its size is the number of replicas; 1 is allowed)
            and no ``pipe`` axis of size > 1.
        strategy: the strategy inside each replica group (as for the Trainer).
        config: the inner step's options; ``offload_optimizer`` is not supported.
        diloco: a :class:`DiLoCoConfig`.

    Raises:
        StrategyError: the mesh has no ``diloco`` axis or has ``pipe`` > 1, or
            ``offload_optimizer`` is set, or ``diloco`` is not a :class:`DiLoCoConfig`.

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset, lm_loss
        >>> from meshpar.train.data import TokenBatches
        >>> make_model = lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0))
        >>> mesh = make_mesh(diloco=4, fsdp=2)
        >>> trainer = DiLoCoTrainer(make_model, optax.adamw(3e-4), lm_loss, mesh=mesh,
        ...                         diloco=DiLoCoConfig(inner_steps=32))
        >>> batch = TokenBatches(batch_size=16, seq_len=32).batch(0)
        >>> metrics = trainer.step(batch)      # synchronises after every 32nd step
        >>> trainer.replicas, trainer.step_count, metrics.skipped
        (4, 1, False)
    """

    def __init__(
        self,
        make_model: Callable[[], nnx.Module],
        tx: optax.GradientTransformation,
        loss_fn: Callable[[nnx.Module, Any], jax.Array],
        *,
        mesh: Mesh,
        diloco: DiLoCoConfig,
        strategy: str | Strategy = "auto",
        config: TrainConfig = TrainConfig(),
    ) -> None:
        if not isinstance(diloco, DiLoCoConfig):
            raise StrategyError(
                f"diloco must be a DiLoCoConfig, got {type(diloco).__name__}; e.g. "
                "DiLoCoConfig(inner_steps=32)"
            )
        mesh = auto_mesh(mesh, caller="DiLoCoTrainer")
        if DILOCO not in mesh.shape:
            raise StrategyError(
                f"DiLoCoTrainer needs a {DILOCO!r} mesh axis (one replica group per position), "
                f"but the mesh has {dict(mesh.shape)}; e.g. make_mesh(diloco=4, fsdp=-1)"
            )
        if mesh.shape.get(PIPE, 1) > 1:
            raise StrategyError(
                f"a {DILOCO!r} axis does not compose with a pipeline (pipe={mesh.shape[PIPE]}): "
                "the pipeline's shard_map cannot run under the vmap over replicas; drop the "
                f"pipe axis (e.g. use fsdp or tensor inside each replica group)"
            )
        if config.offload_optimizer:
            raise StrategyError(
                "offload_optimizer=True does not compose with a diloco axis: the replicas' "
                "optimizer states are vmapped device arrays; set offload_optimizer=False"
            )
        self.mesh, self.diloco, self.replicas = mesh, diloco, mesh.shape[DILOCO]
        self.inner = inner = Trainer(make_model, tx, loss_fn, mesh=mesh, strategy=strategy,
                                     config=config, _replica_axis=DILOCO)
        self.config, self.strategy = config, inner.strategy
        # One replica's state and shardings; the inner state stacks R of them.
        one = inner.state
        self._one_shardings = inner.state_shardings
        inner_shardings = jax.tree.map(_stacked, inner.state_shardings)
        param_leaves = jax.tree_util.tree_flatten_with_path(one.params)[0]
        self._names = [_leaf_name(p) for p, _ in param_leaves]
        param_shardings = jax.tree.leaves(inner.state_shardings.params)
        self._param_sharding = dict(zip(self._names, param_shardings))
        self._param_shape = {n: tuple(x.shape) for n, (_, x) in zip(self._names, param_leaves)}
        self._fragments = self._split(
            [_shard_bytes(x.shape, x.dtype, s) for (_, x), s in zip(param_leaves, param_shardings)]
        )
        replicated = NamedSharding(mesh, PartitionSpec())
        abs_opt = [jax.eval_shape(diloco.outer_optimizer.init, p)
                   for p in self._by_fragment([x for _, x in param_leaves])]
        outer_opt_shardings = tuple(self._opt_shardings(a, replicated) for a in abs_opt)
        self.state_shardings = DiLoCoState(
            step=replicated, inner=inner_shardings,
            outer_params=self._by_fragment(param_shardings),
            outer_opt=outer_opt_shardings,
        )
        self.state: DiLoCoState = jax.jit(self._start_from,
                                          out_shardings=self.state_shardings)(one)
        # The inner Trainer keeps an abstract state only: its checkpoint conversion reads shapes.
        inner.state = jax.eval_shape(lambda s: s, one)
        del one
        self._batch_axes = inner.batch_axes
        self._inner_jit = jax.jit(
            self._inner_fn, in_shardings=(self.state_shardings, None),
            out_shardings=(self.state_shardings, NamedSharding(mesh, PartitionSpec(DILOCO))),
            donate_argnums=(0,) if config.donate else (),
        )
        self._outer_jits = [
            jax.jit(lambda s, f=f: self._outer_fn(s, f), in_shardings=(self.state_shardings,),
                    out_shardings=self.state_shardings,
                    donate_argnums=(0,) if config.donate else ())
            for f in range(len(self._fragments))
        ]
        self._portable_jit = None

    # -- set-up helpers ------------------------------------------------------------------------

    def _start_from(self, one: TrainState) -> DiLoCoState:
        """Every replica a copy of ``one`` (their RNG streams made distinct), the shared
        parameters ``one``'s, the outer optimizer fresh, the step ``one``'s."""
        r = self.replicas
        outer = self._by_fragment(jax.tree.leaves(one.params))
        return DiLoCoState(
            step=jnp.asarray(one.step, jnp.int32),
            inner=_distinct_streams(
                jax.tree.map(lambda x: jnp.broadcast_to(x, (r, *x.shape)), one), r),
            outer_params=outer,
            outer_opt=tuple(self.diloco.outer_optimizer.init(p) for p in outer),
        )

    def _by_fragment(self, leaves: list[Any]) -> tuple[dict[str, Any], ...]:
        """Parameter leaves (in tree order) as one ``{name: leaf}`` dict per fragment."""
        return tuple({self._names[i]: leaves[i] for i in idx} for idx in self._fragments)

    def _split(self, sizes: list[int]) -> list[list[int]]:
        """Parameter leaves in order, cut into F contiguous fragments of about equal bytes."""
        count = self.diloco.streaming_fragments
        if count > len(sizes):
            raise StrategyError(
                f"streaming_fragments={count} but the model has only {len(sizes)} parameter "
                "leaves (a fragment is made of whole leaves); use at most that many"
            )
        total, before, fragments = max(sum(sizes), 1), 0, [[] for _ in range(count)]
        for i, size in enumerate(sizes):
            # The fragment in whose share of the bytes this leaf's middle falls.
            fragments[min(int((before + size / 2) * count / total), count - 1)].append(i)
            before += size
        if any(not f for f in fragments):
            # A few large leaves: fall back to equal leaf counts, so no fragment is empty.
            fragments = [list(map(int, f)) for f in np.array_split(np.arange(len(sizes)), count)]
        return fragments

    def _opt_shardings(self, abs_opt: Any, replicated: NamedSharding) -> Any:
        # An outer optimizer-state leaf named like a parameter and of its shape (momentum) lives
        # like the parameter; anything else (counters) is replicated.
        def one(path, leaf):
            keys = [getattr(k, "key", None) for k in path]
            for key in reversed(keys):
                if (isinstance(key, str) and key in self._param_sharding
                        and self._param_shape[key] == tuple(leaf.shape)):
                    return self._param_sharding[key]
            return replicated

        return jax.tree_util.tree_map_with_path(one, abs_opt)

    # -- the two programs ----------------------------------------------------------------------

    def _inner_fn(self, state: DiLoCoState, batch):
        r, spec = self.replicas, PartitionSpec(DILOCO, self._batch_axes or None)

        def per_replica(x):
            x = x.reshape(r, x.shape[0] // r, *x.shape[1:])
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

        step = jax.vmap(self.inner._step_fn, spmd_axis_name=DILOCO)
        inner, metrics = step(state.inner, jax.tree.map(per_replica, batch))
        return dataclasses.replace(state, step=state.step + 1, inner=inner), metrics

    def _outer_fn(self, state: DiLoCoState, fragment: int) -> DiLoCoState:
        idx = self._fragments[fragment]
        leaves, treedef = jax.tree.flatten(state.inner.params)
        outer = state.outer_params[fragment]
        dtype = jnp.bfloat16 if self.diloco.reduce_dtype == "bf16" else jnp.float32
        r = self.replicas

        def mean_over_replicas(deltas):
            # The one collective over diloco: a psum per leaf, in reduce_dtype.
            return jax.tree.map(lambda d: jax.lax.psum(d[0], DILOCO), deltas)

        deltas = {self._names[i]: (outer[self._names[i]][None] - leaves[i]).astype(dtype)
                  for i in idx}
        summed = jax.shard_map(
            mean_over_replicas, mesh=self.mesh, in_specs=PartitionSpec(DILOCO),
            out_specs=PartitionSpec(), axis_names={DILOCO},
        )(deltas)
        pseudo_grad = {k: v.astype(jnp.float32) / r for k, v in summed.items()}
        updates, new_opt = self.diloco.outer_optimizer.update(
            pseudo_grad, state.outer_opt[fragment], outer)
        new_outer = optax.apply_updates(outer, updates)
        for i in idx:
            new = new_outer[self._names[i]]
            leaves[i] = jax.lax.with_sharding_constraint(
                jnp.broadcast_to(new, (r, *new.shape)).astype(leaves[i].dtype),
                _stacked(self._param_sharding[self._names[i]]))
        outer_params = list(state.outer_params)
        outer_opt = list(state.outer_opt)
        outer_params[fragment], outer_opt[fragment] = new_outer, new_opt
        inner = dataclasses.replace(state.inner, params=jax.tree.unflatten(treedef, leaves))
        return dataclasses.replace(state, inner=inner, outer_params=tuple(outer_params),
                                   outer_opt=tuple(outer_opt))

    # -- host side -----------------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Inner steps done so far.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> trainer.step_count % trainer.diloco.inner_steps     # steps into the round
            0
        """
        return int(self.state.step)

    @property
    def fragments(self) -> tuple[tuple[str, ...], ...]:
        """The parameter leaves of each fragment, by name (``path`` with dots).

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> trainer.fragments[0][:2]
            ('blocks.b_in', 'blocks.b_out')
        """
        return tuple(tuple(self._names[i] for i in idx) for idx in self._fragments)

    @property
    def fallbacks(self) -> tuple[Fallback, ...]:
        """What the inner step does differently from the strategy's usual path, and why.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> for fallback in trainer.fallbacks:        # print(fallback) adds its detail
            ...     print(fallback.what)
            ZeRO-3 collectives
            ZeRO-3 up-front gathers
        """
        return self.inner.fallbacks

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """The sharding of a batch leaf: rows split over ``diloco`` (contiguous blocks, one per
        replica), then over the batch axes inside each replica group.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> trainer.batch_sharding(2).spec
            P(('diloco', 'fsdp'), None)
        """
        return NamedSharding(self.mesh, PartitionSpec((DILOCO, *self._batch_axes),
                                                      *([None] * (ndim - 1))))

    def check_batch(self, global_batch_size: int) -> None:
        """Raise :class:`StrategyError` unless the batch splits into R equal replica shares that
        divide over each replica group's batch axes and microbatches.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> trainer.check_batch(48)      # diloco=4, fsdp=2: 12 rows per replica, 6 per device
            >>> try:
            ...     trainer.check_batch(50)
            ... except StrategyError as err:
            ...     print(str(err).split(" (")[0])
            global batch size 50 is not divisible by diloco=4
        """
        r = self.replicas
        if global_batch_size % r:
            raise StrategyError(
                f"global batch size {global_batch_size} is not divisible by {DILOCO}={r} "
                "(each replica takes an equal share of the rows); use a multiple of "
                f"{r}"
            )
        try:
            self.inner.strategy.check_batch(self.mesh, global_batch_size // r,
                                            microbatches=self.config.microbatches)
        except StrategyError as err:
            raise StrategyError(f"each replica's share of {global_batch_size // r} rows: {err}") from None

    def place_batch(self, batch: Mapping[str, Any]) -> Any:
        """Put this process's rows of the global batch onto the mesh (see
        :meth:`Trainer.place_batch`).

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> from meshpar.train.data import TokenBatches
            >>> placed = trainer.place_batch(TokenBatches(batch_size=16, seq_len=32).batch(0))
            >>> placed["inputs"].sharding.spec
            P(('diloco', 'fsdp'), None)
        """
        arrays = {k: np.asarray(v) for k, v in batch.items()}
        rows = {x.shape[0] for x in arrays.values() if x.ndim}
        if len(rows) != 1 or any(x.ndim == 0 for x in arrays.values()):
            raise StrategyError("every batch leaf needs the same leading batch dimension")
        self.check_batch(rows.pop() * jax.process_count())
        return {k: jax.make_array_from_process_local_data(
            self.batch_sharding(x.ndim), x, (x.shape[0] * jax.process_count(), *x.shape[1:]))
            for k, x in arrays.items()}

    def step(self, batch: Mapping[str, Any]) -> StepMetrics:
        """One inner step of every replica, then the outer step of each fragment that is due.

        Returns:
            :class:`~meshpar.train.metrics.StepMetrics` of the global batch (``grad_norm``: the
            mean of the replicas' own norms); ``skipped`` is True if any replica skipped.

        Raises:
            TrainingError: a replica's loss was not finite and ``on_nonfinite="raise"``: that
                replica's update was not applied (the others' were; replicas do not talk
                between synchronisations).

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> from meshpar.train.data import TokenBatches
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=2))
            >>> data = TokenBatches(batch_size=16, seq_len=32)
            >>> for step in range(2):
            ...     metrics = trainer.step(data.batch(step))   # the 2nd synchronises (H = 2)
            >>> trainer.step_count, metrics.skipped
            (2, False)
        """
        placed = self.place_batch(batch)
        start = time.perf_counter()
        self.state, metrics = self._inner_jit(self.state, placed)
        done = self.step_count
        for f in self.diloco.due(done):
            self.state = self._outer_jits[f](self.state)
        if jax.process_count() > 1:
            # Each process holds its own replicas' metrics; a few scalars per replica are
            # gathered on the host side, outside the compiled step (which stays free of
            # collectives over diloco).
            metrics = multihost_utils.process_allgather(metrics, tiled=True)
        m = jax.device_get(metrics)
        step_time_s = time.perf_counter() - start
        weight = np.asarray(m["loss_weight"], np.float64)
        finite = np.asarray(m["finite"], bool)
        loss = float(np.sum(np.asarray(m["loss"], np.float64) * weight) / np.sum(weight))
        aux = jax.tree.map(lambda x: float(np.mean(x)) if np.ndim(x) == 1 else np.mean(x, 0), m["aux"])
        layout = self.inner._output_layout
        out = StepMetrics(
            loss=loss, grad_norm=float(np.mean(m["grad_norm"])), step_time_s=step_time_s,
            skipped=not bool(finite.all()),
            loss_weight=float(np.sum(weight)) if layout is not None and layout.weighted else None,
            aux=aux if jax.tree.leaves(aux) else None,
        )
        if out.skipped and self.config.on_nonfinite == "raise":
            bad = [int(i) for i in np.flatnonzero(~finite)]
            raise TrainingError(
                f"non-finite loss or zero loss weight on replica(s) {bad} at step {done - 1}; "
                "those replicas did not apply the update (the others did: replicas do not "
                "communicate between synchronisations). Lower the learning rate, use fp32, or "
                "pass on_nonfinite='skip'"
            )
        return out

    def communication(self) -> Communication:
        """Bytes each device sends over ``diloco`` per synchronisation and per step, beside
        data parallelism's (analytic; :mod:`meshpar.inspect.hlo` reads the same from the HLO).

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> trainer.communication().per_step / trainer.communication().dp_per_step  # 1/H
            0.03125
        """
        r = self.replicas
        ring = 2 * (r - 1) / r
        item = 2 if self.diloco.reduce_dtype == "bf16" else 4
        abs_params = jax.tree.leaves(self.inner.state.params)
        shardings = jax.tree.leaves(self.inner.state_shardings.params)
        sizes = [math.prod(s.shard_shape(tuple(x.shape))) for x, s in zip(abs_params, shardings)]
        per_sync = tuple(ring * item * sum(sizes[i] for i in idx) for idx in self._fragments)
        grad_sh = jax.tree.leaves(self.inner._grad_shardings)
        dp = ring * 4 * sum(math.prod(s.shard_shape(tuple(x.shape)))
                            for x, s in zip(abs_params, grad_sh))
        return Communication(per_sync=per_sync, per_step=sum(per_sync) / self.diloco.inner_steps,
                             dp_per_step=dp)

    def sync_bytes(self, steps_done: int) -> float:
        """Bytes each device sent over ``diloco`` after inner step ``steps_done`` (1-based).

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> trainer.sync_bytes(32) == sum(trainer.communication().per_sync)   # H = 32, F = 1
            True
            >>> trainer.sync_bytes(31)
            0.0
        """
        per_sync = self.communication().per_sync
        return float(sum(per_sync[f] for f in self.diloco.due(steps_done)))

    def lower_inner(self, batch: Mapping[str, Any]):
        """The lowered inner step for this process's rows of a batch (``.compile().as_text()``
        for the HLO); nothing is placed on the devices.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> from meshpar.inspect.hlo import collectives
            >>> from meshpar.train.data import TokenBatches
            >>> batch = TokenBatches(batch_size=16, seq_len=32).batch(0)
            >>> hlo = trainer.lower_inner(batch).compile().as_text()   # no collective over diloco
            >>> [op for op in collectives(hlo, mesh=trainer.mesh) if "diloco" in op.mesh_axes]
            []
        """
        arrays = {k: np.asarray(v) for k, v in batch.items()}
        n = jax.process_count()
        self.check_batch(next(iter(arrays.values())).shape[0] * n)
        abstract = {k: jax.ShapeDtypeStruct((x.shape[0] * n, *x.shape[1:]), x.dtype,
                                            sharding=self.batch_sharding(x.ndim))
                    for k, x in arrays.items()}
        return self._inner_jit.lower(self.state, abstract)

    def lower_outer(self, fragment: int = 0):
        """The lowered outer step of ``fragment``.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> from meshpar.inspect.hlo import collectives
            >>> hlo = trainer.lower_outer(0).compile().as_text()
            >>> sorted({op.kind.value for op in collectives(hlo, mesh=trainer.mesh)
            ...         if "diloco" in op.mesh_axes})
            ['all-reduce']
        """
        return self._outer_jits[fragment].lower(self.state)

    def model(self, replica: int | None = None) -> nnx.Module:
        """The shared model (the last synchronised parameters), or replica ``replica``'s.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> import numpy as np
            >>> tokens = np.zeros((2, 32), np.int32)
            >>> logits = trainer.model()(tokens)
            >>> logits.shape
            (2, 32, 256)
        """
        one = self._one_replica(replica if replica is not None else 0)
        if replica is None:
            leaves, treedef = jax.tree.flatten(one.params)
            for f, idx in enumerate(self._fragments):
                for i in idx:
                    leaves[i] = self.state.outer_params[f][self._names[i]]
            one = dataclasses.replace(one, params=jax.tree.unflatten(treedef, leaves))
        return nnx.merge(self.inner.graphdef, one.params, one.rest)

    def _one_replica(self, r: int) -> TrainState:
        return jax.jit(lambda s: jax.tree.map(lambda x: x[r], s.inner),
                       out_shardings=self._one_shardings)(self.state)

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint stores: ``step``, ``inner`` (every replica's state, leading
        dimension R, in the model's own layout) and ``outer`` (shared parameters and outer
        optimizer state per fragment).

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> state = trainer.checkpoint_state()
            >>> sorted(state), state["inner"]["step"].shape      # one inner step per replica
            (['inner', 'outer', 'step'], (4,))

            A :class:`~meshpar.train.checkpoint.Checkpointer` saves it with its metadata:
            ``checkpointer.save(step, trainer.checkpoint_state(),
            meta=trainer.checkpoint_meta())``.
        """
        if self._portable_jit is None:
            self._portable_jit = jax.jit(self._to_portable)
        return self._portable_jit(self.state)

    def _to_portable(self, state: DiLoCoState) -> dict[str, Any]:
        return {"step": state.step, "inner": jax.vmap(self.inner._to_portable)(state.inner),
                "outer": {"params": list(state.outer_params), "opt_state": list(state.outer_opt)}}

    def checkpoint_meta(self) -> dict[str, Any]:
        """JSON metadata naming the run as DiLoCo (what a plain resume checks).

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> trainer.checkpoint_meta()["diloco"]["replicas"]
            4
        """
        return {"diloco": {"replicas": self.replicas, "inner_steps": self.diloco.inner_steps,
                           "streaming_fragments": self.diloco.streaming_fragments}}

    def checkpoint_target(self, *, replicas: int | None = None) -> Any:
        """Abstract arrays to restore a checkpoint written with ``replicas`` replicas onto
        (default: this trainer's). Another count's inner state is read replicated over
        ``diloco``, then :meth:`load_checkpoint_state` resizes it.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> target = trainer.checkpoint_target(replicas=2)   # a run of 2 replicas
            >>> target["inner"]["step"].shape, trainer.checkpoint_target()["inner"]["step"].shape
            ((2,), (4,))

            Then ``state, meta = checkpointer.restore(target)`` and
            ``trainer.load_checkpoint_state(state)`` (:meth:`restore` does both).
        """
        r = self.replicas if replicas is None else replicas
        if not is_int(r, minimum=1):
            raise CheckpointError(f"replicas={r!r}; expected an int >= 1")
        if self._portable_jit is None:
            self._portable_jit = jax.jit(self._to_portable)
        compiled = self._portable_jit.lower(self.state).compile()
        shapes = jax.eval_shape(self._to_portable, self.state)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              shapes, compiled.output_shardings)
        if r != self.replicas:
            # R saved replicas do not split over diloco of another size: read them replicated
            # over it (the rest of each leaf's layout kept); the resize then takes the mean.
            def other(t):
                spec = t.sharding.spec[1:] if isinstance(t.sharding, NamedSharding) else ()
                return jax.ShapeDtypeStruct((r, *t.shape[1:]), t.dtype, sharding=NamedSharding(
                    self.mesh, PartitionSpec(None, *spec)))
            target["inner"] = jax.tree.map(other, target["inner"])
        return target

    def load_checkpoint_state(self, portable: dict[str, Any]) -> None:
        """Replace the state with a restored checkpoint (see :meth:`checkpoint_target`).

        With as many replicas as this trainer, the state is the saved one (a resume mid-round
        is exact). With another number, every replica restarts from the shared parameters of
        each fragment's last synchronisation, with the saved replicas' mean inner optimizer
        state (floating leaves; others from replica 0) and replica 0's model state.

        Raises:
            CheckpointError: ``portable`` is not a DiLoCo checkpoint state.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> other = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(1)),
            ...                       optax.adamw(3e-4), lm_loss,
            ...                       mesh=make_mesh(diloco=4, fsdp=2),
            ...                       diloco=DiLoCoConfig(inner_steps=32))
            >>> trainer.load_checkpoint_state(other.checkpoint_state())
        """
        if not (isinstance(portable, Mapping) and {"step", "inner", "outer"} <= set(portable)):
            raise CheckpointError(
                "not a DiLoCo checkpoint state (expected the keys 'step', 'inner' and 'outer', "
                "as DiLoCoTrainer.checkpoint_state writes them); start from a plain Trainer "
                "checkpoint with load_plain_checkpoint_state"
            )
        saved_r = int(jax.tree.leaves(portable["inner"]["step"])[0].shape[0])
        r = self.replicas

        def from_portable(p):
            inner = p["inner"]
            if saved_r != r:
                def resized(x, keep_first=False):
                    if jnp.issubdtype(x.dtype, jnp.floating) and not keep_first:
                        one = jnp.mean(x.astype(jnp.float32), axis=0).astype(x.dtype)
                    else:
                        one = x[0]
                    return jnp.broadcast_to(one, (r, *one.shape))
                inner = {"step": resized(inner["step"]),
                         "params": jax.tree.map(resized, inner["params"]),
                         "rest": jax.tree.map(lambda x: resized(x, True), inner["rest"]),
                         "opt_state": jax.tree.map(resized, inner["opt_state"])}
            state = jax.vmap(self.inner._from_portable)(inner)
            if saved_r != r:
                state = _distinct_streams(state, r)
            outer_params = tuple(p["outer"]["params"])
            if saved_r != r:
                leaves, treedef = jax.tree.flatten(state.params)
                for f, idx in enumerate(self._fragments):
                    for i in idx:
                        new = outer_params[f][self._names[i]]
                        leaves[i] = jnp.broadcast_to(new, (r, *new.shape)).astype(leaves[i].dtype)
                state = dataclasses.replace(state, params=jax.tree.unflatten(treedef, leaves))
            return DiLoCoState(step=p["step"], inner=state, outer_params=outer_params,
                               outer_opt=tuple(p["outer"]["opt_state"]))

        self.state = jax.jit(from_portable, out_shardings=self.state_shardings)(portable)

    def restore(self, checkpointer, *, step: int | None = None) -> tuple[int, dict[str, Any]]:
        """Restore the latest (or ``step``'s) checkpoint: a DiLoCo run's on any number of
        replicas (:meth:`load_checkpoint_state`), or a plain Trainer run's, which every replica
        then starts from (:meth:`load_plain_checkpoint_state`).

        Returns:
            ``(step, meta)``.

        Raises:
            CheckpointError: the checkpoint's metadata names a malformed DiLoCo run, or the
                checkpoint does not match the model.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> import tempfile
            >>> from meshpar.train.checkpoint import Checkpointer
            >>> other = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                       optax.adamw(3e-4), lm_loss,
            ...                       mesh=make_mesh(diloco=2, fsdp=4),
            ...                       diloco=DiLoCoConfig(inner_steps=32))
            >>> directory = tempfile.TemporaryDirectory()
            >>> with Checkpointer(directory.name) as saved:     # a run of 2 replicas
            ...     saved.save(0, other.checkpoint_state(), meta=other.checkpoint_meta())
            >>> with Checkpointer(directory.name) as checkpointer:   # onto 4 replicas
            ...     step, meta = trainer.restore(checkpointer)
            >>> step, meta["diloco"]["replicas"], trainer.replicas
            (0, 2, 4)
            >>> directory.cleanup()
        """
        step, meta = checkpointer.read_meta(step=step)
        info = meta.get("diloco")
        if info is None:
            state, meta = checkpointer.restore(self.plain_checkpoint_target(), step=step)
            self.load_plain_checkpoint_state(state)
            return step, meta
        if not isinstance(info, dict) or not is_int(info.get("replicas"), minimum=1):
            raise CheckpointError(
                f"checkpoint step {step} in {checkpointer.directory}: its 'diloco' metadata "
                f"{info!r} does not name a replica count (an int >= 1)"
            )
        state, meta = checkpointer.restore(self.checkpoint_target(replicas=info["replicas"]),
                                           step=step)
        self.load_checkpoint_state(state)
        return step, meta

    def plain_checkpoint_target(self) -> Any:
        """Abstract arrays to restore a plain :class:`~meshpar.train.trainer.Trainer`
        checkpoint of the same model onto (one replica's layout), for
        :meth:`load_plain_checkpoint_state`.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> target = trainer.plain_checkpoint_target()
            >>> sorted(target), target["params"]["tok_embed"].shape   # one replica's layout
            (['opt_state', 'params', 'rest', 'step'], (256, 64))

            ``state, _ = checkpointer.restore(target)`` then reads a plain Trainer's checkpoint.
        """
        to_portable = jax.jit(self.inner._to_portable, in_shardings=(self._one_shardings,))
        compiled = to_portable.lower(self.inner.state).compile()
        shapes = jax.eval_shape(self.inner._to_portable, self.inner.state)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, compiled.output_shardings)

    def load_plain_checkpoint_state(self, portable: dict[str, Any]) -> None:
        """Start DiLoCo from a plain Trainer checkpoint (say, a data-parallel warm-up, as the
        DiLoCo paper starts from a pretrained model): every replica starts from its parameters,
        model state and inner optimizer state (RNG streams made distinct per replica), the
        shared parameters are its parameters, the outer optimizer starts fresh and the step
        continues from the checkpoint's. The inverse of :meth:`plain_checkpoint_state`, up to
        the outer optimizer state that a plain checkpoint does not have.

        Raises:
            CheckpointError: ``portable`` is a DiLoCo checkpoint state (use
                :meth:`load_checkpoint_state`).

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> import tempfile
            >>> from meshpar.train import Trainer
            >>> from meshpar.train.checkpoint import Checkpointer
            >>> plain = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                 optax.adamw(3e-4), lm_loss, mesh=make_mesh(fsdp=8))   # a warm-up
            >>> tmp = tempfile.TemporaryDirectory()
            >>> checkpointer = Checkpointer(tmp.name)
            >>> checkpointer.save(100, plain.checkpoint_state(), meta={"step": 100})
            >>> state, _ = checkpointer.restore(trainer.plain_checkpoint_target())
            >>> trainer.load_plain_checkpoint_state(state)
            >>> shared, warm = trainer.model(), plain.model()   # every replica starts from it
            >>> bool((shared.tok_embed[...] == warm.tok_embed[...]).all())
            True
            >>> checkpointer.close(); tmp.cleanup()
        """
        if isinstance(portable, Mapping) and {"inner", "outer"} <= set(portable):
            raise CheckpointError(
                "load_plain_checkpoint_state: this is a DiLoCo checkpoint state (keys 'inner' "
                "and 'outer'); load it with load_checkpoint_state"
            )
        self.state = jax.jit(lambda p: self._start_from(self.inner._from_portable(p)),
                             out_shardings=self.state_shardings)(portable)

    def plain_checkpoint_state(self) -> dict[str, Any]:
        """The state as a plain :class:`~meshpar.train.trainer.Trainer` checkpoint (the
        conversion of a DiLoCo run to one without ``diloco``): the shared parameters, the
        replicas' mean inner optimizer state, replica 0's model state and step.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                         optax.adamw(3e-4), lm_loss,
            ...                         mesh=make_mesh(diloco=4, fsdp=2),
            ...                         diloco=DiLoCoConfig(inner_steps=32))
            >>> import tempfile
            >>> from meshpar.train import Trainer
            >>> from meshpar.train.checkpoint import Checkpointer
            >>> tmp = tempfile.TemporaryDirectory()
            >>> checkpointer, step = Checkpointer(tmp.name), trainer.step_count
            >>> checkpointer.save(step, trainer.plain_checkpoint_state())   # mp.Trainer resumes it
            >>> plain = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                 optax.adamw(3e-4), lm_loss, mesh=make_mesh(fsdp=8))
            >>> state, _ = checkpointer.restore(plain.checkpoint_target())
            >>> plain.load_checkpoint_state(state)
            >>> checkpointer.close(); tmp.cleanup()
        """
        def convert(state):
            leaves, treedef = jax.tree.flatten(state.inner.params)
            leaves = [x[0] for x in leaves]
            for f, idx in enumerate(self._fragments):
                for i in idx:
                    leaves[i] = state.outer_params[f][self._names[i]].astype(leaves[i].dtype)
            mean = lambda x: (jnp.mean(x.astype(jnp.float32), 0).astype(x.dtype)  # noqa: E731
                              if jnp.issubdtype(x.dtype, jnp.floating) else x[0])
            one = TrainState(state.inner.step[0], jax.tree.unflatten(treedef, leaves),
                             jax.tree.map(lambda x: x[0], state.inner.rest),
                             jax.tree.map(mean, state.inner.opt_state))
            return self.inner._to_portable(one)

        return jax.jit(convert)(self.state)
