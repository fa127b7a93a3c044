"""The environment of the suite's child processes: CLI runs, several-process jobs, notebooks."""

from __future__ import annotations

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent.parent

#: XLA flags of every JAX process the suite starts. The tests run tiny models, where compiling
#: costs far more than running, so the suite compiles cheaply:
#:
#: * ``--xla_backend_optimization_level=0``: LLVM's optimisation of XLA:CPU's generated code
#:   costs more compile time than it saves at run time (matmuls are library calls either way):
#:   an empty-cache run of the suite, in two workers on 2 cores, went from 16.5 to 10.6 minutes.
#: * ``--xla_cpu_use_fusion_emitters=false``: XLA:CPU's elemental emitters for its fusions
#:   instead of the MLIR fusion emitters, whose pipelines dominated what compile time was left
#:   (2026-12-03, one equivalence test from an empty cache, three runs interleaved: 26-30 s
#:   -> 17-19 s; the whole suite 18.9 -> 12.4 minutes). The HLO passes (sharding, collectives,
#:   buffer assignment) are XLA's own either way: the tests' collective counts held, and
#:   ``memory_analysis`` of the planner's test layouts is unchanged but for one (``fsdp=2,
#:   tensor=4 z2 mb4``, tiny: 0.969 -> 0.920 MB, a fusion decision). The emitted arithmetic
#:   is as accurate (tanh, exp, log, rsqrt: the same maximum and mean error against float64),
#:   but fuses and so rounds in other places: two calibrated tolerances moved (the remat
#:   policies' gradients, test_gpt.py; the pipelines' parameter outliers,
#:   test_pipeline_train.py). The references a test compares with are compiled in the same
#:   process, with the same flags. (``--xla_cpu_emitter_verification_level=0`` measured no
#:   faster.)
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` for a child process, without this session's JAX set-up.

    ``JAX_*``, ``XLA_*`` and ``MESHPAR_*`` variables are dropped, so that a child never
    inherits the session's 8 emulated devices; it gets the CPU platform, the repository on
    ``PYTHONPATH``, unbuffered output, :data:`SUITE_XLA_FLAGS` and the suite's compile cache
    (``MESHPAR_TEST_CACHE``, set by ``conftest.py``), then ``extra``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "MESHPAR_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
               XLA_FLAGS=SUITE_XLA_FLAGS)
    cache = os.environ.get("MESHPAR_TEST_CACHE")
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(extra)
    return env
