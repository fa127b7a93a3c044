"""Multi-process runs on JAX's own distributed runtime (``jax.distributed``).

Every process runs the same program. :func:`initialize` connects it to the others before JAX
starts its backend; afterwards ``jax.devices()`` lists the devices of *all* processes, a mesh built
from them spans the job, and each process feeds only its own rows of the batch
(:func:`global_batch_from_local`). Collectives between processes on CPU go through gloo, JAX's
default ``jax_cpu_collectives_implementation`` in 0.10.2.

Where the settings come from, in order:

1. explicit arguments to :func:`initialize`;
2. meshpar's environment variables, set by ``meshpar launch``:

   ============================  ======================================================
   ``MESHPAR_COORDINATOR``       ``host:port`` of process 0's coordinator service
   ``MESHPAR_NUM_PROCESSES``     number of processes in the job
   ``MESHPAR_PROCESS_ID``        this process's id, ``0 .. N-1``
   ``MESHPAR_CPU_DEVICES``       CPU devices to emulate in this process (optional)
   ``MESHPAR_INIT_TIMEOUT``      seconds to wait for all processes to connect (optional)
   ``MESHPAR_HEARTBEAT_TIMEOUT`` seconds without heartbeat before a peer counts as dead
   ============================  ======================================================

3. otherwise JAX's own cluster detection (``jax.distributed.initialize()`` with no addresses),
   which reads ``JAX_COORDINATOR_ADDRESS`` / ``JAX_LOCAL_DEVICE_IDS``, SLURM
   (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``,
   ``SLURM_LOCALID``), Open MPI (``OMPI_MCA_orte_hnp_uri``, ``OMPI_COMM_WORLD_SIZE``,
   ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_LOCAL_RANK``), Cloud TPU VMs (GCE metadata,
   ``TPU_WORKER_ID``, ``TPU_PROCESS_ADDRESSES``) and Kubernetes (``KUBERNETES_SERVICE_HOST``, needs
   the ``kubernetes`` package).

Failure behaviour (measured on this stack): a peer that dies is not a Python exception. JAX's
coordination service notices the missing heartbeats after about ``heartbeat_timeout_s`` and
*aborts* (SIGABRT) every surviving process. A peer that never shows up makes JAX abort about
``initialization_timeout_s + 5`` seconds after the call; meshpar's watchdog ends the process
first, at ``initialization_timeout_s``, with a message saying which processes were expected and
exit code :data:`INIT_TIMEOUT_EXIT_CODE`.

Length: just over 400 lines, one concept (joining a multi-process job and feeding it its rows),
about half of it settings validation and failure messages.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from meshpar.backend.devices import size_thread_pool
from meshpar.errors import DistributedError, is_int
from meshpar.keypath import path_str

__all__ = [
    "DistributedError",
    "INIT_TIMEOUT_EXIT_CODE",
    "initialize",
    "is_initialized",
    "is_main_process",
    "process_index",
    "process_count",
    "global_batch_from_local",
    "local_slice",
]

#: Exit code of a process whose :func:`initialize` did not complete within its timeout.
INIT_TIMEOUT_EXIT_CODE = 3
#: Defaults of :func:`initialize`'s timeouts (JAX's own are 300 s and 100 s: slow to notice).
DEFAULT_INIT_TIMEOUT_S = 60
DEFAULT_HEARTBEAT_TIMEOUT_S = 10

ENV_COORDINATOR = "MESHPAR_COORDINATOR"
ENV_NUM_PROCESSES = "MESHPAR_NUM_PROCESSES"
ENV_PROCESS_ID = "MESHPAR_PROCESS_ID"
ENV_CPU_DEVICES = "MESHPAR_CPU_DEVICES"
ENV_INIT_TIMEOUT = "MESHPAR_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "MESHPAR_HEARTBEAT_TIMEOUT"

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _backend_started() -> bool:
    from jax._src import xla_bridge  # the check jax.distributed.initialize itself uses

    return bool(xla_bridge.backends_are_initialized())


def is_initialized() -> bool:
    """Whether ``jax.distributed`` is connected in this process.

    Example:
        >>> is_initialized()   # in a single-process run, unless initialize() was called
        False
    """
    from jax._src import distributed as _dist  # private JAX: read only when asked

    return _dist.global_state.client is not None


def _int_setting(name: str, value: Any, env: str, *, minimum: int) -> int | None:
    if value is None:
        raw = os.environ.get(env)
        if raw is None or raw.strip() == "":
            return None
        try:
            value = int(raw)
        except ValueError:
            raise DistributedError(
                f"environment variable {env}={raw!r} is not an integer"
            ) from None
        source = f"{env}={raw}"
    else:
        source = f"{name}={value!r}"
    if not is_int(value, minimum=minimum):
        raise DistributedError(f"{source}: must be an int >= {minimum}")
    return int(value)


def _seconds(name: str, value: Any, env: str, default: float) -> int:
    source = f"{name}={value!r}"
    if value is None:
        raw = os.environ.get(env)
        if raw is None or not raw.strip():
            value = default
        else:
            source = f"environment variable {env}={raw!r}"
            try:
                value = float(raw)
            except ValueError:
                raise DistributedError(f"{source} is not a number") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise DistributedError(f"{source}: must be a number of seconds > 0")
    # jax.distributed takes whole seconds.
    return max(1, math.ceil(value))


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_cpu_devices: int | None = None,
    initialization_timeout_s: float | None = None,
    heartbeat_timeout_s: float | None = None,
) -> None:
    """Connect this process to the others of a multi-process job. Call before any JAX work.

    Settings come from the arguments, else from ``MESHPAR_*`` environment variables (see the
    module docstring), else from JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU,
    Kubernetes). The timeouts likewise come from the arguments, else ``MESHPAR_INIT_TIMEOUT``
    and ``MESHPAR_HEARTBEAT_TIMEOUT`` (which the launcher sets from its flags), else 60 s / 10 s.

    Args:
        coordinator_address: ``"host:port"`` of process 0, reachable from every process.
        num_processes: number of processes in the job.
        process_id: this process's id in ``0 .. num_processes - 1``.
        local_cpu_devices: CPU devices to emulate in this process (``MESHPAR_CPU_DEVICES``);
            needs the backend not started yet.
        initialization_timeout_s: how long to wait for every process to connect (default 60).
            If they do not, this process prints why and exits with
            :data:`INIT_TIMEOUT_EXIT_CODE`. JAX takes whole seconds: fractions round up.
        heartbeat_timeout_s: a process silent this long counts as dead; JAX then aborts the
            others (SIGABRT). Lower it to notice failures sooner (default 10).

    Raises:
        DistributedError: an incomplete or malformed setting (naming it), a call after JAX's
            backend started, a second call, or no cluster to detect.

    Example::

        # In each of 2 processes, before anything touches jax.devices():
        initialize(coordinator_address="10.0.0.1:4321", num_processes=2,
                   process_id=int(os.environ["RANK"]), local_cpu_devices=4)
        jax.device_count()   # 8: the devices of both processes
    """
    address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    count = _int_setting("num_processes", num_processes, ENV_NUM_PROCESSES, minimum=1)
    pid = _int_setting("process_id", process_id, ENV_PROCESS_ID, minimum=0)
    cpus = _int_setting("local_cpu_devices", local_cpu_devices, ENV_CPU_DEVICES, minimum=1)
    init_timeout = _seconds(
        "initialization_timeout_s", initialization_timeout_s, ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S
    )
    heartbeat = _seconds(
        "heartbeat_timeout_s", heartbeat_timeout_s, ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S
    )

    given = {"coordinator_address": address, "num_processes": count, "process_id": pid}
    if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        env = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
               "process_id": ENV_PROCESS_ID}
        raise DistributedError(
            f"incomplete multi-process settings: {', '.join(missing)} missing (got "
            f"{', '.join(f'{k}={v!r}' for k, v in given.items() if v is not None)}); give all "
            f"three, as arguments or as {', '.join(env[k] for k in missing)}"
        )
    if address is not None:
        if not _ADDRESS.match(address):
            raise DistributedError(
                f"coordinator address {address!r} is not of the form host:port, e.g. "
                "'10.0.0.1:4321' or '127.0.0.1:4321'"
            )
        if pid >= count:
            raise DistributedError(
                f"process_id={pid} is out of range for num_processes={count}; ids are 0..{count - 1}"
            )

    if is_initialized():
        raise DistributedError(
            "meshpar.distributed.initialize() was already called in this process; call it once"
        )
    if _backend_started():
        raise DistributedError(
            "meshpar.distributed.initialize() must run before JAX starts its backend, but "
            "jax.devices() or an array operation already ran; call it first thing in the program "
            "(importing jax is fine)"
        )
    if cpus is not None:
        jax.config.update("jax_num_cpu_devices", cpus)
        size_thread_pool(cpus)

    if address is None:
        where = "auto-detected cluster"
        kwargs: dict[str, Any] = {}
    else:
        where = f"process {pid} of {count}, coordinator {address}"
        kwargs = dict(coordinator_address=address, num_processes=count, process_id=pid)

    done = threading.Event()

    def watchdog() -> None:
        # JAX blocks in C++ while connecting and aborts ~5 s after its own timeout with a
        # generic message; end the process at our timeout with one that says what to check.
        if done.wait(init_timeout):
            return
        expected = f"not all {count} processes" if count else "not all processes"
        sys.stderr.write(
            f"meshpar: distributed initialization timed out after {init_timeout} s ({where}): "
            f"{expected} connected to the coordinator. Check that every process was "
            "started, with the same coordinator address and process count and a distinct "
            "process id, and that the coordinator port is reachable; a slow start needs a "
            f"larger timeout ({ENV_INIT_TIMEOUT} / --init-timeout).\n"
        )
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(INIT_TIMEOUT_EXIT_CODE)

    guard = threading.Thread(target=watchdog, name="meshpar-init-watchdog", daemon=True)
    guard.start()
    try:
        jax.distributed.initialize(
            **kwargs,
            initialization_timeout=init_timeout,
            heartbeat_timeout_seconds=heartbeat,
        )
    except ValueError as e:
        if address is None:
            raise DistributedError(
                "no multi-process settings found: set MESHPAR_COORDINATOR, "
                "MESHPAR_NUM_PROCESSES and MESHPAR_PROCESS_ID (meshpar launch does), pass them "
                "to initialize(), or run under SLURM, Open MPI or on a Cloud TPU pod so that JAX "
                f"can detect them ({e})"
            ) from None
        raise DistributedError(f"jax.distributed.initialize rejected the settings: {e}") from None
    except RuntimeError as e:
        raise DistributedError(f"jax.distributed.initialize failed ({where}): {e}") from None
    finally:
        done.set()


def process_index() -> int:
    """This process's index (0 in a single-process run).

    Example:
        >>> process_index()
        0
    """
    return jax.process_index()


def process_count() -> int:
    """The number of processes in the job (1 in a single-process run)."""
    return jax.process_count()


def is_main_process() -> bool:
    """True in process 0: the one that should print, log and write reports.

    Example:
        >>> is_main_process()   # a single-process run is process 0
        True
    """
    return jax.process_index() == 0


def _broadcast_shardings(shardings: Any, tree: Any) -> Any:
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, tree)
    return shardings


def _leaf_name(path: Sequence[Any]) -> str:
    return path_str(path) or "<root>"


def _process_indices(sharding: jax.sharding.Sharding, shape: tuple[int, ...], process: int) -> list[np.ndarray]:
    """Per dimension, the sorted global indices that ``process``'s devices hold."""
    per_dim: list[set[int]] = [set() for _ in shape]
    found = False
    for device, index in sharding.devices_indices_map(shape).items():
        if device.process_index != process:
            continue
        found = True
        for dim, (size, sl) in enumerate(zip(shape, index)):
            per_dim[dim].update(range(*sl.indices(size)))
    if not found:
        raise DistributedError(
            f"process {process} owns none of the sharding's devices; processes present: "
            f"{sorted({d.process_index for d in sharding.device_set})}"
        )
    return [np.array(sorted(s), dtype=np.int64) for s in per_dim]


