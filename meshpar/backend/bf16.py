"""How bf16 matmuls run: on the device's bf16 dot instructions, or as fp32 dots of bf16 values.

A bf16 x bf16 dot accumulating in fp32 and an fp32 dot of the same bf16 values give the same
numbers (a product of two bf16 values is exact in fp32; both accumulate in fp32), so the choice
is one of speed only. GPUs and TPUs have bf16 units. A CPU without bf16 dot instructions
(x86 without AVX512-BF16 or AMX-BF16, Arm without BF16) widens bf16 operands inside the kernel,
and there XLA:CPU's fp32 dot is faster: on an AVX2 EPYC (jaxlib 0.10.2) bf16 -> fp32 dots took
1.02-1.48x an fp32 dot of the same shape, and the 20m preset's bf16 step (``fsdp=8``) 0.82x as
long with fp32 dots (benchmarks/README.md, "bf16 matmuls on a CPU without bf16 instructions").
On a CPU with AVX512-BF16 the bf16 kernels took 0.2-0.7x the fp32 dot.

``MESHPAR_BF16_DOTS=fp32`` opts in to the fp32 dots; unset (or ``auto``, ``native``) keeps bf16
dots. Not the default on bf16-less CPUs yet: two of three ``meshpar train`` runs of the 20m shape
on ``fsdp=8`` with fp32 dots (both of 12 steps; one of 3 steps passed) deadlocked in XLA:CPU's
rendezvous: one device waited in two of the step's independent scalar all-reduces at once,
another reached neither. No run with bf16 dots has shown it; the step's collectives must be
ordered first (issue 13). It is read when a model is traced, so a compiled step keeps the
choice it was made with.
"""

from __future__ import annotations

import enum
import functools
import os

import jax

from meshpar.errors import MeshparError

ENV = "MESHPAR_BF16_DOTS"
# /proc/cpuinfo feature names of bf16 dot instructions: x86 (AVX512-BF16, AMX-BF16), Arm (BF16).
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


class BF16Dots(enum.Enum):
    """How a bf16 x bf16 matmul is computed (both accumulate in fp32)."""

    NATIVE = "native"  #: a bf16 dot, on the device's bf16 instructions
    FP32 = "fp32"      #: an fp32 dot of the operands widened to fp32 (exact), result rounded


def cpu_has_bf16_dots(cpuinfo: str, /) -> bool | None:
    """Whether ``/proc/cpuinfo`` text lists a bf16 dot instruction; ``None`` if it lists no
    features at all (another OS's format: nothing known).

    Example:
        >>> cpu_has_bf16_dots("flags\\t\\t: fpu sse2 avx2 fma")
        False
        >>> cpu_has_bf16_dots("flags\\t\\t: avx2 avx512f avx512_bf16")
        True
    """
    features = set()
    found = False
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            found = True
            features.update(value.split())
    return bool(features & _BF16_FLAGS) if found else None


@functools.cache
def _host_cpu_has_bf16_dots() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            known = cpu_has_bf16_dots(f.read())
    except OSError:
        known = None
    # Unknown (not Linux): no hint.
    return True if known is None else known


def bf16_dots() -> BF16Dots:
    """How this process computes bf16 matmuls: :attr:`BF16Dots.FP32` when
    ``MESHPAR_BF16_DOTS=fp32``, else :attr:`BF16Dots.NATIVE`.

    Raises:
        MeshparError: ``MESHPAR_BF16_DOTS`` is set to something other than ``auto``,
            ``native`` or ``fp32``.

    Example:
        >>> bf16_dots() in (BF16Dots.NATIVE, BF16Dots.FP32)
        True
    """
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    try:
        return BF16Dots.NATIVE if value == "auto" else BF16Dots(value)
    except ValueError:
        raise MeshparError(
            f"{ENV}={os.environ[ENV]!r}; expected auto, native or fp32") from None


def describe_bf16_dots() -> str:
    """One line for a run's header: how bf16 matmuls run here (and, on a CPU without bf16 dot
    instructions that keeps bf16 dots, the opt-in).

    Example:
        >>> describe_bf16_dots().startswith("bf16 matmuls: ")
        True
    """
    if bf16_dots() is BF16Dots.FP32:
        return f"bf16 matmuls: fp32 dots of the bf16 values ({ENV}=fp32)"
    if jax.default_backend() == "cpu" and not _host_cpu_has_bf16_dots():
        return (f"bf16 matmuls: bf16 dots; this CPU has no bf16 dot instructions, where "
                f"{ENV}=fp32 (fp32 dots, same numbers) is faster but not yet safe "
                "(meshpar.backend.bf16)")
    return "bf16 matmuls: bf16 dots"
