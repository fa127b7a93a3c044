"""Checkpoints of a sharded train state, written and read with Orbax.

A checkpoint holds two items: ``state``, a pytree of arrays in Orbax's standard format
(TensorStore/OCDBT array files plus JSON metadata), and ``meta``, a small JSON dict (step, data
position, config). Restoring takes a *target*: a pytree of ``jax.ShapeDtypeStruct`` that carry the
shardings wanted **now**, so a state saved 8-way over ``fsdp`` comes back on a ``data=2,tensor=4``
mesh, or on fewer devices, with no extra code.

Safety: loading never unpickles or evaluates anything. The two Orbax handlers used here
(``StandardCheckpointHandler``, ``JsonCheckpointHandler``) read only TensorStore array files
(raw numeric chunks with a JSON spec) and JSON; neither imports ``pickle`` (checked in
orbax-checkpoint 0.12.8), so opening a checkpoint from an untrusted source cannot run code.

Atomicity: Orbax writes a step into ``<step>.orbax-checkpoint-tmp``, writes ``commit_success.txt``
and then renames the directory to ``<step>``. meshpar counts a step as complete only when its
directory has that marker, so a save killed half-way (a ``*.orbax-checkpoint-tmp`` directory, or a
step directory without its marker, as a commit-file filesystem such as GCS leaves behind) is never
restored. Such leftovers are removed, and logged, when a :class:`Checkpointer` opens the directory.
One directory has one writer: do not point two runs at the same directory.

Multi-process jobs: every process constructs the :class:`Checkpointer` (after
:func:`meshpar.backend.distributed.initialize`) and calls ``save``/``restore``/``wait`` in the same order;
Orbax writes each process's shards and synchronises the processes. The directory must be one
filesystem that all processes see (local disk for a single host, a shared mount across hosts);
paths are local filesystem paths (``os.path``), not ``gs://`` URLs.

Length: about 570 lines, one concept (the :class:`Checkpointer`), most of it the checks that turn
a partial, corrupted or mismatched checkpoint into an error naming the leaf and the fix.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from meshpar.errors import CheckpointError, is_int
from meshpar.keypath import path_str

# The logger keeps the name it had before the module moved into meshpar.train: users filter it.
logger = logging.getLogger("meshpar.checkpoint")

__all__ = ["CheckpointError", "Checkpointer", "restore_target"]

#: Orbax's tmp-directory suffix and commit marker (``orbax.checkpoint._src.path.atomicity_types``
#: in 0.12.8). Copied rather than imported from a private module; the tests pin them.
TMP_SUFFIX = ".orbax-checkpoint-tmp"
COMMIT_MARKER = "commit_success.txt"

_STATE, _META = "state", "meta"


# --------------------------------------------------------------------------- tree helpers


def _path_str(path: tuple) -> str:
    # Orbax stores NamedTuples as dicts and tuples as lists, so attribute names, dict keys and
    # sequence indices must all compare as plain strings.
    return path_str(path)


def _flat(tree: Any) -> dict[str, Any]:
    return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fmt(shape: Any, dtype: Any) -> str:
    return f"{tuple(shape)} {np.dtype(dtype).name}"


def restore_target(abstract_state: Any, shardings: Any = None, /) -> Any:
    """Build the restore target: ``ShapeDtypeStruct`` leaves carrying the new shardings.

    Args:
        abstract_state: a pytree whose leaves have ``shape`` and ``dtype`` (``jax.Array``,
            ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``).
        shardings: one ``jax.sharding.Sharding`` for every leaf, or a pytree of them with the
            structure of ``abstract_state``; default: each leaf's own ``sharding``.

    Returns:
        A pytree of ``jax.ShapeDtypeStruct`` with the structure of ``abstract_state``.

    Raises:
        CheckpointError: a leaf has no shape/dtype, or no sharding was given for it.

    Example:
        >>> import jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> abstract = jax.eval_shape(lambda: {"w": jnp.zeros((8, 4)), "step": jnp.int32(0)})
        >>> mesh = make_mesh(data=2, tensor=4)                  # the mesh to restore onto
        >>> target = restore_target(abstract, {"w": NamedSharding(mesh, P("tensor")),
        ...                                    "step": NamedSharding(mesh, P())})
        >>> target["w"].shape, target["w"].sharding.spec
        ((8, 4), P('tensor',))

        ``state, meta = ckpt.restore(target)`` then reads a checkpoint into those shardings.
    """
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        fixed = shardings
        shardings = jax.tree.map(lambda _: fixed, abstract_state)

    def one(path, leaf, sharding):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise CheckpointError(
                f"restore target leaf {_path_str(path)!r} is a {type(leaf).__name__}, not an array "
                "or jax.ShapeDtypeStruct; the train state must be a pytree of arrays"
            )
        sharding = sharding if sharding is not None else getattr(leaf, "sharding", None)
        if sharding is None:
            raise CheckpointError(
                f"restore target leaf {_path_str(path)!r} has no sharding; pass "
                "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)) or give "
                "restore_target(abstract_state, shardings)"
            )
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    try:
        return jax.tree_util.tree_map_with_path(
            one, abstract_state, shardings, is_leaf=lambda x: x is None
        )
    except ValueError as e:  # structure mismatch between the two trees
        raise CheckpointError(
            f"restore_target: the shardings tree does not match the state tree: {e}"
        ) from None


def _first_line(error: BaseException) -> str:
    # TensorStore errors run to dozens of lines of JSON spec; the first line says what failed.
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _first_unjsonable(value: Any, path: str = "meta") -> str | None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{path}[{k!r}] (key is a {type(k).__name__}, JSON keys are strings)"
            found = _first_unjsonable(v, f"{path}[{k!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _first_unjsonable(v, f"{path}[{i}]")
            if found:
                return found
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    return f"{path} (a {type(value).__name__})"


# --------------------------------------------------------------------------- exit hook

_OPEN: weakref.WeakSet[Checkpointer] = weakref.WeakSet()
_HOOK_LOCK = threading.Lock()
_HOOK_INSTALLED = False


def _finish_pending_saves() -> None:
    for ckpt in list(_OPEN):
        try:
            ckpt.wait()
        except Exception:  # noqa: BLE001 - at exit, report and let the interpreter finish
            logger.exception("meshpar: an asynchronous checkpoint save failed at exit")


def _install_exit_hook() -> None:
    # An async save still running when the script returns is lost: concurrent.futures shuts its
    # thread pools down at interpreter exit (before ``atexit`` handlers run) and Orbax's
    # finalisation then fails, leaving only a tmp directory (seen with orbax 0.12.8). Hooks
    # registered with ``threading._register_atexit`` run in reverse order *before* that shutdown,
    # so waiting there completes the save.
    global _HOOK_INSTALLED
    with _HOOK_LOCK:
        if _HOOK_INSTALLED:
            return
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(_finish_pending_saves)
        else:  # pragma: no cover - other Pythons
            atexit.register(_finish_pending_saves)
        _HOOK_INSTALLED = True


# --------------------------------------------------------------------------- Checkpointer


class Checkpointer:
    """Save and restore a sharded train state plus JSON metadata in one directory.

    Args:
        directory: where step directories ``<dir>/<step>/`` live. Created on the first save.
        keep: how many of the latest complete checkpoints to keep (``None``: keep all).
        async_save: if true, :meth:`save` returns once the arrays are copied to host memory and
            writes the files in the background; call :meth:`wait` or :meth:`close` (or use the
            checkpointer as a context manager) before relying on the files.

    Raises:
        CheckpointError: ``keep`` is not ``None`` or an int >= 1; ``directory`` is a file.

    Example:
        >>> import tempfile
        >>> import jax.numpy as jnp
        >>> state = {"w": jnp.arange(8.0), "step": jnp.int32(100)}
        >>> tmp = tempfile.TemporaryDirectory()
        >>> with Checkpointer(tmp.name, keep=3) as ckpt:
        ...     ckpt.save(100, state, meta={"step": 100, "data_step": 100})
        ...     state, meta = ckpt.restore(restore_target(state))
        >>> meta, state["w"].tolist()[:3]
        ({'step': 100, 'data_step': 100}, [0.0, 1.0, 2.0])
        >>> tmp.cleanup()
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True):
        if keep is not None and not is_int(keep, minimum=1, numpy=False):
            raise CheckpointError(f"Checkpointer(keep={keep!r}): keep must be None or an int >= 1")
        self._directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self._directory) and not os.path.isdir(self._directory):
            raise CheckpointError(
                f"checkpoint directory {self._directory} exists and is not a directory"
            )
        self._keep = keep
        self._async = bool(async_save)
        self._manager: ocp.CheckpointManager | None = None
        self._closed = False
        # A save still in flight from another Checkpointer of this process looks exactly like
        # a partial checkpoint: let it land before cleaning up.
        for other in list(_OPEN):
            if other._directory == self._directory:
                other.wait()
        # Always, even for a missing directory: in a multi-process job the barrier inside must
        # be reached by every process, and another process may create the directory meanwhile.
        self._remove_partial()
        _OPEN.add(self)
        _install_exit_hook()

    # ----------------------------------------------------------------- properties

    @property
    def directory(self) -> str:
        """The absolute checkpoint directory."""
        return self._directory

    def __repr__(self) -> str:
        return f"Checkpointer({self._directory!r}, keep={self._keep}, async_save={self._async})"

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- disk scan

    def _scan(self) -> tuple[list[int], list[str]]:
        """Complete steps (sorted) and the names of partial leftovers."""
        complete, partial = [], []
        try:
            names = os.listdir(self._directory)
        except FileNotFoundError:
            return [], []
        for name in names:
            full = os.path.join(self._directory, name)
            if not os.path.isdir(full):
                continue
            if TMP_SUFFIX in name:
                partial.append(name)
            elif name.isdigit():
                if os.path.exists(os.path.join(full, COMMIT_MARKER)):
                    complete.append(int(name))
                else:
                    partial.append(name)
        return sorted(complete), sorted(partial)

    def _remove_partial(self) -> None:
        # Only one process deletes; the others wait so that nobody lists a directory mid-delete.
        multi = jax.process_count() > 1
        if not multi or jax.process_index() == 0:
            _, partial = self._scan()
            for name in partial:
                path = os.path.join(self._directory, name)
                logger.warning(
                    "meshpar checkpoint: removing partial checkpoint %s (an interrupted save: no "
                    "%s marker)", path, COMMIT_MARKER
                )
                shutil.rmtree(path, ignore_errors=True)
        if multi:
            multihost_utils.sync_global_devices(f"meshpar_checkpoint_cleanup:{self._directory}")

    def _get_manager(self) -> ocp.CheckpointManager:
        if self._closed:
            raise CheckpointError(f"{self!r} is closed; create a new Checkpointer")
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(
                preservation_policy=(
                    ocp.checkpoint_managers.LatestN(self._keep) if self._keep is not None else None
                ),
                enable_async_checkpointing=self._async,
                create=True,
                # meshpar removes partial steps itself (and logs which), see _remove_partial.
                cleanup_tmp_directories=False,
            )
            # Registering the handlers up front lets a fresh manager read item metadata.
            self._manager = ocp.CheckpointManager(
                self._directory,
                options=options,
                item_handlers={
                    _STATE: ocp.StandardCheckpointHandler(),
                    _META: ocp.JsonCheckpointHandler(),
                },
            )
        return self._manager

    # ----------------------------------------------------------------- public API

    def all_steps(self) -> list[int]:
        """All complete checkpoint steps on disk, ascending.

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> tmp = tempfile.TemporaryDirectory()
            >>> ckpt = Checkpointer(tmp.name, keep=3)
            >>> for step in (10, 20, 30):
            ...     ckpt.save(step, {"w": jnp.zeros(4)})
            >>> ckpt.wait()                      # saves in flight are not complete yet
            >>> ckpt.all_steps()
            [10, 20, 30]
            >>> ckpt.close(); tmp.cleanup()
        """
        return self._scan()[0]

    def latest_step(self) -> int | None:
        """The latest *complete* checkpoint step, or ``None`` if there is none.

        A save still in flight, or one killed half-way, does not count.

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> tmp = tempfile.TemporaryDirectory()
            >>> ckpt = Checkpointer(tmp.name)
            >>> start = (ckpt.latest_step() or 0)   # an empty directory: start at 0
            >>> ckpt.save(7, {"w": jnp.zeros(4)}); ckpt.wait()
            >>> start, ckpt.latest_step()
            (0, 7)
            >>> ckpt.close(); tmp.cleanup()
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, *, meta: Mapping[str, Any] | None = None) -> None:
        """Start saving ``state`` and ``meta`` as ``step``; returns without waiting for the files.

        The arrays are copied to host memory before this returns, so the caller may donate or
        overwrite ``state`` right away. Old checkpoints beyond ``keep`` are deleted once the new
        one is complete. Must be called by every process of a multi-process job.

        Args:
            step: a step number greater than every step already saved in the directory.
            state: a pytree of ``jax.Array`` / numpy arrays (raw key data, not typed PRNG keys).
            meta: a JSON-able dict, e.g. ``{"step": 12, "data_step": 12, "config": {...}}``.

        Raises:
            CheckpointError: bad step (not an int >= 0, or not after the latest saved step), a
                leaf that is not an array, a typed PRNG key, or ``meta`` that is not JSON-able.

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> tmp = tempfile.TemporaryDirectory()
            >>> ckpt = Checkpointer(tmp.name)
            >>> state = {"w": jnp.zeros(4), "step": jnp.int32(12)}
            >>> ckpt.save(12, state, meta={"step": 12, "data_step": 12})
            >>> ckpt.read_meta()                 # waits for the save
            (12, {'step': 12, 'data_step': 12})
            >>> ckpt.close(); tmp.cleanup()
        """
        if not is_int(step, minimum=0):
            raise CheckpointError(f"save(step={step!r}): step must be an int >= 0")
        step = int(step)
        meta = dict(meta or {})
        bad = _first_unjsonable(meta)
        if bad:
            raise CheckpointError(
                f"save(step={step}): {bad} is not JSON-serialisable; meta holds only dicts, lists, "
                "str, int, float, bool and None (put arrays into the state instead)"
            )
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            name = _path_str(path)
            if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
                raise CheckpointError(
                    f"save(step={step}): state leaf {name!r} is a {type(leaf).__name__}; the state "
                    "must contain only arrays (put Python values into meta=...)"
                )
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                raise CheckpointError(
                    f"save(step={step}): state leaf {name!r} is a typed PRNG key array; save "
                    "jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data"
                )
        manager = self._get_manager()
        # Steps of earlier saves still in flight are not on disk yet; ask Orbax as well.
        latest = max([*self.all_steps(), *(manager.all_steps() or [])], default=None)
        if latest is not None and step <= latest:
            raise CheckpointError(
                f"save(step={step}): the directory {self._directory} already has step {latest}; "
                "Orbax would silently skip this save. Save a later step, or remove the later "
                "steps (or use a new directory) if you deliberately restarted from an earlier one"
            )
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
        )
        try:
            saved = manager.save(step, args=args)
        except Exception as e:  # noqa: BLE001 - Orbax raises assorted types
            raise CheckpointError(
                f"saving step {step} to {self._directory} failed: {type(e).__name__}: {e}"
            ) from e
        if not saved:  # no silent no-ops
            raise CheckpointError(f"Orbax declined to save step {step} to {self._directory}")

    def wait(self) -> None:
        """Block until every started save is complete on disk.

        Raises:
            CheckpointError: a background save failed.

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> tmp = tempfile.TemporaryDirectory()
            >>> ckpt = Checkpointer(tmp.name)
            >>> state = {"w": jnp.zeros(4)}
            >>> ckpt.save(5, state, meta={"step": 5}); ckpt.wait(); ckpt.latest_step()
            5
            >>> ckpt.close(); tmp.cleanup()
        """
        if self._manager is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"an asynchronous checkpoint save to {self._directory} failed: "
                f"{type(e).__name__}: {e}"
            ) from e

    def close(self) -> None:
        """Wait for pending saves and release Orbax's threads. Safe to call twice.

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> tmp = tempfile.TemporaryDirectory()
            >>> ckpt = Checkpointer(tmp.name)
            >>> ckpt.save(1, {"w": jnp.zeros(4)})
            >>> ckpt.close(); ckpt.close()        # the save has landed; closing twice is fine
            >>> ckpt.all_steps()
            [1]
            >>> tmp.cleanup()
        """
        if self._closed:
            return
        try:
            self.wait()
        finally:
            if self._manager is not None:
                self._manager.close()
            self._closed = True
            _OPEN.discard(self)

    def read_meta(self, *, step: int | None = None) -> tuple[int, dict[str, Any]]:
        """The JSON metadata of a complete checkpoint (default: the latest), reading no array.

        Returns:
            ``(step, meta)``.

        Raises:
            CheckpointError: the directory is missing or has no complete checkpoint, ``step`` is
                not one, or the metadata cannot be read or is not a JSON object.

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> tmp = tempfile.TemporaryDirectory()
            >>> ckpt = Checkpointer(tmp.name)
            >>> ckpt.save(3, {"w": jnp.zeros(4)}, meta={"step": 3, "data_step": 3})
            >>> step, meta = ckpt.read_meta()
            >>> step, meta["data_step"]
            (3, 3)
            >>> ckpt.close(); tmp.cleanup()
        """
        step, steps = self._complete_step(step)
        where = f"checkpoint step {step} in {self._directory}"
        try:
            meta = self._get_manager().restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{where}: its metadata cannot be read ({type(e).__name__}: {_first_line(e)})"
            ) from e
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where}: its metadata item is not a JSON object")
        return step, meta

    def _complete_step(self, step: int | None) -> tuple[int, list[int]]:
        if not os.path.isdir(self._directory):
            raise CheckpointError(
                f"checkpoint directory {self._directory} does not exist; nothing to restore "
                "(check the path, or start without restoring)"
            )
        self.wait()  # a save of ours still in flight must land before we list the steps
        steps, partial = self._scan()
        if not steps:
            extra = f" (only partial saves: {', '.join(partial)})" if partial else ""
            raise CheckpointError(
                f"checkpoint directory {self._directory} has no complete checkpoint{extra}; "
                "nothing to restore"
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(
                f"step {step} is not a complete checkpoint in {self._directory}; complete steps: "
                f"{steps}"
            )
        return step, steps

    def restore(self, target: Any, *, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Read a checkpoint into the shardings given by ``target``.

        The saved tree's paths, shapes and dtypes are compared with ``target`` before any array
        is read, so a checkpoint of another model fails fast with the parameter named.

        Args:
            target: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding=`` set (see
                :func:`restore_target`); ``jax.Array`` leaves are accepted and keep their sharding.
                Its structure is the structure of the returned state.
            step: the step to read; default: the latest complete one.

        Returns:
            ``(state, meta)``: the state as ``jax.Array`` leaves with the target's shardings and
            the JSON metadata dict.

        Raises:
            CheckpointError: the directory is missing or has no complete checkpoint; ``step`` is
                not one of them; the tree differs from ``target`` (missing or extra parameter,
                shape or dtype); the files are corrupted or unreadable.

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> from jax.sharding import NamedSharding, PartitionSpec as P
            >>> from meshpar.mesh import make_mesh
            >>> w = jax.device_put(jnp.arange(32.0).reshape(8, 4),
            ...                    NamedSharding(make_mesh(fsdp=8), P("fsdp")))
            >>> tmp = tempfile.TemporaryDirectory()
            >>> ckpt = Checkpointer(tmp.name)
            >>> ckpt.save(40, {"w": w}, meta={"step": 40})      # saved 8-way over fsdp
            >>> mesh = make_mesh(data=2, tensor=4)
            >>> target = restore_target({"w": w}, NamedSharding(mesh, P(None, "tensor")))
            >>> state, meta = ckpt.restore(target)
            >>> start_step = meta["step"]
            >>> start_step, state["w"].sharding.spec, bool((state["w"] == w).all())
            (40, P(None, 'tensor'), True)
            >>> ckpt.close(); tmp.cleanup()
        """
        step, steps = self._complete_step(step)
        target = restore_target(target)
        where = f"checkpoint step {step} in {self._directory}"
        manager = self._get_manager()

        try:
            saved = manager.item_metadata(step)[_STATE]
            saved_tree = getattr(saved, "tree", saved)
            if saved_tree is None:
                raise ValueError("no array metadata")
            saved_flat = _flat(saved_tree)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{where} is corrupted: its array metadata cannot be read "
                f"({type(e).__name__}: {_first_line(e)}); restore another step with "
                f"restore(target, step=N), complete steps: {steps}"
            ) from e
        self._check_matches(saved_flat, _flat(target), where)

        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}
        )
        try:
            restored = manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - TensorStore raises bare Exception
            raise CheckpointError(
                f"{where} could not be read: it is corrupted or incomplete ({_first_line(e)}); restore "
                f"another step with restore(target, step=N), complete steps: {steps}"
            ) from e
        state_flat = _flat(restored[_STATE])
        leaves = [state_flat[name] for name in _flat(target)]
        state = jax.tree.unflatten(jax.tree.structure(target), leaves)
        meta = restored[_META]
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where}: its metadata item is not a JSON object")
        return state, meta

    @staticmethod
    def _check_matches(saved: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
        hint = (
            "The checkpoint was written for a different model or optimizer: restore with the "
            "configuration it was saved with, or start from scratch in a new directory."
        )
        missing = [name for name in wanted if name not in saved]
        extra = [name for name in saved if name not in wanted]
        # Name a parameter before optimizer state that mirrors it: that is what a user recognises.
        mismatched = sorted([
            name for name in wanted
            if name in saved and (
                tuple(saved[name].shape) != tuple(wanted[name].shape)
                or np.dtype(saved[name].dtype) != np.dtype(wanted[name].dtype)
            )
        ], key=lambda name: ("params" not in name.split("/")[:2], name))
        problems = len(missing) + len(extra) + len(mismatched)
        if not problems:
            return
        diloco = lambda names: any(n.split("/")[0] in ("inner", "outer") for n in names)  # noqa: E731
        if diloco(saved) and not diloco(wanted):
            # DiLoCoTrainer.checkpoint_state's layout (meshpar.train.diloco): name the run and
            # the conversion rather than every missing leaf.
            raise CheckpointError(
                f"{where} is of a DiLoCo run (every replica's state under 'inner/', the shared "
                "parameters under 'outer/') and the restore target is not: restore it with "
                "mp.DiLoCoTrainer on a mesh with a 'diloco' axis (any number of replicas, 1 "
                "included: DiLoCoTrainer.restore(checkpointer)), or convert it to a plain "
                "checkpoint by saving that trainer's plain_checkpoint_state() in a new directory"
            )
        more = f" ({problems - 1} more difference(s))" if problems > 1 else ""
        if mismatched:
            name = mismatched[0]
            s, w = saved[name], wanted[name]
            first = (
                f"{_leaf_kind(name)} is {_fmt(s.shape, s.dtype)} in the checkpoint but "
                f"{_fmt(w.shape, w.dtype)} in the restore target"
            )
        elif missing:
            first = f"{_leaf_kind(missing[0])} of the restore target is missing from the checkpoint"
        else:
            first = f"the checkpoint has {_leaf_kind(extra[0])}, which the restore target lacks"
        raise CheckpointError(f"{where} does not match the restore target: {first}{more}. {hint}")


#: The variables of an NNX ``RngStream`` (``nnx.Rngs`` streams, ``nnx.Dropout(rngs=...)``).
_RNG_LEAVES = ("key", "count")


def _leaf_kind(name: str) -> str:
    """How an error names a leaf: a parameter, or, under ``rest/`` (the Trainer's non-parameter
    model state), model state, naming the RNG stream it belongs to."""
    parts = name.split("/")
    if parts[0] != "rest" or len(parts) < 2:
        return f"parameter {name!r}"
    if len(parts) > 2 and parts[-1] in _RNG_LEAVES:
        stream = "/".join(parts[1:-1])
        return f"model state {name!r} (RNG stream {stream!r}, non-parameter state)"
    return f"model state {name!r} (non-parameter state)"
