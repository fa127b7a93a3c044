"""Keeping XLA:CPU's freed buffers in the process heap instead of handing them back to the OS.

On the CPU backend every execution of a compiled program allocates its temporaries with the C
library's ``malloc`` (one buffer of ``memory_analysis().temp_size_in_bytes`` per device and
step, tens of MB for the benchmarks' models) and frees them when it ends. glibc serves a request
above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with ``munmap``
on ``free``, and it trims the heap's free top back to the OS; either way the next step touches
new pages, and the kernel faults and zeroes every one of them. With 8 emulated devices on 2
cores that was 9% of the process's CPU time in ``perf`` (page faults, ``clear_page``); with
the setting below issue 13's steps took 1-5% less time (benchmarks/README.md, "The allocator").

:func:`keep_freed_memory` sets glibc's ``M_MMAP_MAX`` to 0 (large requests come from the heap)
and ``M_TRIM_THRESHOLD`` to 2 GiB, the most its C ``int`` takes (the heap keeps what was
freed), so a step reuses the previous step's pages. The cost: the process keeps its peak heap
after a large temporary is freed, which a training process reaches again at the next step.
:class:`meshpar.Trainer` calls it once per process when it runs on the CPU backend (the
accelerators' device memory is not ``malloc``'s). ``MESHPAR_MALLOC=system`` leaves the C
library as it is; so do ``MALLOC_*`` or ``GLIBC_TUNABLES`` settings of the user's own, and a C
library that is not glibc.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os

from meshpar.errors import MeshparError

ENV = "MESHPAR_MALLOC"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free heap top below this stays with the process: mallopt's value is a C int, so 2 GiB.
_TRIM_THRESHOLD = 2**31 - 1
# The user's own glibc malloc settings, which win (see the module docstring).
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                  "MALLOC_TOP_PAD_")


class Heap(enum.Enum):
    """What :func:`keep_freed_memory` did to the C library's allocator."""

    KEPT = "kept"                #: large buffers from the heap, freed memory kept (mallopt)
    SYSTEM = "system"            #: ``MESHPAR_MALLOC=system``: untouched
    USER = "user"                #: the user's MALLOC_* / GLIBC_TUNABLES: untouched
    UNSUPPORTED = "unsupported"  #: not glibc (or mallopt refused): untouched


def _requested() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "keep", "system"):
        raise MeshparError(f"{ENV}={os.environ[ENV]!r}; expected auto, keep or system")
    return value


def _user_settings() -> list[str]:
    found = [name for name in _USER_SETTINGS if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        found.append("GLIBC_TUNABLES")
    return found


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


@functools.cache
def keep_freed_memory() -> Heap:
    """Make ``malloc`` serve large buffers from the heap and keep freed memory (module
    docstring); once per process, later calls return the first call's result.

    Returns:
        What was done: :attr:`Heap.KEPT`, or why nothing was.

    Raises:
        MeshparError: ``MESHPAR_MALLOC`` is set to something other than ``auto``, ``keep`` or
            ``system``.

    Example:
        >>> keep_freed_memory() in tuple(Heap)
        True
    """
    requested = _requested()
    if requested == "system":
        return Heap.SYSTEM
    if _user_settings() and requested == "auto":
        return Heap.USER
    libc = _glibc()
    if libc is None:
        return Heap.UNSUPPORTED
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        return Heap.UNSUPPORTED
    return Heap.KEPT


def describe_heap(heap: Heap, /) -> str:
    """One line for a run's header: what :func:`keep_freed_memory` did.

    Example:
        >>> describe_heap(Heap.KEPT).startswith("heap: ")
        True
    """
    return {
        Heap.KEPT: f"heap: large buffers from the heap, freed memory kept ({ENV}=system to leave "
                   "malloc alone)",
        Heap.SYSTEM: f"heap: the C library's defaults ({ENV}=system)",
        Heap.USER: "heap: the C library's settings from the environment (" + ", ".join(
            _user_settings()) + ")",
        Heap.UNSUPPORTED: "heap: the C library's defaults (not glibc)",
    }[heap]
