"""Models written for Explicit mesh axes, traced by meshpar on Auto axes: one clear error.

Flax's Gemma example passes ``out_sharding=`` to its layers (``nnx.Linear``, ``nnx.Embed``,
``jnp.einsum``/``jnp.dot``). JAX accepts that only where the named mesh axes are **Explicit**;
meshpar's train step runs on **Auto** axes (see :mod:`meshpar.mesh`), and there each such call
fails while the step is first traced, with one of these raw JAX errors (jax 0.10.2):

* ``dot_general``/``einsum``/``dot`` with a ``PartitionSpec``: "PartitionSpec passed to
  dot_general cannot contain axis names that are of type Auto or Manual", or, where no mesh is
  set, "Using PartitionSpec when you are not under a mesh context is not allowed";
* ``nnx.Embed`` (which wraps ``jnp.take`` in ``jax.sharding.auto_axes``) inside one of meshpar's
  ``shard_map`` regions (ZeRO-2/3, accumulation, pipelines): ``NotImplementedError: Going from
  `Manual` AxisType to `Auto` or `Explicit` AxisType is not allowed. Please file a bug ...``;
* a ``with_sharding_constraint`` on a mesh the model made Explicit itself: "can only refer to
  Auto axes of the mesh".

:func:`explain_trace_error` turns these into one :class:`~meshpar.errors.MeshError` that names the
model's line and says what to change; the Trainer calls it where it traces the loss.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from types import TracebackType

import flax
import jax
import jaxlib
import optax
from jax.sharding import Mesh, PartitionSpec

from meshpar.errors import MeshError, MeshparError

_PATTERNS = (
    # (regex on JAX's message, what the model did)
    (re.compile(r"PartitionSpec passed to (?P<op>\w+) cannot contain axis names that are of type "
                r"Auto or Manual"), "passes out_sharding= to {op}"),
    (re.compile(r"Using PartitionSpec when you are not under a mesh context is not allowed"),
     "passes out_sharding=PartitionSpec(...) to a layer or jnp operation"),
    (re.compile(r"Going from `Manual` AxisType to `Auto` or `Explicit` AxisType is not allowed"),
     "passes out_sharding= to a layer that wraps its operation in jax.sharding.auto_axes "
     "(nnx.Embed does)"),
    (re.compile(r"passed to with_sharding_constraint can only refer to Auto axes"),
     "constrains an array on a mesh with Explicit axes (jax.set_mesh of an Explicit mesh inside "
     "the model or loss?)"),
)

# The spec JAX quotes: "Got P('fsdp', None)" / "Got PartitionSpec: P(('data', 'fsdp'),) with".
_QUOTED_SPEC = re.compile(
    r"Got (?:PartitionSpec: )?P\((?P<entries>[^)]*(?:\)[^)]*)*?)\)(?:\s|$| with)"
)


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    # Frames of these packages are not "the model's line". By installed location, not by name:
    # a checkout called .../meshpar/tests/ is user code.
    dirs = [os.path.dirname(m.__file__) for m in (flax, jax, jaxlib, optax)]
    dirs.append(os.path.dirname(os.path.dirname(__file__)))  # meshpar itself
    return (*(d + os.sep for d in dirs), contextlib.__file__)


def _frames(tb: TracebackType | None):
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


def _call_site(err: BaseException) -> tuple[str, object]:
    """``file:line (qualname)`` of the innermost frame outside JAX, Flax and meshpar, followed by
    the library function it called (``-> flax Linear.__call__``) when there is one; and the
    ``out_sharding`` that call was given (read from the callee's frame), or ``None``."""
    frames = list(_frames(err.__traceback__))
    user = None
    for i, (frame, line) in enumerate(frames):
        if not frame.f_code.co_filename.startswith(_library_dirs()):
            user = i
    if user is None:
        return "", None
    frame, line = frames[user]
    site = f"{frame.f_code.co_filename}:{line} ({frame.f_code.co_qualname})"
    for callee, _ in frames[user + 1:user + 2]:
        if "flax" in callee.f_code.co_filename:
            site += f" -> flax {callee.f_code.co_qualname}"
    spec = None
    for callee, _ in frames[user + 1:]:
        spec = callee.f_locals.get("out_sharding")
        if spec is not None:
            spec = getattr(spec, "spec", spec)  # a NamedSharding's PartitionSpec
            break
    return site, spec


def explain_trace_error(err: Exception, /, *, mesh: Mesh | None = None) -> MeshparError | None:
    """A meshpar error for a raw JAX error raised by explicit-sharding code in a model, or ``None``.

    Args:
        err: the exception raised while tracing the model (inside the loss function).
        mesh: the mesh meshpar traces on, named in the message.

    Returns:
        A :class:`~meshpar.errors.MeshError` naming the model's call and the fix, or ``None`` when
        ``err`` is not one of the errors this module knows (re-raise it unchanged then).

    Example:
        >>> import jax.numpy as jnp
        >>> from jax.sharding import PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> mesh = make_mesh(data=8)                       # Auto axes
        >>> def loss_fn(x):
        ...     return jnp.einsum("ij,jk->ik", x, x, out_sharding=P("data")).sum()
        >>> try:
        ...     with jax.set_mesh(mesh):
        ...         loss = jax.jit(loss_fn)(jnp.ones((8, 8)))
        ... except Exception as err:
        ...     explained = explain_trace_error(err, mesh=mesh)   # raise it, from None
        >>> type(explained).__name__, str(explained).split(" at ")[0]
        ('MeshError', 'the model passes out_sharding= to einsum')
        >>> explain_trace_error(ValueError("another error")) is None   # re-raise it unchanged
        True
    """
    text = str(err)
    for pattern, what in _PATTERNS:
        match = pattern.search(text)
        if match is None:
            continue
        site, spec = _call_site(err)
        axes = (
            "Auto axes " + ", ".join(f"{n}={s}" for n, s in mesh.shape.items())
            if mesh is not None else "Auto axes"
        )
        # The message's first line: not format_exception_only's last, which is the note JAX
        # attaches to errors out of jax.jit ("For simplicity, JAX has removed its internal
        # frames ...").
        first = f"{type(err).__name__}: {text}".strip().splitlines()[0]
        # Show the constrain call with the entries the model gave (from the call's frame, else
        # from JAX's message, "Got P('fsdp', None, 'tensor')"), or an example.
        got = _QUOTED_SPEC.search(text)
        if isinstance(spec, PartitionSpec):
            entries, example = ", ".join(map(repr, spec)), ""
        elif got:
            entries, example = got.group("entries"), ""
        else:
            entries, example = "'fsdp', None, 'tensor'", "e.g. "
        return MeshError(
            f"the model {what.format(**match.groupdict())}"
            + (f" at {site}" if site else "")
            + f". meshpar traces the step on a mesh with {axes}, and JAX accepts out_sharding= "
            "only on Explicit axes. Change that call: drop out_sharding= and, to keep the layout "
            f"it asked for, constrain the result with the same entries: {example}"
            f"out_sharding=P({entries}) becomes y = meshpar.constrain(y, [{entries}]) (mesh-axis "
            "names resolve through the strategy's compute rules; outside meshpar it returns y "
            "unchanged). Parameter annotations with mesh-axis names or PartitionSpecs can stay "
            f"(meshpar's rules read them). JAX said: {first[:300]}"
        )
    return None
