"""Running a stack of identical layers: a ``lax.scan``, or a pipeline when one is active.

Models call :func:`scan_layers` on their repeated block (an NNX module created with ``nnx.vmap``,
parameters stacked on a leading ``layers`` axis). Without a pipeline it is a plain scan, so
compile time stays flat in depth. When the trainer runs a pipelined layout, the same call runs
the stack as pipeline stages (:func:`meshpar.parallel.pipeline.pipeline_apply`): the parameters then
arrive already in stage layout (``[stages, layers_per_stage, ...]`` or ``[repeats, stages, ...]``)
and the batch is cut into the pipeline's microbatches here. The model does not change.

Layers with RNG streams or batch statistics run in a pipeline too: the stack then runs once per
microbatch (rows ``k, k+M, ...``), microbatches in order, so each layer's state advances as in a
loop over the microbatches on one device -- a fresh dropout mask per microbatch, batch statistics
per microbatch. Without a pipeline the stack runs once on the whole batch.
"""

from __future__ import annotations

import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from meshpar.parallel.layout import active_layout
from meshpar.parallel.pipeline import pipeline_apply, stack_stages, unstack_stages
from meshpar.parallel.remat import maybe_remat
from meshpar.parallel.zero import layer_gather

# Set when a pipelined trace ran a stack, so the trainer can tell a model that never did.
_PIPELINE_USED: contextvars.ContextVar[bool] = contextvars.ContextVar("meshpar_stack_used", default=False)


def _scan(graphdef, state, x, remat: str):
    """``(activations after the stack, the layers' non-parameter state after it or None)``."""
    # Under manual ZeRO-3 (meshpar.parallel.zero) the stack arrives as fsdp shards: gather one layer at a
    # time inside the (rematerialised) body, so at most about one layer is whole.
    gather = layer_gather(state)
    # Batch statistics and RNG counters of the layers change as they run: the scan hands each
    # layer's new state out, so the stack keeps it (as a Python loop over the layers would).
    has_state = bool(jax.tree.leaves(nnx.filter_state(state, nnx.Not(nnx.Param))))

    def body(h, layer_state):
        if gather is not None:
            layer_state = gather(layer_state)
        layer = nnx.merge(graphdef, layer_state)
        h = layer(h)
        return h, (nnx.state(layer, nnx.Not(nnx.Param)) if has_state else None)

    return jax.lax.scan(maybe_remat(body, remat), x, state)


def scan_layers(stack: nnx.Module, x: jax.Array, /, *, remat: str = "full") -> jax.Array:
    """Apply every layer of a stacked module to ``x`` in order (``x = layer_i(x)``).

    Args:
        stack: a module whose parameters carry a leading layer axis; one slice of it, merged
            back, must map ``x`` to an array of the same shape (a residual block).
        x: the activations, batch first.
        remat: the remat policy of one layer (:data:`meshpar.parallel.remat.REMAT_POLICIES`).

    Returns:
        The activations after the last layer.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> class Residual(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.linear = nnx.Linear(16, 16, rngs=rngs)
        ...     def __call__(self, x):
        ...         return x + jnp.tanh(self.linear(x))
        >>> @nnx.split_rngs(splits=4)
        ... @nnx.vmap(in_axes=(0,), out_axes=0)
        ... def make_stack(rngs):
        ...     return Residual(rngs)
        >>> stack = make_stack(nnx.Rngs(0))              # 4 layers, stacked
        >>> stack.linear.kernel.shape
        (4, 16, 16)
        >>> scan_layers(stack, jnp.ones((2, 16)), remat="full").shape
        (2, 16)

        In a model, ``x = scan_layers(self.blocks, x)`` inside its ``__call__``.
    """
    graphdef, state = nnx.split(stack)
    layout = active_layout()
    if layout is None or layout.pipeline is None:
        x, new_state = _scan(graphdef, state, x, remat)
        if new_state is not None:
            nnx.update(stack, new_state)
        return x

    config = layout.pipeline
    _PIPELINE_USED.set(True)
    m = config.microbatches
    # Microbatch k takes rows k, k+M, ...: the batch sharding stays where it is (no traffic).
    xs = jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)
    params, rest = nnx.split_state(state, nnx.Param, ...)
    if not jax.tree.leaves(rest):
        out = pipeline_apply(
            lambda chunk, h: _scan(graphdef, chunk, h, remat)[0], params, xs,
            mesh=layout.mesh, config=config,
        )
    else:
        # RNG streams or batch statistics in the layers: the parameters arrive in stage
        # layout, the state in the model's [layers, ...]; the pipeline carries each chunk's
        # state and hands it back, and the stack keeps it (meshpar.parallel.pipeline, "State").
        staged = stack_stages(rest, stages=config.stages, repeats=config.repeats)

        def stage_fn(chunk, chunk_state, h):
            return _scan(graphdef, nnx.merge_state(chunk, chunk_state), h, remat)

        out, staged = pipeline_apply(stage_fn, params, xs, mesh=layout.mesh, config=config,
                                     stage_state=staged)
        nnx.update(stack, unstack_stages(staged, stages=config.stages, repeats=config.repeats))
    return jnp.swapaxes(out, 0, 1).reshape(x.shape)


def pipeline_was_used() -> bool:
    """Whether a pipelined :func:`scan_layers` ran in the current context."""
    return _PIPELINE_USED.get()


def reset_pipeline_flag() -> contextvars.Token:
    """Clear the flag :func:`pipeline_was_used` reads; the token goes to
    :func:`restore_pipeline_flag`."""
    return _PIPELINE_USED.set(False)


def restore_pipeline_flag(token: contextvars.Token, /) -> None:
    """Put the flag back as it was before :func:`reset_pipeline_flag` returned ``token``."""
    _PIPELINE_USED.reset(token)