def local_slice(global_batch: Any, shardings: Any, /, *, process_index: int | None = None) -> Any:
    """The part of a host-global batch that one process feeds in a multi-process job.

    Every process can build the same global batch (same data, same seed) and keep its part; this
    is that part, for :func:`global_batch_from_local`. The rows are read from the sharding
    (``devices_indices_map`` and each device's ``process_index``) rather than assumed to be the
    ``i``-th contiguous block: a mesh whose device order is not process-major (a TPU topology, a
    hand-ordered mesh) gives a process non-contiguous rows, returned here in global order, which
    is the order ``jax.make_array_from_process_local_data`` expects.

    Args:
        global_batch: a numpy array, or a pytree of them, holding the whole global batch.
        shardings: the batch's sharding, one for all leaves or a pytree matching ``global_batch``.
        process_index: whose part (default: this process).

    Returns:
        The same structure with each leaf cut to the process's rows (and columns, if a
        non-leading dimension is split across processes).

    Raises:
        DistributedError: the process owns none of the sharding's devices.

    Example:
        >>> import numpy as np
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> mesh = make_mesh(data=2, fsdp=2, tensor=2)              # on 8 devices
        >>> sharding = NamedSharding(mesh, P(("data", "fsdp")))     # rows over data x fsdp
        >>> global_tokens = np.arange(16 * 4).reshape(16, 4)
        >>> local = local_slice(global_tokens, sharding)    # rows 0..7 in process 0 of 2
        >>> local.shape                                     # one process: all the rows
        (16, 4)
        >>> batch = global_batch_from_local(local, sharding)        # one global jax.Array
        >>> batch.shape, batch.sharding == sharding
        ((16, 4), True)
    """
    process = jax.process_index() if process_index is None else process_index
    shardings = _broadcast_shardings(shardings, global_batch)

    def one(x, sharding):
        x = np.asarray(x)
        indices = _process_indices(sharding, x.shape, process)
        out = x
        for dim, idx in enumerate(indices):
            if len(idx) == x.shape[dim]:
                continue  # whole dimension: keep it as it is (no copy)
            if idx[-1] - idx[0] + 1 == len(idx):  # contiguous: a view
                out = out[(slice(None),) * dim + (slice(int(idx[0]), int(idx[-1]) + 1),)]
            else:
                out = np.take(out, idx, axis=dim)
        return out

    return jax.tree.map(one, global_batch, shardings)


