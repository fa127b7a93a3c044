"""A train state in its portable form: plain arrays in the model's own layout, for checkpoints.

Checkpoints hold plain arrays (no NNX variable metadata, typed PRNG keys as their ``uint32``
payload, see :mod:`meshpar.train.state`) in the model's own layout (a pipeline's stage layout
merged back into layers), so that the format depends on neither the mesh nor the pipeline.
:class:`PortableState` gives :class:`~meshpar.train.trainer.Trainer` the conversions both ways,
as methods that read its ``state``, ``state_shardings`` and ``pipeline``.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from meshpar.train.plan import to_flat_layout, to_stage_layout
from meshpar.train.state import TrainState, data_to_keys, keys_to_data


class PortableState:
    """Checkpoint conversions of a :class:`~meshpar.train.trainer.Trainer`'s state (a base of it)."""

    def _to_portable(self, state: TrainState) -> dict[str, Any]:
        # Checkpoints hold plain arrays in the model's own layout, so that the format depends
        # on neither the mesh nor a pipeline's stage layout, nor on NNX variable metadata.
        flat = (lambda t: to_flat_layout(t, self.pipeline)) if self.pipeline else (lambda t: t)
        plain = lambda t: jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, t,  # noqa: E731
                                       is_leaf=lambda v: isinstance(v, nnx.Variable))
        return {"step": state.step, "params": plain(flat(state.params)),
                "rest": keys_to_data(plain(state.rest)), "opt_state": plain(flat(state.opt_state))}

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
        rest = data_to_keys(portable["rest"], template.rest)
        return TrainState(portable["step"], params, fill(template.rest, rest), opt_state)

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
            >>> import optax
            >>> from flax import nnx
            >>> from meshpar.mesh import make_mesh
            >>> from meshpar.models import GPT, get_preset, lm_loss
            >>> from meshpar.train import Trainer
            >>> trainer = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
            ...                   optax.adamw(3e-4), lm_loss, mesh=make_mesh(fsdp=8))
            >>> state = trainer.checkpoint_state()
            >>> sorted(state), state["params"]["tok_embed"].shape
            (['opt_state', 'params', 'rest', 'step'], (256, 64))

            A :class:`~meshpar.train.checkpoint.Checkpointer` saves it:
            ``checkpointer.save(step, trainer.checkpoint_state(), meta={"step": step})``.
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
