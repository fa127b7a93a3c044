"""Emulating several devices on one CPU.

JAX reads the CPU device count once, when it starts its backend. After that the
``jax_num_cpu_devices`` config raises and ``--xla_force_host_platform_device_count`` is *silently
ignored*, so :func:`emulate_devices` checks whether the backend is already up and raises a clear
error instead of letting a wrong device count through.
"""

from __future__ import annotations

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


def device_count() -> int:
    """The number of devices of the default backend, across all processes."""
    return jax.device_count()