def global_batch_from_local(
    local_batch: Any, shardings: Any, /, *, global_shapes: Any = None
) -> Any:
    """Assemble global ``jax.Array``s from each process's part of a batch.

    A thin, checked wrapper over ``jax.make_array_from_process_local_data``: every process calls
    it with its own rows (as :func:`local_slice` cuts them); the result is one global array per
    leaf, sharded as asked. In a single process the local batch is the global batch.

    Args:
        local_batch: a numpy array or pytree of them: this process's rows.
        shardings: one sharding for all leaves, or a pytree matching ``local_batch``.
        global_shapes: optional global shapes (a tuple for all leaves, or a pytree of tuples);
            default: inferred from the sharding (each process holds only its own rows).

    Returns:
        A pytree of global ``jax.Array``s.

    Raises:
        DistributedError: a leaf's local shape does not fit its sharding (names the leaf).

    Example:
        >>> import numpy as np
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> mesh = make_mesh(data=2, fsdp=2, tensor=2)              # on 8 devices
        >>> sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
        >>> local_tokens = np.zeros((16, 128), np.int32)   # 8 rows each in 2 processes
        >>> batch = global_batch_from_local({"tokens": local_tokens}, sharding)
        >>> batch["tokens"].shape   # (local rows x processes, seq); here 1 process
        (16, 128)
    """
    shardings = _broadcast_shardings(shardings, local_batch)
    if global_shapes is None or isinstance(global_shapes, tuple) and all(
        isinstance(d, (int, np.integer)) for d in global_shapes
    ):
        fixed = global_shapes
        global_shapes = jax.tree.map(lambda _: fixed, local_batch)

    def one(path, x, sharding, shape):
        x = np.asarray(x)
        try:
            return jax.make_array_from_process_local_data(sharding, x, shape)
        except (ValueError, TypeError, AssertionError) as e:
            raise DistributedError(
                f"batch leaf {_leaf_name(path)!r}: local shape {x.shape} does not fit its "
                f"sharding {sharding} in process {jax.process_index()} of "
                f"{jax.process_count()}: {e}"
            ) from None

    return jax.tree_util.tree_map_with_path(one, local_batch, shardings, global_shapes)
