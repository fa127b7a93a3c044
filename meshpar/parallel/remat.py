"""Rematerialisation (activation checkpointing) policies by name.

A remat policy decides which intermediates of a function autodiff keeps for the backward pass and
which it recomputes. meshpar names a few of JAX's policies so that a config or the CLI can pick one
with a string:

=================  ===========================================================================
name               what is saved for the backward pass
=================  ===========================================================================
``none``           everything (no ``jax.checkpoint`` at all)
``full``           nothing: the whole function is recomputed (``nothing_saveable``)
``dots``           the results of matmuls (``checkpoint_dots``)
``dots_no_batch``  the results of matmuls without batch dimensions, i.e. weight matmuls
                   (``dots_with_no_batch_dims_saveable``)
``offload``        like ``dots_no_batch``, but the saved values move to ``pinned_host`` memory
                   (``offload_dot_with_no_batch_dims("device", "pinned_host")``)
=================  ===========================================================================

Why ``full`` is the default for scanned layers: under ZeRO-3 the weights of a layer are gathered
inside the scan body; without remat, autodiff saves every gathered layer for the backward pass and
the whole model lives unsharded in temporaries. Recomputing the body gathers each layer again in
the backward pass instead, which is what ZeRO-3 intends.

On CPU the ``offload`` policy is accepted and numerically correct, but nothing is moved (host
placement is lowered for TPU/GPU only): it tests the plumbing, not the saving.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax

from meshpar.errors import StrategyError

F = TypeVar("F", bound=Callable[..., Any])

#: The policy names :func:`remat_policy` and :func:`maybe_remat` accept.
REMAT_POLICIES: tuple[str, ...] = ("none", "full", "dots", "dots_no_batch", "offload")


def check_remat_name(name: object, /, *, field: str = "remat") -> str:
    """Check that ``name`` is a known remat policy name and return it.

    Args:
        name: the candidate name.
        field: what to call the value in the error message (e.g. ``"GPTConfig.remat"``).

    Returns:
        ``name`` unchanged.

    Raises:
        StrategyError: ``name`` is not one of :data:`REMAT_POLICIES`.

    Example:
        >>> check_remat_name("dots")
        'dots'
    """
    if not isinstance(name, str) or name not in REMAT_POLICIES:
        raise StrategyError(
            f"{field}={name!r} is not a remat policy; valid names are "
            + ", ".join(repr(n) for n in REMAT_POLICIES)
        )
    return name


def remat_policy(name: str, /) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy for a policy name.

    Args:
        name: one of :data:`REMAT_POLICIES`.

    Returns:
        The policy to pass as ``jax.checkpoint(fn, policy=...)``, or ``None`` for ``"none"``,
        meaning "do not wrap the function in ``jax.checkpoint`` at all" (not JAX's own
        ``policy=None``, which would save nothing).

    Raises:
        StrategyError: an unknown name; the message lists the valid ones.

    Example:
        >>> remat_policy("none") is None
        True
        >>> remat_policy("full") is jax.checkpoint_policies.nothing_saveable
        True
    """
    check_remat_name(name)
    policies = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "full":
        return policies.nothing_saveable
    if name == "dots":
        return policies.checkpoint_dots
    if name == "dots_no_batch":
        return policies.dots_with_no_batch_dims_saveable
    # "offload": built on each call; the policy is a fresh closure either way.
    return policies.offload_dot_with_no_batch_dims("device", "pinned_host")


def maybe_remat(fn: F, name: str, /, *, prevent_cse: bool = True) -> F:
    """Wrap ``fn`` in ``jax.checkpoint`` with the named policy (``"none"`` returns ``fn``).

    Args:
        fn: the function to rematerialise, typically a scan body over layers.
        name: one of :data:`REMAT_POLICIES`.
        prevent_cse: passed to ``jax.checkpoint``. Under ``lax.scan`` it may be set to ``False``
            (scan already stops the CSE that would undo remat), which can give slightly better
            code; the default is the safe choice everywhere.

    Returns:
        ``fn`` itself for ``"none"``, otherwise ``jax.checkpoint(fn, policy=remat_policy(name))``.

    Raises:
        StrategyError: an unknown name.

    Example:
        >>> def body(carry, w):
        ...     return jax.numpy.tanh(carry @ w), None
        >>> body_remat = maybe_remat(body, "full")
        >>> maybe_remat(body, "none") is body
        True
    """
    policy = remat_policy(name)
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)  # type: ignore[return-value]
