"""Emulating several devices on one CPU.

JAX reads the CPU device count once, when it starts its backend. After that the
``jax_num_cpu_devices`` config raises and ``--xla_force_host_platform_device_count`` is *silently
ignored*, so :func:`emulate_devices` checks whether the backend is already up and raises a clear
error instead of letting a wrong device count through.

It also sizes XLA:CPU's thread pool (:func:`pool_threads`). Every emulated device runs its
program on one shared pool of ``max(cores, devices)`` threads, and an in-process collective holds
its thread until all devices have joined it. XLA:CPU orders a device's collectives by when they
*start*, not when they end, so a device can wait in two at once (an all-reduce of the entry
computation beside one inside a loop), two threads for one device. When every thread waits in a
collective, a device whose turn it is has no thread left to join: a deadlock. Seen on 8 devices
(issue 13): the 20m shape under ``fsdp=8``, bf16 with fp32 dots, hung in 3 of 3 runs on 8
threads (all 8 waiting: 7 in one all-reduce, 1 in another); with 16 or 32 threads 7 of 7 ran.
``PJRT_NPROC``, which XLA reads when it creates the CPU client, sets the pool size.
"""

from __future__ import annotations

import os

import jax

from meshpar.errors import DeviceEmulationError, is_int


def _backend_started() -> bool:
    # ``jax._src.xla_bridge`` keeps the initialised backends in a private dict; reading it is the
    # only way to know without starting the backend ourselves (private JAX: read only when asked).
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", {}))


def emulate_devices(count: int, /) -> None:
    """Ask JAX for ``count`` CPU devices. Call before any array is created.

    It only affects the CPU platform: on a machine with an accelerator, the accelerator's devices
    are used and the CPU count merely sets how many host devices exist.

    Args:
        count: number of CPU devices to emulate (>= 1).

    Raises:
        DeviceEmulationError: JAX's backend is already running with a different CPU device count
            (the setting would be silently ignored).

    Example:
        >>> import meshpar as mp
        >>> mp.emulate_devices(8)  # before the first jax.devices() or array op
    """
    if not is_int(count, minimum=1, numpy=False):
        raise DeviceEmulationError(f"emulate_devices(count={count!r}): count must be an int >= 1")
    if _backend_started():
        have = len(jax.devices("cpu"))
        if have == count:
            return
        raise DeviceEmulationError(
            f"emulate_devices({count}) was called after JAX started its backend with {have} CPU "
            "device(s); the request would be silently ignored. Call meshpar.emulate_devices() "
            "before the first jax.devices() call or array operation (importing jax is fine), or "
            f"set JAX_NUM_CPU_DEVICES={count} in the environment before starting Python."
        )
    jax.config.update("jax_num_cpu_devices", count)
    size_thread_pool(count)


#: Collectives one emulated device may wait in at once that the pool leaves a thread for: the
#: entry computation's and a loop's (the case seen). More costs speed: XLA:CPU splits its kernels
#: over the same pool; for 8 devices on 2 cores, 16 threads took 1.04x the 20m step of 8, and 32
#: threads 1.08x that of 16 (benchmarks/README.md).
COLLECTIVES_IN_FLIGHT = 2
PJRT_NPROC = "PJRT_NPROC"


def pool_threads(devices: int, /, *, cores: int | None = None) -> int:
    """Threads for XLA:CPU's pool with ``devices`` emulated devices: enough that every device can
    wait in :data:`COLLECTIVES_IN_FLIGHT` collectives at once (module docstring).

    Example:
        >>> pool_threads(8, cores=2)
        16
        >>> pool_threads(1, cores=2)
        2
    """
    if cores is None:
        cores = os.cpu_count() or 1
    return max(cores, devices * COLLECTIVES_IN_FLIGHT) if devices > 1 else cores


def size_thread_pool(devices: int, /) -> None:
    """Set ``PJRT_NPROC`` to :func:`pool_threads` unless it is already set (yours wins). Call
    before JAX starts its backend; :func:`emulate_devices` does.

    Example:
        >>> import os
        >>> size_thread_pool(8)   # PJRT_NPROC=16 on 2 cores, unless PJRT_NPROC is set already
        >>> int(os.environ["PJRT_NPROC"]) > 0
        True
    """
    if devices > 1:
        os.environ.setdefault(PJRT_NPROC, str(pool_threads(devices)))


def thread_pool_warning() -> str | None:
    """Why the running CPU backend's pool may deadlock its collectives, or ``None``: it has more
    than one device and fewer threads than :func:`pool_threads` asks for (JAX was started
    without :func:`emulate_devices`, e.g. by ``jax_num_cpu_devices`` or ``XLA_FLAGS``).

    Example:
        >>> thread_pool_warning() is None or "PJRT_NPROC" in thread_pool_warning()
        True
    """
    if jax.default_backend() != "cpu":
        return None
    devices = jax.local_device_count()
    cores = os.cpu_count() or 1
    try:
        have = int(os.environ[PJRT_NPROC])
    except (KeyError, ValueError):
        have = cores
    have = max(have, devices)
    want = pool_threads(devices, cores=cores)
    if have >= want:
        return None
    return (f"XLA:CPU runs these {devices} CPU devices on {have} threads; collectives can deadlock "
            f"with fewer than {want} (meshpar.backend.devices). Call meshpar.emulate_devices() "
            f"before JAX starts, or set {PJRT_NPROC}={want} in the environment")


def device_count() -> int:
    """The number of devices of the default backend, across all processes."""
    return jax.device_count()
