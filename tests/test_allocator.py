"""meshpar.backend.allocator: XLA:CPU's freed buffers stay in the heap (glibc's mallopt).

The setting is per process and applied once, so each case runs in a fresh interpreter and reads
glibc's own counters (``mallinfo2``): a 64 MiB ``malloc`` is an ``mmap`` of its own by default,
and comes from the heap, which keeps it after ``free``, once the setting is on.
"""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from meshpar.backend.allocator import Heap, describe_heap

_GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version") if os.name == "posix" else False

_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from meshpar.backend import allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    if sys.argv[1] == "trainer":
        # The Trainer applies it on the CPU backend, with nothing else asked.
        import jax, optax
        from flax import nnx
        import meshpar as mp
        from meshpar.models.gpt import GPT, get_preset, lm_loss
        mp.Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)), optax.sgd(0.1), lm_loss,
                   mesh=mp.make_mesh("data=1"))
        print(allocator.keep_freed_memory().value)
    elif sys.argv[1] == "call":
        print(allocator.keep_freed_memory().value)
    else:
        print("none")
    before = libc.mallinfo2()
    block = libc.malloc(64 << 20)
    mapped = libc.mallinfo2().hblks - before.hblks
    libc.free(block)
    # Free bytes the heap holds: the block's, unless it was mmapped or trimmed away.
    print(mapped, libc.mallinfo2().fordblks >= 64 << 20)
    """
)


def _probe(mode: str, **env) -> list[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "MESHPAR_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         timeout=300, env={**base, "JAX_PLATFORMS": "cpu", **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not _GLIBC, reason="mallopt settings are glibc's; this C library is not glibc")
def test_large_buffers_come_from_the_heap_and_stay():
    # glibc's default: a 64 MiB block is mmapped, and given back to the OS when freed.
    assert _probe("none") == ["none", "1", "False"]
    assert _probe("call") == ["kept", "0", "True"]
    assert _probe("trainer") == ["kept", "0", "True"]


@pytest.mark.skipif(not _GLIBC, reason="mallopt settings are glibc's; this C library is not glibc")
def test_the_users_settings_win():
    assert _probe("call", MESHPAR_MALLOC="system") == ["system", "1", "False"]
    assert _probe("call", MALLOC_TRIM_THRESHOLD_="1000000") == ["user", "1", "False"]
    assert _probe("call", GLIBC_TUNABLES="glibc.malloc.arena_max=2") == ["user", "1", "False"]
    # MESHPAR_MALLOC=keep asks for it whatever else is set.
    assert _probe("call", MESHPAR_MALLOC="keep", MALLOC_TOP_PAD_="0") == ["kept", "0", "True"]


def test_bad_setting_names_the_variable():
    out = subprocess.run(
        [sys.executable, "-c", "from meshpar.backend.allocator import keep_freed_memory as k; k()"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "MESHPAR_MALLOC": "big"})
    assert out.returncode != 0
    assert "MESHPAR_MALLOC='big'; expected auto, keep or system" in out.stderr


def test_describe_heap_says_how_to_undo_it():
    assert "MESHPAR_MALLOC=system" in describe_heap(Heap.KEPT)
    assert describe_heap(Heap.UNSUPPORTED) == "heap: the C library's defaults (not glibc)"
