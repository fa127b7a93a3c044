"""The environment of the suite's child processes: CLI runs, several-process jobs, notebooks."""

from __future__ import annotations

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent.parent

#: XLA flags of every JAX process the suite starts. The tests run tiny models, where LLVM's
#: optimisation of XLA:CPU's generated code costs more compile time than it saves at run time
#: (matmuls are library calls either way): level 0 took an empty-cache run of the suite, in two
#: workers on 2 cores, from 16.5 to 10.6 minutes.
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0"


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
