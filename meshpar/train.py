"""One jitted train step for any Flax NNX model, any optax optimizer and any strategy.

The step is a single ``jax.jit`` with explicit in/out shardings and the state donated:

* parameters live where :meth:`Strategy.param_rules` says (replicated, or ZeRO-3 sharded);
* gradients and the accumulation buffer where :meth:`Strategy.gradient_rules` says (ZeRO-2 keeps
  the buffer sharded: each microbatch's gradient is reduced straight into its shard); under
  ZeRO-2/3 the gathers and reduce-scatters are written out in a ``shard_map``
  (:mod:`meshpar.zero`, :attr:`Trainer.explicit_zero`);
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshpar.errors import StrategyError, TrainingError
from meshpar.explicit import explain_trace_error
from meshpar.layout import activate
from meshpar.mesh import auto_mesh
from meshpar.plan import plan_training, to_flat_layout, to_stage_layout
from meshpar.shard import ShardingPlan
from meshpar.stack import _PIPELINE_USED, pipeline_was_used, reset_pipeline_flag
from meshpar.strategy import Strategy, get_strategy
from meshpar.zero import ManualZero, StackNotScanned


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of the train step.

    Attributes:
        microbatches: gradient-accumulation steps per optimizer step (``lax.scan``).
        precision: ``"fp32"``, or ``"bf16"`` for bf16 compute with fp32 parameters, gradients
            and optimizer state.
        offload_optimizer: keep optimizer state in ``pinned_host`` memory.
        on_nonfinite: ``"raise"`` (stop with the step number; the state is left as it was before
            the step) or ``"skip"`` (drop that update, count it in the metrics).
        donate: donate the state buffers to the step.
        schedule: pipeline schedule, ``"gpipe"`` or ``"circular"``; used when the mesh has a
            ``pipe`` axis of size > 1, where ``microbatches`` are the pipeline's microbatches.
        repeats: chunks of layers per stage for the circular schedule (``v``).
    """

    microbatches: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    offload_optimizer: bool = False
    on_nonfinite: Literal["raise", "skip"] = "raise"
    donate: bool = True
    schedule: Literal["gpipe", "circular"] = "gpipe"
    repeats: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise StrategyError(f"microbatches={self.microbatches!r}; expected an int >= 1")
        if self.precision not in ("fp32", "bf16"):
            raise StrategyError(f"precision={self.precision!r}; expected 'fp32' or 'bf16'")
        if self.schedule not in ("gpipe", "circular"):
            raise StrategyError(f"schedule={self.schedule!r}; expected 'gpipe' or 'circular'")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise StrategyError(f"repeats={self.repeats!r}; expected an int >= 1")
        if self.schedule == "gpipe" and self.repeats != 1:
            raise StrategyError(
                f"repeats={self.repeats} needs schedule='circular'; gpipe runs each stage's "
                "layers once"
            )
        if self.on_nonfinite not in ("raise", "skip"):
            raise StrategyError(f"on_nonfinite={self.on_nonfinite!r}; expected 'raise' or 'skip'")


def _split_over_free_axes(shape: tuple[int, ...], sharding: Any) -> NamedSharding | None:
    """``sharding`` further split over the mesh axes it replicates over, on a dimension that
    divides; ``None`` when that spans fewer than 4 devices (the slice is written and read back,
    3/ways of a whole read) or no dimension divides."""
    if not isinstance(sharding, NamedSharding) or not shape:
        return None
    sizes = dict(sharding.mesh.shape)
    spec = [() if e is None else (e if isinstance(e, tuple) else (e,))
            for e in (*sharding.spec, *[None] * (len(shape) - len(sharding.spec)))]
    used = {a for e in spec for a in e}
    free = tuple(a for a, n in sizes.items() if n > 1 and a not in used)
    ways = math.prod(sizes[a] for a in free)
    if ways < 4:
        return None
    for d, entry in enumerate(spec):
        if shape[d] % (math.prod(sizes[a] for a in entry) * ways) == 0:
            spec[d] = entry + free
            return NamedSharding(sharding.mesh, PartitionSpec(*(e or None for e in spec)),
                                 memory_kind=sharding.memory_kind)
    return None


