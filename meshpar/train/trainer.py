"""One jitted train step for any Flax NNX model, any optax optimizer and any strategy.

The step is a single ``jax.jit`` with explicit in/out shardings and the state donated:

* parameters live where :meth:`Strategy.param_rules` says (replicated, or ZeRO-3 sharded);
* gradients and the accumulation buffer where :meth:`Strategy.gradient_rules` says (ZeRO-2 keeps
  the buffer sharded: each microbatch's gradient is reduced straight into its shard); under
  ZeRO-2/3 the gathers and reduce-scatters are written out in a ``shard_map``
  (:mod:`meshpar.parallel.zero`, :attr:`Trainer.explicit_zero`);
* optimizer state where :meth:`Strategy.optimizer_rules` says (ZeRO-1 and up shard it), optionally
  in host memory (``offload_optimizer=True``; on CPU only plumbing and numerics can be checked —
  XLA lowers memory placement for TPU and GPU only);
* activations where :meth:`Strategy.compute_rules` says, through :func:`meshpar.constrain` calls in
  the model, activated inside the traced step.

Microbatches run under ``lax.scan``; each is a strided slice of the global batch (rows ``m, m+M,
...``) so that no device has to send its rows to another. Mixed precision casts the fp32 master
parameters to bf16 for the forward and backward passes (so the backward pass and its reductions
run in bf16); the gradient returned for each fp32 parameter, the accumulator and the optimizer
state are fp32. A non-finite loss never updates the state: the step either raises
:class:`TrainingError` naming the step (default) or skips the update and reports it.

Its options are :class:`~meshpar.train.config.TrainConfig`, the gradient norm is in
:mod:`meshpar.train.gradients`, the gradient paths (GSPMD scan, manual ZeRO, local accumulation)
in :mod:`meshpar.train.paths`, the state's portable form in :mod:`meshpar.train.portable` and
:mod:`meshpar.train.state`, batch checks in :mod:`meshpar.train.batch`. The module is still
about 620 lines, one concept (the :class:`Trainer`): the construction, where every path decision
is made and listed, is a third of it; the rest is the step, its host side and evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshpar.axes import DILOCO, FSDP, PIPE
from meshpar.backend.allocator import keep_freed_memory
from meshpar.backend.devices import thread_pool_warning
from meshpar.errors import MeshparWarning, StrategyError, TrainingError
from meshpar.mesh import auto_mesh
from meshpar.parallel.layout import activate
from meshpar.parallel.stack import pipeline_was_used, reset_pipeline_flag, restore_pipeline_flag
from meshpar.parallel.zero import GatherAtUse, ManualZero, stacked_scope
from meshpar.sharding.explicit import explain_trace_error
from meshpar.sharding.placement import ShardingPlan
from meshpar.sharding.strategy import Strategy, get_strategy
from meshpar.train.batch import batch_arrays
from meshpar.train.config import TrainConfig
from meshpar.train.gradients import global_grad_norm
from meshpar.train.loss import OutputLayout, split_output
from meshpar.train.metrics import StepMetrics
from meshpar.train.paths import Fallback, GradientPaths, reduce_once_pays
from meshpar.train.plan import plan_training, replicating_batch_axes, to_stage_layout
from meshpar.train.plan import unused_axes_error, unused_mesh_axes
from meshpar.train.portable import PortableState
from meshpar.train.state import TrainState, describe_state, named_leaves


@functools.cache
def _warn_small_thread_pool() -> None:
    # Once per process: the pool is sized when JAX starts, so nothing changes it afterwards.
    if (reason := thread_pool_warning()) is not None:
        warnings.warn(reason, MeshparWarning, stacklevel=3)


class Trainer(PortableState, GradientPaths):
    """Trains any Flax NNX module with a strategy on a mesh.

    Args:
        make_model: no-argument factory of the NNX module (it owns its ``nnx.Rngs``); the
            module is built directly in its shardings, never whole on one device.
        tx: any optax optimizer.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        mesh: the device mesh.
        strategy: a preset name (``"auto"``, ``"dp"``, ``"zero1"``..``"zero3"``, ``"tp"``,
            ``"tp_sp"``) or a :class:`Strategy`.
        config: step options (:class:`TrainConfig`).
        example_batch: optionally, the global batch's structure: arrays or
            ``jax.ShapeDtypeStruct``s with the global shapes (every process passes the same).
            The step is then traced when the trainer is built, not at the first :meth:`step`:
            everything decided while tracing the model (a model's ``out_sharding=`` calls, a
            ZeRO fallback for a layer stack not run by :func:`meshpar.scan_layers`, the loss's
            output layout) raises or is listed in :attr:`fallbacks` before any step runs, and a
            batch that does not divide over the mesh is refused here. ``meshpar train`` passes it.
        allocate: ``False`` keeps the state abstract (``jax.ShapeDtypeStruct``s with their
            shardings): the step can be lowered and compiled (:meth:`lower`, e.g. to read the
            ``memory_analysis`` of a layout too large for this machine) but not run.

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset, lm_loss
        >>> from meshpar.train.data import TokenBatches
        >>> cfg = get_preset("tiny")
        >>> trainer = Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(3e-4), lm_loss,
        ...                   mesh=make_mesh(data=2, fsdp=2, tensor=2), strategy="zero3")
        >>> batch = TokenBatches(batch_size=8, seq_len=32).batch(0)   # host arrays, global
        >>> metrics = trainer.step(batch)
        >>> metrics.skipped, 5.0 < metrics.loss < 6.0
        (False, True)
    """

    def __init__(
        self,
        make_model: Callable[[], nnx.Module],
        tx: optax.GradientTransformation,
        loss_fn: Callable[[nnx.Module, Any], jax.Array],
        *,
        mesh: Mesh,
        strategy: str | Strategy = "auto",
        config: TrainConfig = TrainConfig(),
        example_batch: Mapping[str, Any] | None = None,
        allocate: bool = True,
        _replica_axis: str | None = None,
    ) -> None:
        # ``_replica_axis`` is for meshpar.train.diloco only: the step is then one replica's,
        # mapped over that axis by jax.vmap, and nothing in it may communicate over the axis.
        # Explicit axes become Auto over the same devices, with a warning (see meshpar.mesh).
        self.mesh = mesh = auto_mesh(mesh, caller="Trainer")
        _warn_small_thread_pool()
        if jax.default_backend() == "cpu":
            # XLA:CPU mallocs each step's temporaries: reuse the last step's pages
            # (meshpar.backend.allocator; 1-5% of issue 13's steps).
            keep_freed_memory()
        if _replica_axis is None and mesh.shape.get(DILOCO, 1) > 1:
            raise StrategyError(
                f"the mesh has {DILOCO}={mesh.shape[DILOCO]}: replicas along the {DILOCO!r} "
                "axis synchronise every H steps (DiLoCo), which mp.Trainer does not do; train "
                "with mp.DiLoCoTrainer(..., diloco=mp.DiLoCoConfig(inner_steps=H)) (CLI: "
                f"--inner-steps H), or rename the axis to 'data' for data parallelism"
            )
        self._replica_axis = _replica_axis
        self.strategy = get_strategy(strategy).for_mesh(mesh)
        self.config = config
        self.tx = tx
        self.loss_fn = loss_fn
        self.compute_rules = self.strategy.compute_rules(mesh)

        layout = plan_training(
            make_model, mesh=mesh, strategy=self.strategy, tx=tx,
            microbatches=config.microbatches, schedule=config.schedule, repeats=config.repeats,
            offload_optimizer=config.offload_optimizer, pipeline_remat=config.pipeline_remat,
        )
        # Mesh axes nothing uses: an error unless allowed, then recorded for reports.
        self.unused_axes = tuple(a for a in unused_mesh_axes(layout, mesh) if a != _replica_axis)
        if self.unused_axes and not config.allow_unused_axes:
            raise unused_axes_error(self.unused_axes, mesh)
        self.layout = layout
        self.graphdef, self.pipeline, self.num_layers = layout.graphdef, layout.pipeline, layout.num_layers
        self.plan, self.grad_plan, self.optimizer_plan = layout.params, layout.gradients, layout.optimizer
        self._grad_shardings = grad_shardings = layout.grad_shardings
        opt_shardings = layout.opt_shardings
        self._opt_device_shardings = jax.tree.map(
            lambda s: s.with_memory_kind("device"), opt_shardings
        )
        pipeline = self.pipeline
        to_model_layout = (lambda p: to_stage_layout(p, pipeline)) if pipeline else (lambda p: p)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.state_shardings = TrainState(
            replicated, layout.param_shardings, layout.rest_shardings, opt_shardings
        )
        self.batch_axes = self.strategy.batch_axes(mesh)
        self._batch_spec = PartitionSpec(self.batch_axes if self.batch_axes else None)
        self._fallbacks: list[Fallback] = [
            Fallback(f"mesh axis {a!r}", f"size {mesh.shape[a]}, used by nothing (allowed by "
                     "TrainConfig(allow_unused_axes=True)): every device along it repeats the "
                     "same work") for a in self.unused_axes
        ]
        self._output_layout: OutputLayout | None = None
        state_leaves = named_leaves(layout.abs_rest)
        if self.pipeline is not None and layout.stack_state:
            manual = [a for a in replicating_batch_axes(mesh, zero_stage=self.strategy.zero_stage)
                      if mesh.shape[a] > 1]
            if manual:
                self._fallbacks.append(Fallback(
                    "pipeline batch axes",
                    f"the layer stack holds non-parameter state ("
                    f"{describe_state(list(layout.stack_state))}), "
                    f"so {', '.join(manual)} stay automatic inside the pipeline stages (dropout "
                    "masks and batch statistics over the whole microbatch); the weight gradients "
                    f"are then reduced over {', '.join(manual)} in every backward iteration of "
                    "the loop instead of once after it",
                ))
        # Batch-local execution (a shard_map manual over the batch axes, each device running the
        # model on its own rows) is exact only for a model and loss that treat rows
        # independently: a loss built from batch-wide statistics (an MoE balance loss, a plain
        # masked ratio) becomes a mean of per-shard values, an RNG stream draws one dropout mask
        # per shard (the same on every shard), batch statistics become per-shard. So it is
        # opt-in, and off for models with non-parameter state; otherwise the GSPMD paths run,
        # which see the global batch as one device does.
        batch_local = config.row_separable and not state_leaves and _replica_axis is None
        if _replica_axis is not None:
            why_not_local = (
                f"DiLoCo maps each replica's step over the {_replica_axis!r} axis with jax.vmap, "
                "and the batch-local paths' shard_maps are not written to run under it yet, so "
                "the step stays global (GSPMD) inside each replica"
            )
        elif not config.row_separable:
            why_not_local = (
                "the loss is not declared row-separable (TrainConfig(row_separable=True): the "
                "loss is a mean or mp.Ratio of per-row terms and the model computes each row on "
                "its own), so the step stays global"
            )
        else:
            why_not_local = (
                f"the model holds non-parameter state ({describe_state(state_leaves)}); running "
                "it batch-local would change what it computes (one dropout mask repeated on "
                "every shard, batch statistics per shard), so the step stays global"
            )
        self._manual_zero = ManualZero.build(
            mesh=mesh, batch_axes=self.batch_axes, zero_stage=self.strategy.zero_stage,
            abs_params=layout.abs_params, param_shardings=layout.param_shardings,
            grad_shardings=grad_shardings, pipelined=self.pipeline is not None,
        )
        if self._manual_zero is not None and not batch_local:
            self._manual_zero = None
            self._fallbacks.append(Fallback(
                f"ZeRO-{self.strategy.zero_stage} collectives",
                "GSPMD reduces the gradients (an all-reduce + slice on CPU: 4 instead of 3 "
                f"parameter-sizes of traffic per step) because {why_not_local}",
            ))
        # ZeRO-3 on GSPMD's paths: parameters constrained to their gathered layout at use.
        self._gather_at_use = None if self._manual_zero is not None else GatherAtUse.build(
            mesh=mesh, zero_stage=self.strategy.zero_stage, abs_params=layout.abs_params,
            param_shardings=layout.param_shardings,
        )
        gathers = self._manual_zero or self._gather_at_use
        if gathers is not None and self.strategy.zero_stage >= 3 and gathers.upfront_bytes:
            self._fallbacks.append(Fallback(
                "ZeRO-3 up-front gathers",
                f"{gathers.upfront_count} parameter(s) outside a layer stack run by "
                f"meshpar.scan_layers ({gathers.upfront_bytes / 2**20:.2f} MiB whole) "
                "are all-gathered once at the start of the step and stay whole on every device "
                "until its backward pass is done",
            ))
        # DP / ZeRO-1 gradients summed on each device and reduced once (GradientPaths.
        # _accumulate_locally): with microbatches one reduction instead of M; with one
        # microbatch where that pays (reduce_once_pays: CPU devices).
        # (ZeRO-2/3 without an fsdp axis to shard over is DP.)
        local_applies = self.pipeline is None and bool(self.batch_axes) and (
            self.strategy.zero_stage <= 1 or mesh.shape.get(FSDP, 1) == 1)
        self._local_accumulation = local_applies and batch_local and (
            config.microbatches > 1 or reduce_once_pays(mesh))
        if local_applies and config.microbatches > 1 and not batch_local:
            self._fallbacks.append(Fallback(
                "gradient accumulation",
                "each microbatch's gradient is all-reduced inside the loop "
                f"({config.microbatches}x the traffic of one reduction after it) because "
                f"{why_not_local}",
            ))

        def init():
            with nnx.use_eager_sharding(False):
                _, params, rest = nnx.split(make_model(), nnx.Param, ...)
            params = to_model_layout(params)
            opt_state = tx.init(params)
            return TrainState(jnp.zeros((), jnp.int32), params, rest, opt_state)

        if allocate:
            self.state: TrainState = jax.jit(init, out_shardings=self.state_shardings)()
        else:
            self.state = jax.tree.map(
                lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                jax.eval_shape(init), self.state_shardings)
        self.allocated = allocate
        self._jitted = jax.jit(
            self._step_fn,
            in_shardings=(self.state_shardings, None),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,) if config.donate else (),
        )
        self._jitted_grads = jax.jit(
            self._grads_fn,
            in_shardings=(self.state_shardings, None),
            out_shardings=(replicated, grad_shardings),
        )
        if example_batch is not None:
            self._trace(example_batch)

    def _trace(self, example_batch: Mapping[str, Any]) -> None:
        """Trace the step for a batch of this structure (nothing is compiled or run), so that
        what tracing decides is decided now; the trace is reused by the first :meth:`step`."""
        self._jitted.trace(self.state, self._abstract_batch(example_batch))

    def _abstract_batch(self, batch: Mapping[str, Any]) -> Any:
        """``jax.ShapeDtypeStruct``s of a global batch (arrays or shapes), with the batch
        sharding, after the checks :meth:`place_batch` makes."""
        arrays, treedef, rows = batch_arrays(batch)
        self.check_batch(rows)
        return jax.tree.unflatten(treedef, [
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.batch_sharding(len(x.shape)))
            for x in arrays
        ])

    # -- the step ------------------------------------------------------------------------------

    def _piece(self, params, rest, batch, prepare=None):
        """One piece of the loss: the numerator to differentiate, and ``(Piece, new rest)``."""
        if self.config.precision == "bf16":
            params = jax.tree.map(
                lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                params,
            )
        with contextlib.ExitStack() as scope:
            if prepare is not None:
                # Manual ZeRO-3 (meshpar.parallel.zero): gather shards, after the cast so they travel
                # in bf16.
                params = prepare(params)
            elif self._gather_at_use is not None:
                params = self._gather_at_use.prepare(params, scope.enter_context(stacked_scope()))
            out, model = self._call_loss(params, rest, batch)
        piece, self._output_layout = split_output(out)
        return piece.loss, (piece, self._rest_after(model, rest))

    def _call_loss(self, params, rest, batch):
        # copy=True: the model mutates its state (batch statistics, RNG counters) at this trace
        # level; merging without a copy binds the Variables of the caller's trace and raises.
        model = nnx.merge(self.graphdef, params, rest, copy=True)
        token = reset_pipeline_flag()
        not_pipelined = StrategyError(
            "the mesh has a pipe axis, but the loss never ran the model's layer stack through "
            "meshpar.scan_layers, so there is nothing to pipeline; call scan_layers on the "
            "stacked block module in the model's forward pass"
        )
        try:
            out = self.loss_fn(model, batch)
        except Exception as err:
            # A model that scans its stage-layout stack itself fails inside its own scan first.
            if self.pipeline is not None and not pipeline_was_used():
                raise not_pipelined from err
            # out_sharding= and other Explicit-axes code in the model (see meshpar.sharding.explicit).
            if (explained := explain_trace_error(err, mesh=self.mesh)) is not None:
                raise explained from None
            raise
        finally:
            used = pipeline_was_used()
            restore_pipeline_flag(token)
        if self.pipeline is not None and not used:
            raise not_pipelined
        return out, model

    @staticmethod
    def _rest_after(model: nnx.Module, rest: nnx.State) -> nnx.State:
        """The model's non-parameter state after a call, in the structure and dtypes of ``rest``.

        Values a call ``sow``s (``nnx.Intermediate``) are not state that lives on: a loss that
        wants them pops them from the model itself (``nnx.pop(model, nnx.Intermediate)``) and
        returns them as aux.
        """
        new = nnx.state(model, nnx.All(nnx.Not(nnx.Param), nnx.Not(nnx.Intermediate)))
        before = dict(named_leaves(rest))
        after = dict(named_leaves(new))
        if before.keys() != after.keys():
            added = sorted(after.keys() - before.keys())
            gone = sorted(before.keys() - after.keys())
            raise StrategyError(
                "the model's non-parameter state changed shape during the loss: "
                + (f"new variables {added}" if added else "")
                + (", " if added and gone else "")
                + (f"variables gone {gone}" if gone else "")
                + ". Create every variable in the model's constructor (a step must read and "
                "write the same state)"
            )
        return jax.tree.map(
            lambda n, o: n.astype(o.dtype) if jnp.issubdtype(o.dtype, jnp.inexact) else n,
            new, rest,
        )

    def _constrain_grads(self, grads):
        return jax.lax.with_sharding_constraint(grads, self._grad_shardings)

    def _loss_and_grads(self, state: TrainState, batch):
        """``(loss, loss weight, gradients, aux, new rest)`` of the whole step.

        Every path sums the pieces' numerators, denominators and gradients (:mod:`meshpar.train.loss`)
        and divides once here, so that a :class:`~meshpar.train.loss.Ratio` loss equals its
        full-batch value whatever the mesh and microbatching.
        """
        sums, grads, rest = self._summed(state, batch)
        weight = sums.weight
        grads = self._constrain_grads(jax.tree.map(lambda g: g / weight, grads))
        aux = self._output_layout.finish(sums.aux, sums.aux_weight)
        return sums.loss / weight, weight, grads, aux, rest

    def _grads_fn(self, state: TrainState, batch):
        with activate(self.mesh, self.compute_rules, pipeline=self.pipeline):
            loss, _, grads, _, _ = self._loss_and_grads(state, batch)
        return loss, grads

    def _step_fn(self, state: TrainState, batch):
        with activate(self.mesh, self.compute_rules, pipeline=self.pipeline):
            loss, weight, grads, aux, rest = self._loss_and_grads(state, batch)
            opt_state = state.opt_state
            if self.config.offload_optimizer:
                opt_state = jax.device_put(opt_state, self._opt_device_shardings)
            # A zero or non-finite loss weight (a batch that is all padding) is a non-finite
            # step too: its loss and gradients are 0/0.
            finite = jnp.isfinite(loss) & jnp.isfinite(weight) & (weight != 0)

            def apply(args):
                grads, opt_state, params, rest, _ = args
                updates, new_opt = self.tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), new_opt, rest

            def skip(args):
                _, opt_state, params, _, old_rest = args
                return params, opt_state, old_rest

            # A cond, not a select after the update: with jnp.where XLA keeps both the old and
            # the new state alive and makes extra passes over them (+2x temporaries for DP).
            new_params, new_opt, new_rest = jax.lax.cond(
                finite, apply, skip, (grads, opt_state, state.params, rest, state.rest)
            )
            new_state = TrainState(
                state.step + finite.astype(jnp.int32), new_params, new_rest, new_opt
            )

            # Outside the cond on purpose: inside, XLA shares g*g with Adam's second moment and
            # materialises it (measured: 2x the cost of the update).
            grad_norm = global_grad_norm(
                grads, self._grad_shardings,
                exclude=(self._replica_axis,) if self._replica_axis else (),
            )
            metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                       "loss_weight": weight, "aux": aux}
        return new_state, metrics

    # -- host side -----------------------------------------------------------------------------

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """The sharding of a batch leaf: leading dim over the batch axes (``data``, ``fsdp``)."""
        return NamedSharding(self.mesh, PartitionSpec(*self._batch_spec, *([None] * (ndim - 1))))

    def check_batch(self, global_batch_size: int) -> None:
        """Raise :class:`StrategyError` if the batch does not divide over devices × microbatches."""
        self.strategy.check_batch(self.mesh, global_batch_size, microbatches=self.config.microbatches)
        if self.pipeline is not None:
            self.pipeline.validate(self.num_layers, global_batch_size, self.mesh)
            self._note_unsplit_head(global_batch_size)

    def _note_unsplit_head(self, global_batch_size: int) -> None:
        # The compute table splits the batch outside a pipelined stack over pipe too, where it
        # divides (Strategy.compute_rules); where it does not, every stage computes the same
        # rows of the embedding, head and loss. Correct, but slower: said, once.
        batch = self.compute_rules.resolve(("batch",), (global_batch_size,), self.mesh).dims[0]
        skipped = next((r for r in batch.passed_over if PIPE in r.mesh_axes), None)
        if skipped is None:
            return
        ways = math.prod(self.mesh.shape[a] for a in skipped.mesh_axes)
        fallback = Fallback(
            "pipeline head rows",
            f"the global batch of {global_batch_size} rows does not divide over "
            f"{' x '.join(f'{a}={self.mesh.shape[a]}' for a in skipped.mesh_axes)} = {ways}, so "
            "outside the layer stack (embedding, head, loss) every pipeline stage computes the "
            f"same rows instead of its 1/{self.mesh.shape[PIPE]} of them; a batch size that is a "
            f"multiple of {ways} splits them",
        )
        if fallback not in self._fallbacks:
            self._fallbacks.append(fallback)
            warnings.warn(str(fallback), stacklevel=3)

    def place_batch(self, batch: Mapping[str, Any]) -> Any:
        """Put a host batch onto the mesh with its sharding.

        ``batch`` holds this process's rows (the whole global batch in a single process), as
        ``jax.make_array_from_process_local_data`` expects, so the same call works with several
        processes. Every leaf must be an array whose first dimension is the batch, all of one
        size.

        Raises:
            StrategyError: the batch is empty, a leaf is not an array or has no batch
                dimension, leaves disagree on the batch size (each names the key), or the batch
                does not divide over the batch axes and microbatches. Nothing is placed.

        Example:
            >>> import numpy as np
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                   optax.adamw(3e-4), lm_loss,
            ...                   mesh=make_mesh(data=2, fsdp=2, tensor=2), strategy="zero3")
            >>> placed = trainer.place_batch({"x": np.zeros((16, 8), np.float32)})
            >>> placed["x"].sharding.spec                  # rows over the batch axes
            P(('data', 'fsdp'), None)
        """
        arrays, treedef, local_rows = batch_arrays(batch)
        self.check_batch(local_rows * jax.process_count())

        def one(x):
            sharding = self.batch_sharding(x.ndim)
            return jax.make_array_from_process_local_data(
                sharding, x, (x.shape[0] * jax.process_count(), *x.shape[1:])
            )

        return jax.tree.unflatten(treedef, [one(x) for x in arrays])

    def step(self, batch: Mapping[str, Any]) -> StepMetrics:
        """Run one optimizer step on a host batch and return its metrics.

        Returns:
            A :class:`~meshpar.train.metrics.StepMetrics`, also readable as a mapping:
            ``loss``, ``grad_norm``, ``step_time_s``, ``skipped`` (floats and a bool); with a
            :class:`~meshpar.train.loss.Ratio` loss also ``loss_weight`` (its summed weight); with aux
            values (``loss_fn`` returning ``(loss, aux)``) also ``aux``: the aux pytree, reduced
            over shards and microbatches (:mod:`meshpar.train.loss`), scalars as floats and arrays as
            NumPy arrays.

        Raises:
            StrategyError: the batch is malformed (see :meth:`place_batch`); nothing ran.
            TrainingError: the loss is NaN/Inf, or its weight is zero or not finite (unless
                ``on_nonfinite="skip"``); the state is unchanged.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> from meshpar.train.data import TokenBatches
            >>> trainer = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                   optax.adamw(3e-4), lm_loss,
            ...                   mesh=make_mesh(data=2, fsdp=2, tensor=2), strategy="zero3")
            >>> metrics = trainer.step(TokenBatches(batch_size=8, seq_len=32).batch(0))
            >>> metrics.loss == metrics["loss"], metrics.get("aux"), sorted(metrics)
            (True, None, ['grad_norm', 'loss', 'skipped', 'step_time_s'])
        """
        if not self.allocated:
            raise TrainingError("this Trainer was built with allocate=False: its state is "
                                "abstract, it can lower() and compile its step but not run it")
        step = int(self.state.step)
        placed = self.place_batch(batch)
        start = time.perf_counter()
        self.state, metrics = self._jitted(self.state, placed)
        metrics = jax.device_get(metrics)
        aux = jax.tree.map(lambda x: float(x) if np.ndim(x) == 0 else np.asarray(x),
                           metrics.pop("aux"))
        step_time_s = time.perf_counter() - start
        weight = float(metrics["loss_weight"])
        layout = self._output_layout
        out = StepMetrics(
            loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
            step_time_s=step_time_s, skipped=not float(metrics["finite"]),
            loss_weight=weight if layout is not None and layout.weighted else None,
            aux=aux if jax.tree.leaves(aux) else None,
        )
        if out.skipped and self.config.on_nonfinite == "raise":
            if not (math.isfinite(weight) and weight != 0):
                cause = (f"the loss weight summed to {weight} over the global batch (a batch "
                         "whose examples or tokens are all masked out?)")
            else:
                cause = f"non-finite loss ({out.loss})"
            raise TrainingError(
                f"{cause} at step {step}; the update was not applied "
                "and the state is that of before the step. Lower the learning rate, use fp32, fix "
                "the batch, or pass on_nonfinite='skip' to drop such updates"
            )
        return out

    def loss_and_grads(self, batch: Mapping[str, Any]) -> tuple[jax.Array, nnx.State]:
        """Loss and gradients at the current parameters, without updating anything.

        The gradients come in the strategy's gradient layout (sharded from ZeRO-2 on); this is
        the same computation the step runs before the optimizer update.
        """
        return self._jitted_grads(self.state, self.place_batch(batch))

    def lower_loss(self, batch: Mapping[str, Any]):
        """The lowered forward pass alone (loss at the current parameters), for inspection."""

        def forward(state, batch):
            with activate(self.mesh, self.compute_rules, pipeline=self.pipeline):
                piece = self._piece(state.params, state.rest, batch)[1][0]
                return piece.loss / piece.weight

        return jax.jit(forward).lower(self.state, self.place_batch(batch))

    def evaluate(self, fn: Callable[[nnx.Module, Any], Any], batch: Mapping[str, Any]) -> Any:
        """``fn(model, batch)`` at the current parameters: forward only, laid out like the step.

        The batch is placed and sharded as :meth:`step` places it (each process passes its
        rows), the parameters are cast as the step casts them (``precision``), ZeRO-3 gathers
        them at use, and the model is made deterministic (``nnx.view(model,
        deterministic=True)``: no dropout) for the call. Nothing is updated; the output is
        brought to the host. One compiled program per ``fn`` and batch shape.

        Args:
            fn: a pure function of the model and the batch returning arrays (e.g. a loss, or
                logits at some positions).
            batch: this process's rows of a global batch (see :meth:`place_batch`).

        Returns:
            ``fn``'s output as NumPy arrays (replicated: every process gets all of it).

        Raises:
            StrategyError: the batch is malformed (see :meth:`place_batch`).

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> from meshpar.train.data import TokenBatches
            >>> trainer = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                   optax.adamw(3e-4), lm_loss,
            ...                   mesh=make_mesh(data=2, fsdp=2, tensor=2), strategy="zero3")
            >>> held_out = TokenBatches(batch_size=8, seq_len=32, seed=1).batch(0)
            >>> eval_loss = float(trainer.evaluate(lm_loss, held_out))
            >>> 5.0 < eval_loss < 6.0                       # untrained: about ln 256
            True
        """
        cache = self.__dict__.setdefault("_evaluate_jits", {})
        if fn not in cache:
            replicated = NamedSharding(self.mesh, PartitionSpec())

            def forward(state, batch):
                params = state.params
                if self.config.precision == "bf16":
                    params = jax.tree.map(
                        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        params,
                    )
                with activate(self.mesh, self.compute_rules, pipeline=self.pipeline), \
                        contextlib.ExitStack() as scope:
                    if self._gather_at_use is not None:
                        params = self._gather_at_use.prepare(params, scope.enter_context(stacked_scope()))
                    model = nnx.merge(self.graphdef, params, state.rest, copy=True)
                    try:
                        model = nnx.view(model, deterministic=True)
                    except ValueError as err:
                        # A model without any dropout-like layer has no 'deterministic' switch:
                        # it is deterministic already.
                        if "deterministic" not in str(err):
                            raise
                    return fn(model, batch)

            cache[fn] = jax.jit(forward, out_shardings=replicated)
        return jax.device_get(cache[fn](self.state, self.place_batch(batch)))

    def lower(self, batch: Mapping[str, Any]):
        """The lowered step for a host batch (``.compile()`` it to read the compiled program).

        ``batch`` may hold ``jax.ShapeDtypeStruct``s (global shapes): nothing is placed then.
        """
        if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(batch)):
            return self._jitted.lower(self.state, self._abstract_batch(batch))
        return self._jitted.lower(self.state, self.place_batch(batch))

    def model(self) -> nnx.Module:
        """The current model (sharded arrays), e.g. for evaluation."""
        return nnx.merge(self.graphdef, self.flat_params(), self.state.rest)

    @property
    def fallbacks(self) -> tuple[Fallback, ...]:
        """Every part of the step that takes another path than the strategy's usual one, and
        why (:class:`Fallback`): decided when the trainer is built, except a ZeRO fallback for a
        model that runs a layer stack without :func:`meshpar.scan_layers`, found when the step
        is traced: at construction when the trainer was given ``example_batch``, else at the
        first step (and warned about then). ``meshpar train`` prints them.

        Example:
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> trainer = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                   optax.adamw(3e-4), lm_loss,
            ...                   mesh=make_mesh(data=2, fsdp=2, tensor=2), strategy="zero3")
            >>> for fallback in trainer.fallbacks:        # print(fallback) adds its detail
            ...     print(fallback.what)
            ZeRO-3 collectives
            ZeRO-3 up-front gathers
        """
        return tuple(self._fallbacks)

    @property
    def explicit_zero(self) -> bool:
        """Whether the step reduce-scatters ZeRO-2/3 gradients itself (:mod:`meshpar.parallel.zero`).

        ``False`` below ZeRO-2, without an ``fsdp`` axis, with a pipeline, or where a rule splits
        a parameter over ``fsdp`` together with another axis on one dimension: GSPMD then
        reduces the gradients (with an all-reduce + slice on CPU).
        """
        return self._manual_zero is not None

    @property
    def params_plan(self) -> ShardingPlan:
        return self.plan
