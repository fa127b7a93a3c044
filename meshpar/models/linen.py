"""Flax Linen models through the Trainer, by Flax's own Linen -> NNX bridge.

:func:`from_linen` turns a Linen module into an NNX module with ``flax.nnx.bridge.ToNNX`` and
creates its variables by running the module's ``init`` on example inputs (the bridge's
``lazy_init``). What the bridge gives is exactly what the Trainer already handles:

* Linen ``params`` become ``nnx.Param``; ``nn.with_logical_partitioning`` names become the
  variables' ``out_sharding`` metadata, which meshpar's rules read as logical axes (as for an NNX
  model annotated with ``nnx.with_partitioning``);
* every other collection becomes non-parameter state (``batch_stats`` -> ``nnx.BatchStat``, any
  other name -> an NNX variable type of that name), updated by the call and kept between steps;
* the RNG streams (``params``, ``dropout``, ...) live in the module as ``nnx.Rngs`` state: every
  call draws a fresh key per stream and hands it to Linen's ``make_rng``, so dropout masks change
  every step and equal a one-device run's (JAX's threefry is partitionable).

The only thing meshpar adds is a default for ``mutable``: the bridged module applies the Linen
module with the state collections mutable, so a loss function calls it as it would call the Linen
module itself, ``model(x, train=True)``, and gets back what the Linen ``__call__`` returns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import flax.errors
import jax
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge
from flax.nnx import variablelib

from meshpar.errors import StrategyError

# Linen collections that cannot be training state. ``params`` are the optimizer's to update,
# not the forward pass's; ``intermediates`` (``self.sow``) are per-call outputs that Linen
# appends to on every call, so as state they would grow each step.
_NOT_MUTABLE = {
    "params": "parameters are updated by the optimizer from their gradients; a forward pass that "
              "writes them cannot be trained by meshpar",
    "intermediates": "values sown with self.sow are per-call outputs that grow with every call, "
                     "not state a step can carry; return them from __call__ instead (the loss "
                     "function can put them in its aux)",
}


class LinenModule(bridge.ToNNX):
    """``flax.nnx.bridge.ToNNX`` that applies the Linen module with its state collections mutable.

    Built by :func:`from_linen`. Calling it runs ``linen_module.apply(variables, *args,
    rngs=<a fresh key per stream>, mutable=<the state collections>, **kwargs)``, stores the
    updated collections in the module and returns the Linen ``__call__``'s output (the bridge
    drops the updates from the return value). ``mutable=`` on a call overrides the default.
    """

    def __init__(self, module: nn.Module, rngs: nnx.Rngs, mutable: tuple[str, ...] | None):
        super().__init__(module, rngs=rngs)
        # ToNNX hands every attribute not named 'to_nnx__...' to Linen as a variable collection,
        # so the default must live under that prefix. A tuple of names is static: it goes into
        # the graphdef, not the state.
        self.to_nnx__mutable = mutable

    def __call__(self, *args: Any, rngs: Any = None, method: Any = None, mutable: Any = None,
                 **kwargs: Any) -> Any:
        if mutable is None:
            mutable = list(self.to_nnx__mutable) if self.to_nnx__mutable else False
        before = {name: value for name, value in vars(self).items()
                  if not name.startswith(("to_nnx__", "_pytree__"))}
        try:
            out = super().__call__(*args, rngs=rngs, method=method, mutable=mutable, **kwargs)
        except flax.errors.ScopeCollectionNotFound as err:
            if self._pytree__state.initializing:
                raise
            # A variable the init never created (it ran in another mode): a training step can
            # only read and update state that exists from the start.
            found = re.search(r'from collection "([^"]*)"', str(err))
            raise StrategyError(
                f"{type(self.to_nnx__module).__name__} uses the Linen collection "
                f"{found.group(1) if found else '?'!r}, which its init did not create "
                f"({str(err).splitlines()[0]}); pass from_linen "
                "example inputs that create it (train=True?), and name it in mutable= if the "
                "call writes it"
            ) from err
        self._write_back(before)
        return out

    def _write_back(self, before: dict[str, Any]) -> None:
        """Put the values of the collections a call updated into the variables it started with.

        The bridge stores an updated collection as *new* variables, with the metadata of the
        moment (``eager_sharding`` among it), not the originals'. The Trainer keeps the model's
        non-parameter state by structure, metadata included, so the values go back into the
        original variables. A variable the call created (not there before) stays as the bridge
        made it, and the Trainer reports it as new state.
        """
        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        for name, old in before.items():
            new = getattr(self, name, None)
            if new is old:
                continue
            old_vars = dict(jax.tree_util.tree_flatten_with_path(old, is_leaf=is_var)[0])
            new_vars = jax.tree_util.tree_flatten_with_path(new, is_leaf=is_var)[0]
            if any(path not in old_vars for path, _ in new_vars):
                continue
            for path, var in new_vars:
                if is_var(var) and var is not old_vars[path]:
                    old_vars[path].set_value(var.get_value())
            setattr(self, name, old)


def _collection(variable: nnx.Variable) -> str:
    return variablelib.variable_name_from_type(type(variable), allow_register=True)


def _linen_variables(model: LinenModule) -> list[tuple[str, str, Any]]:
    """``(collection, path, value)`` of every Linen variable the bridge created."""
    out = []
    for name, value in vars(model).items():
        if name.startswith(("to_nnx__", "_pytree__")):
            continue
        leaves = jax.tree_util.tree_flatten_with_path(
            value, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
        for path, var in leaves:
            if isinstance(var, nnx.Variable):
                keys = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
                out.append((_collection(var), f"{name}/{keys}" if keys else name, var.get_value()))
    return out


def _check_module(module: Any) -> None:
    if isinstance(module, type) and issubclass(module, nn.Module):
        raise StrategyError(
            f"from_linen needs a Linen module instance, got the class {module.__name__}; "
            f"construct it first: from_linen({module.__name__}(...), example_x, rngs=...)"
        )
    if isinstance(module, nnx.Module):
        raise StrategyError(
            f"from_linen converts Linen modules, but {type(module).__name__} is already an NNX "
            "module: give the Trainer a factory that returns it directly (make_model=lambda: ...)"
        )
    if not isinstance(module, nn.Module):
        raise StrategyError(
            f"from_linen needs a flax.linen.Module instance, got {type(module).__name__} "
            f"({module!r:.80})"
        )


def _check_mutable(mutable: Any) -> tuple[str, ...] | None:
    """``None`` (every state collection), or the named collections; refuse what cannot be state."""
    if mutable is None or mutable is True:
        return None
    if mutable is False:
        return ()
    names = (mutable,) if isinstance(mutable, str) else tuple(mutable)
    for name in names:
        if not isinstance(name, str):
            raise StrategyError(
                f"from_linen(mutable=...) takes Linen collection names (str), got {name!r}")
        if name in _NOT_MUTABLE:
            raise StrategyError(
                f"the Linen collection {name!r} cannot be carried as training state: "
                f"{_NOT_MUTABLE[name]}"
            )
    return names


def from_linen(
    module: nn.Module,
    /,
    *example_args: Any,
    rngs: nnx.Rngs | int,
    mutable: bool | str | Iterable[str] | None = None,
    **example_kwargs: Any,
) -> nnx.Module:
    """Turn a Flax Linen module into an NNX module that :class:`~meshpar.Trainer` trains.

    Call it inside ``make_model``: the Trainer builds the model abstractly to plan it, then again
    under ``jax.jit`` with the planned shardings, so every variable is created directly in its
    shard, as for an NNX model. The Linen module's ``init`` runs on the example inputs (only
    their shapes and dtypes matter), so pass them as a training call would: with ``train=True``
    or whatever flag creates every variable the training call uses.

    In the bridged model:

    * ``params`` are ``nnx.Param``; ``nn.with_logical_partitioning(init, ("embed", "mlp"))``
      names are the logical axes meshpar's rules place (``trainer.plan`` shows them);
    * the other collections (``batch_stats``, a ``cache``, your own) are non-parameter state,
      updated by each training step and kept between steps;
    * each call draws a fresh key from every stream of ``rngs`` for Linen's ``make_rng``
      (``nn.Dropout`` uses ``"dropout"``): a new mask every step, equal to a one-device run's.

    The init key is drawn from the ``params`` stream of ``rngs`` (the bridge forks the streams),
    so the initial values differ from ``module.init(jax.random.key(seed), ...)``'s; they are the
    same on every mesh and strategy.

    A loss function calls the model like the Linen module, without ``variables``, ``rngs`` or
    ``mutable``: ``model(x, train=True)`` returns what the Linen ``__call__`` returns. Other
    methods work too: ``model.encode(x)`` applies ``method=Net.encode``.

    Args:
        module: a ``flax.linen.Module`` instance (annotated with
            ``nn.with_logical_partitioning`` where you want meshpar to shard).
        *example_args: example positional inputs for ``module.init``.
        rngs: the RNG streams, e.g. ``nnx.Rngs(params=0, dropout=1)`` (an ``int`` seeds
            ``params`` only). ``params`` (or ``default``) seeds the init; every stream the
            module asks ``make_rng`` for must be there.
        mutable: the collections a call may update: ``None`` or ``True`` (default) for every
            collection except ``params`` that the init created, ``False`` for none, or their
            names. ``"params"`` and ``"intermediates"`` are refused.
        **example_kwargs: example keyword inputs for ``module.init`` (e.g. ``train=True``).

    Returns:
        An NNX module (a ``flax.nnx.bridge.ToNNX``) holding the Linen variables.

    Raises:
        StrategyError: ``module`` is not a Linen module instance; no example inputs; ``rngs``
            without a ``params`` stream, or created outside the function that calls
            ``from_linen`` (the Trainer traces ``make_model``); ``mutable``
            names a collection that cannot be training state (``params``, ``intermediates``)
            or that the init did not create; the init created a collection whose values are
            not arrays (sown values) or two collections with a variable at the same path.

    Example:
        >>> import numpy as np
        >>> import optax
        >>> import meshpar as mp
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, train: bool):
        ...         dense = lambda n, axes: nn.Dense(n, kernel_init=nn.with_logical_partitioning(
        ...             nn.initializers.lecun_normal(), axes))
        ...         h = nn.BatchNorm(use_running_average=not train)(dense(64, ("embed", "mlp"))(x))
        ...         h = nn.Dropout(0.1, deterministic=not train)(nn.relu(h))
        ...         return dense(10, ("mlp", "vocab"))(h)
        >>> def loss_fn(model, batch):
        ...     logits = model(batch["x"], train=True)      # what Net.__call__ returns
        ...     return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        >>> trainer = mp.Trainer(
        ...     lambda: mp.from_linen(Net(), np.zeros((1, 32), np.float32), train=True,
        ...                           rngs=nnx.Rngs(params=0, dropout=1)),
        ...     optax.adamw(1e-3), loss_fn, mesh=mp.make_mesh(data=2, fsdp=2, tensor=2),
        ...     strategy="zero3")
        >>> trainer.plan["Dense_0/kernel"].spec      # ("embed", "mlp")
        P('fsdp', 'tensor')
        >>> metrics = trainer.step({"x": np.ones((8, 32), np.float32),
        ...                         "y": np.zeros((8,), np.int32)})
    """
    _check_module(module)
    if not example_args and not example_kwargs:
        raise StrategyError(
            f"from_linen({type(module).__name__}()) needs example inputs: Linen creates its "
            "variables by running the module once, so their shapes come from the inputs; pass "
            "them as a training call would, e.g. from_linen(net, x[:1], train=True, rngs=...)"
        )
    if isinstance(rngs, int):
        rngs = nnx.Rngs(params=rngs)
    if not isinstance(rngs, nnx.Rngs):
        raise StrategyError(
            f"from_linen(rngs=...) takes an nnx.Rngs, e.g. nnx.Rngs(params=0, dropout=1), or an "
            f"int seed, got {type(rngs).__name__}"
        )
    streams = [name for name, _ in rngs.items()]
    if "params" not in streams and "default" not in streams:
        raise StrategyError(
            f"from_linen(rngs=...) has the streams {streams} but no 'params' (or 'default') "
            "stream, which Linen's init needs to create the parameters; e.g. "
            "nnx.Rngs(params=0, dropout=1)"
        )
    wanted = _check_mutable(mutable)
    # The logical names become NNX out_sharding metadata. Without this, NNX would try to shard
    # each variable the moment it is created, reading logical names as mesh axes (and raising
    # when no mesh is set); meshpar places them later, by its rules.
    with nnx.use_eager_sharding(False):
        try:
            # The bridge forks the streams: it draws from ``rngs``, which must belong to this trace.
            model = LinenModule(module, rngs, None)
        except flax.errors.TraceContextError as err:
            raise StrategyError(
                "from_linen(rngs=...) got an nnx.Rngs created outside the function that calls "
                "from_linen; the Trainer runs make_model under jax tracing (to plan, then to build "
                "the model sharded), where streams from outside cannot advance. Create the "
                "streams inside make_model: lambda: mp.from_linen(net, x, rngs=nnx.Rngs(params=0, "
                "dropout=1))"
            ) from err
        try:
            bridge.lazy_init(model, *example_args, **example_kwargs)
        except ValueError as err:
            if "duplicate variable path" not in str(err):
                raise
            raise StrategyError(
                f"{type(module).__name__}: two Linen collections hold a variable at the same "
                f"path, which an NNX module cannot ({err}); rename one of the variables"
            ) from err

    variables = _linen_variables(model)
    for collection, path, value in variables:
        # Linen's self.sow stores a tuple of values per call; the bridge keeps it as one
        # variable whose value is a tuple, which no sharding plan or optimizer can carry.
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise StrategyError(
                f"the Linen collection {collection!r} holds {path} = {type(value).__name__}, not "
                "an array (a value sown with self.sow during init?), so it cannot be training "
                "state; skip the sow while initialising (if not self.is_initializing(): ...) or "
                "return the value from __call__"
            )
    created = sorted({c for c, _, _ in variables} - {"params"})
    if wanted is None:
        wanted = tuple(created)
    missing = [c for c in wanted if c not in created]
    if missing:
        raise StrategyError(
            f"from_linen(mutable=...) names the Linen collection(s) {missing}, which "
            f"{type(module).__name__}'s init did not create (it created "
            f"{created or 'no state collections'}); a training step can only update state "
            "that exists from the start: pass example inputs that create it (train=True?) or "
            "drop the name"
        )
    model.to_nnx__mutable = tuple(wanted)
    return model
