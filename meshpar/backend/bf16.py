"""How bf16 matmuls run: on the device's bf16 dot instructions, or as fp32 dots of bf16 values.

A bf16 x bf16 dot accumulating in fp32 and an fp32 dot of the same bf16 values give the same
numbers (a product of two bf16 values is exact in fp32; both accumulate in fp32), so the choice
is one of speed only. GPUs and TPUs have bf16 units. A CPU without bf16 dot instructions
(x86 without AVX512-BF16 or AMX-BF16, Arm without BF16) widens bf16 operands inside the kernel,
and there XLA:CPU's fp32 dot is faster: on an AVX2 EPYC (jaxlib 0.10.2) bf16 -> fp32 dots took
1.02-1.48x an fp32 dot of the same shape, and the 20m preset's bf16 step (``fsdp=8``) 0.82x as
long with fp32 dots (benchmarks/README.md, "bf16 matmuls on a CPU without bf16 instructions").
On a CPU with AVX512-BF16 the bf16 kernels took 0.2-0.7x the fp32 dot.

By default (``MESHPAR_BF16_DOTS`` unset or ``auto``) meshpar takes the fp32 dots where the
program runs on a CPU without bf16 dot instructions, and bf16 dots everywhere else;
``MESHPAR_BF16_DOTS=native`` or ``fp32`` forces one, and :func:`bf16_dots_as` one block of
code (the planner traces a GPU's or TPU's program in the native form on this CPU). The fp32
dots were opt-in until the cause of a deadlock they exposed was found: XLA:CPU's thread pool,
too small for two collectives in flight on every emulated device (:mod:`meshpar.backend.devices`,
which now sizes it). It is read when a model is traced, so a compiled step keeps the choice it
was made with.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import os
from collections.abc import Iterator

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
    """How this process computes bf16 matmuls: the form of the enclosing :func:`bf16_dots_as`
    block if any; else ``MESHPAR_BF16_DOTS`` (``native`` or ``fp32``) when set; else
    :attr:`BF16Dots.FP32` on a CPU backend whose CPU has no bf16 dot instructions,
    :attr:`BF16Dots.NATIVE` anywhere else.

    Raises:
        MeshparError: ``MESHPAR_BF16_DOTS`` is set to something other than ``auto``,
            ``native`` or ``fp32``.

    Example:
        >>> bf16_dots() in (BF16Dots.NATIVE, BF16Dots.FP32)
        True
    """
    within = _WITHIN.get()
    if within is not None:
        return within
    forced = _forced()
    if forced is not None:
        return forced
    cpu_without = jax.default_backend() == "cpu" and not _host_cpu_has_bf16_dots()
    return BF16Dots.FP32 if cpu_without else BF16Dots.NATIVE


#: The form a :func:`bf16_dots_as` block sets (``None`` outside one).
_WITHIN: contextvars.ContextVar[BF16Dots | None] = contextvars.ContextVar(
    "meshpar_bf16_dots", default=None)


@contextlib.contextmanager
def bf16_dots_as(form: BF16Dots, /) -> Iterator[None]:
    """Models traced inside the block compute bf16 matmuls in ``form``, whatever the host.

    For programs compiled here on behalf of other hardware: the planner compiles a GPU's or
    TPU's candidate layouts on emulated CPU devices, and those devices run bf16 dots
    (:attr:`BF16Dots.NATIVE`), not the widened fp32 dots an AVX2 host would pick, whose fp32
    copies of the operands would count in ``memory_analysis``.

    Example:
        >>> with bf16_dots_as(BF16Dots.NATIVE):
        ...     bf16_dots()
        <BF16Dots.NATIVE: 'native'>
    """
    token = _WITHIN.set(BF16Dots(form))
    try:
        yield
    finally:
        _WITHIN.reset(token)


def _forced() -> BF16Dots | None:
    # MESHPAR_BF16_DOTS as a choice, or None for unset/auto.
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value == "auto":
        return None
    try:
        return BF16Dots(value)
    except ValueError:
        raise MeshparError(
            f"{ENV}={os.environ[ENV]!r}; expected auto, native or fp32") from None


def describe_bf16_dots() -> str:
    """One line for a run's header: how bf16 matmuls run here, and why.

    Example:
        >>> describe_bf16_dots().startswith("bf16 matmuls: ")
        True
    """
    forced = _forced() is not None
    if bf16_dots() is BF16Dots.FP32:
        why = f"{ENV}=fp32" if forced else (
            f"this CPU has no bf16 dot instructions; {ENV}=native for bf16 dots")
        return f"bf16 matmuls: fp32 dots of the bf16 values ({why})"
    return f"bf16 matmuls: bf16 dots ({ENV}=native)" if forced else "bf16 matmuls: bf16 dots"