def _grad_norm(grads: Any, shardings: Any) -> jax.Array:
    """The global gradient norm, each device summing the squares of its own part only.

    ``optax.tree.norm`` would read every replicated gradient whole on every device (under DP, one
    more pass over all gradients: ~1% of a 20m step on CPU). Here a gradient replicated over 4 or
    more devices is cut over those axes for the sum (a local slice, no communication) and one
    scalar all-reduce adds the parts.
    """
    leaves = jax.tree.leaves(grads)
    placed = jax.tree.leaves(shardings)
    if len(placed) != len(leaves):
        placed = [None] * len(leaves)
    total = jnp.zeros((), jnp.float32)
    for g, sharding in zip(leaves, placed):
        cut = _split_over_free_axes(g.shape, sharding)
        if cut is not None:
            g = jax.lax.with_sharding_constraint(g, cut)
        total = total + optax.tree.norm(g, squared=True)
    return jnp.sqrt(total)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step reads and writes: a pytree, donated to the step."""

    step: jax.Array
    params: nnx.State
    rest: nnx.State  # non-parameter model state (RNG counters, batch stats, ...)
    opt_state: Any


class Trainer:
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

    Example:
        >>> trainer = Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(3e-4), lm_loss,
        ...                   mesh=make_mesh(data=2, fsdp=2, tensor=2), strategy="zero3")
        >>> metrics = trainer.step(batch)       # batch: dict of host arrays, global batch
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
    ) -> None:
        # Explicit axes become Auto over the same devices, with a warning (see meshpar.mesh).
        self.mesh = mesh = auto_mesh(mesh, caller="Trainer")
        self.strategy = get_strategy(strategy).for_mesh(mesh)
        self.config = config
        self.tx = tx
        self.loss_fn = loss_fn
        self.compute_rules = self.strategy.compute_rules(mesh)

        layout = plan_training(
            make_model, mesh=mesh, strategy=self.strategy, tx=tx,
            microbatches=config.microbatches, schedule=config.schedule, repeats=config.repeats,
            offload_optimizer=config.offload_optimizer,
        )
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
        self._manual_zero = ManualZero.build(
            mesh=mesh, batch_axes=self.batch_axes, zero_stage=self.strategy.zero_stage,
            abs_params=layout.abs_params, param_shardings=layout.param_shardings,
            grad_shardings=grad_shardings, pipelined=self.pipeline is not None,
        )

        def init():
            with nnx.use_eager_sharding(False):
                _, params, rest = nnx.split(make_model(), nnx.Param, ...)
            params = to_model_layout(params)
            opt_state = tx.init(params)
            return TrainState(jnp.zeros((), jnp.int32), params, rest, opt_state)

        self.state: TrainState = jax.jit(init, out_shardings=self.state_shardings)()
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

    # -- layouts -------------------------------------------------------------------------------

    def _to_portable(self, state: TrainState) -> dict[str, Any]:
        # Checkpoints hold plain arrays in the model's own layout, so that the format depends
        # on neither the mesh nor a pipeline's stage layout, nor on NNX variable metadata.
        flat = (lambda t: to_flat_layout(t, self.pipeline)) if self.pipeline else (lambda t: t)
        plain = lambda t: jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, t,  # noqa: E731
                                       is_leaf=lambda v: isinstance(v, nnx.Variable))
        return {"step": state.step, "params": plain(flat(state.params)), "rest": plain(state.rest),
                "opt_state": plain(flat(state.opt_state))}

    def _from_portable(self, portable: dict[str, Any]) -> TrainState:
        template = self._flat_template
        fill = lambda tmpl, tree: jax.tree.map(  # noqa: E731
            lambda v, a: v.replace(a) if isinstance(v, nnx.Variable) else a, tmpl, tree,
            is_leaf=lambda v: isinstance(v, nnx.Variable))
        params = fill(template.params, portable["params"])
        opt_state = fill(template.opt_state, portable["opt_state"])
        if self.pipeline:
            params = to_stage_layout(params, self.pipeline)
            opt_state = to_stage_layout(opt_state, self.pipeline)
        return TrainState(portable["step"], params, fill(template.rest, portable["rest"]), opt_state)

    @property
    def _flat_template(self) -> TrainState:
        # Abstract state in the model's own layout (Variables keep their metadata).
        flat = (lambda t: to_flat_layout(t, self.pipeline)) if self.pipeline else (lambda t: t)
        return jax.eval_shape(
            lambda s: TrainState(s.step, flat(s.params), s.rest, flat(s.opt_state)), self.state
        )

    def checkpoint_state(self) -> dict[str, Any]:
        """The state as plain arrays in the model's own layout: what a checkpoint stores.

        Example:
            >>> checkpointer.save(step, trainer.checkpoint_state(), meta={"step": step})
        """
        return self._portable_fn()(self.state)

    def _portable_fn(self):
        if getattr(self, "_portable_jit", None) is None:
            self._portable_jit = jax.jit(self._to_portable)
        return self._portable_jit

    def checkpoint_target(self) -> Any:
        """Abstract arrays with this trainer's shardings, to restore a checkpoint onto."""
        compiled = self._portable_fn().lower(self.state).compile()
        shapes = jax.eval_shape(self._to_portable, self.state)
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            shapes, compiled.output_shardings,
        )

    def load_checkpoint_state(self, portable: dict[str, Any]) -> None:
        """Replace the state with one restored from a checkpoint (any mesh, any layout)."""
        self.state = jax.jit(self._from_portable, out_shardings=self.state_shardings)(portable)

    def flat_params(self) -> nnx.State:
        """The parameters in the model's own layout (pipeline stages merged back into layers)."""
        if self.pipeline is None:
            return self.state.params
        return jax.jit(lambda p: to_flat_layout(p, self.pipeline))(self.state.params)

    # -- the step ------------------------------------------------------------------------------

    def _loss(self, params, rest, batch, prepare=None):
        if self.config.precision == "bf16":
            params = jax.tree.map(
                lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                params,
            )
        if prepare is not None:
            # Manual ZeRO-3 (meshpar.zero): gather shards, after the cast so they travel in bf16.
            params = prepare(params)
        model = nnx.merge(self.graphdef, params, rest)
        token = reset_pipeline_flag()
        not_pipelined = StrategyError(
            "the mesh has a pipe axis, but the loss never ran the model's layer stack through "
            "meshpar.scan_layers, so there is nothing to pipeline; call scan_layers on the "
            "stacked block module in the model's forward pass"
        )
        try:
            loss = self.loss_fn(model, batch)
        except Exception as err:
            # A model that scans its stage-layout stack itself fails inside its own scan first.
            if self.pipeline is not None and not pipeline_was_used():
                raise not_pipelined from err
            # out_sharding= and other Explicit-axes code in the model (see meshpar.explicit).
            if (explained := explain_trace_error(err, mesh=self.mesh)) is not None:
                raise explained from None
            raise
        finally:
            used = pipeline_was_used()
            _PIPELINE_USED.reset(token)
        if self.pipeline is not None and not used:
            raise not_pipelined
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        return jnp.asarray(loss, jnp.float32), new_rest

    def _constrain_grads(self, grads):
        return jax.lax.with_sharding_constraint(grads, self._grad_shardings)

    def _loss_and_grads(self, state: TrainState, batch):
        """Mean loss and gradients over the microbatches, gradients in their strategy layout."""
        if self._manual_zero is not None:
            return self._manual_zero_grads(state, batch)
        # In a pipelined layout the microbatches belong to the pipeline, not to accumulation.
        m = 1 if self.pipeline is not None else self.config.microbatches
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if m == 1:
            (loss, rest), grads = grad_fn(state.params, state.rest, batch)
            return loss, self._constrain_grads(grads), rest
        micro = self._microbatches(batch)
        zeros = self._constrain_grads(
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        )

        def body(carry, mb):
            acc, loss_sum, rest = carry
            (loss, rest), grads = grad_fn(state.params, rest, mb)
            # Under ZeRO-2 the constraint makes each microbatch's gradient land in its shard.
            acc = self._constrain_grads(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads))
            return (acc, loss_sum + loss, rest), None

        if self.strategy.zero_stage <= 1 and self.batch_axes:
            return self._accumulate_locally(state, micro, body)
        (acc, loss_sum, rest), _ = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32), state.rest), micro
        )
        return loss_sum / m, jax.tree.map(lambda a: a / m, acc), rest

    def _microbatches(self, batch):
        # Microbatch k takes rows k, k+M, k+2M, ...: every device keeps its own rows.
        m = self.config.microbatches
        micro_spec = NamedSharding(self.mesh, PartitionSpec(None, *self._batch_spec))
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1), micro_spec
            ),
            batch,
        )

    def _manual_zero_grads(self, state: TrainState, batch):
        """ZeRO-2/3 with explicit reduce-scatters (see :mod:`meshpar.zero`)."""
        try:
            loss, grads, rest = self._manual_zero.loss_and_grads(
                self._loss, state.params, state.rest, self._microbatches(batch),
                microbatches=self.config.microbatches,
            )
        except StackNotScanned:
            # The model runs a layer stack without meshpar.scan_layers, so nothing can gather
            # it one layer at a time: GSPMD places the gathers (and all-reduces the gradients).
            self._manual_zero = None
            return self._loss_and_grads(state, batch)
        return loss, self._constrain_grads(grads), rest

    def _accumulate_locally(self, state: TrainState, micro, body):
        """DP / ZeRO-1 accumulation: sum local gradients, reduce once after the loop.

        Under GSPMD a replicated accumulator forces an all-reduce of every microbatch's
        gradient inside the loop (M times the traffic). Here the loop runs inside a
        ``shard_map`` that is manual over the batch axes: the parameters are cast to *varying*
        before the loop, so their gradients stay per-device partial sums (no collective in the
        transpose), and one ``pmean`` after the loop reduces them.
        """
        m = self.config.microbatches
        axes = self.batch_axes

        def local(params, rest, micro):
            varying = lambda t: jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), t)  # noqa: E731
            params = varying(params)
            zeros = varying(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
            loss0 = varying(jnp.zeros((), jnp.float32))

            def local_body(carry, mb):
                acc, loss_sum, rest = carry
                (loss, rest), grads = jax.value_and_grad(self._loss, has_aux=True)(params, rest, mb)
                acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
                return (acc, loss_sum + loss, rest), None

            (acc, loss_sum, rest), _ = jax.lax.scan(local_body, (zeros, loss0, rest), micro)
            return jax.lax.pmean(loss_sum / m, axes), jax.lax.pmean(jax.tree.map(lambda a: a / m, acc), axes), rest

        loss, grads, rest = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(None, axes)),
            out_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec()),
            axis_names=set(axes),
        )(state.params, state.rest, micro)
        return loss, self._constrain_grads(grads), rest

    def _grads_fn(self, state: TrainState, batch):
        with activate(self.mesh, self.compute_rules, pipeline=self.pipeline):
            loss, grads, _ = self._loss_and_grads(state, batch)
        return loss, grads

    def _step_fn(self, state: TrainState, batch):
        with activate(self.mesh, self.compute_rules, pipeline=self.pipeline):
            loss, grads, rest = self._loss_and_grads(state, batch)
            opt_state = state.opt_state
            if self.config.offload_optimizer:
                opt_state = jax.device_put(opt_state, self._opt_device_shardings)
            finite = jnp.isfinite(loss)

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
            grad_norm = _grad_norm(grads, self._grad_shardings)
            metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
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

    def place_batch(self, batch: Mapping[str, Any]) -> Any:
        """Put a host batch onto the mesh with its sharding.

        ``batch`` holds this process's rows (the whole global batch in a single process), as
        ``jax.make_array_from_process_local_data`` expects, so the same call works with several
        processes.
        """
        leaves = jax.tree.leaves(batch)
        if not leaves:
            raise StrategyError("the batch is empty")
        global_rows = leaves[0].shape[0] * jax.process_count()
        self.check_batch(global_rows)

        def one(x):
            x = np.asarray(x)
            sharding = self.batch_sharding(x.ndim)
            return jax.make_array_from_process_local_data(
                sharding, x, (x.shape[0] * jax.process_count(), *x.shape[1:])
            )

        return jax.tree.map(one, batch)

    def step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """Run one optimizer step on a host batch and return its metrics as floats.

        Raises:
            TrainingError: the loss is NaN/Inf (unless ``on_nonfinite="skip"``); the state is
                unchanged.
        """
        step = int(self.state.step)
        placed = self.place_batch(batch)
        start = time.perf_counter()
        self.state, metrics = self._jitted(self.state, placed)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics["step_time_s"] = time.perf_counter() - start
        metrics["skipped"] = not metrics.pop("finite")
        if metrics["skipped"] and self.config.on_nonfinite == "raise":
            raise TrainingError(
                f"non-finite loss ({metrics['loss']}) at step {step}; the update was not applied "
                "and the state is that of before the step. Lower the learning rate, use fp32, or "
                "pass on_nonfinite='skip' to drop such updates"
            )
        return metrics

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
                return self._loss(state.params, state.rest, batch)[0]

        return jax.jit(forward).lower(self.state, self.place_batch(batch))

    def lower(self, batch: Mapping[str, Any]):
        """The lowered step for a host batch (``.compile()`` it to read the compiled program)."""
        return self._jitted.lower(self.state, self.place_batch(batch))

    def model(self) -> nnx.Module:
        """The current model (sharded arrays), e.g. for evaluation."""
        return nnx.merge(self.graphdef, self.flat_params(), self.state.rest)

    @property
    def explicit_zero(self) -> bool:
        """Whether the step reduce-scatters ZeRO-2/3 gradients itself (:mod:`meshpar.zero`).

        ``False`` below ZeRO-2, without an ``fsdp`` axis, with a pipeline, or where a rule splits
        a parameter over ``fsdp`` together with another axis on one dimension: GSPMD then
        reduces the gradients (with an all-reduce + slice on CPU).
        """
        return self._manual_zero is not None

    @property
    def params_plan(self) -> ShardingPlan:
        return self.plan
