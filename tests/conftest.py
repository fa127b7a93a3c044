"""Test-suite set-up: 8 emulated CPU devices before JAX starts, strict checks, a compile cache."""

from __future__ import annotations

import os
import pathlib

import jax

# Must run before anything creates an array: the backend reads the count once (and the thread
# pool size, which emulate_devices sets as meshpar train does).
from meshpar.backend.devices import emulate_devices  # noqa: E402

emulate_devices(8)
# Compile faster (see helpers/env.py); read at backend start, like the device count.
from helpers.env import SUITE_XLA_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()
jax.config.update("jax_enable_x64", False)
# A persistent compilation cache makes subprocess tests and re-runs cheap (2.3 s -> 0.1 s seen).
# It lives outside the checkout so that a fresh clone on the same machine (CI) reuses it; it is
# only a cache: a cold one gives the same results, slower (MESHPAR_TEST_CACHE moves it).
# An empty MESHPAR_TEST_CACHE (`MESHPAR_TEST_CACHE=$UNSET_VAR`) counts as unset: as a path it
# would be the working directory, and a run once filled the repository root with cache files.
_cache = pathlib.Path(os.environ.get("MESHPAR_TEST_CACHE") or
                      pathlib.Path.home() / ".cache" / "meshpar" / "jax-test-cache")
os.environ["MESHPAR_TEST_CACHE"] = str(_cache)  # the subprocess tests share it
jax.config.update("jax_compilation_cache_dir", str(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


def pytest_sessionstart(session):
    # Fail loudly rather than skip quietly if the emulation did not take.
    count = len(jax.devices())
    if count != 8:
        raise pytest.UsageError(f"the test suite needs 8 emulated CPU devices, JAX has {count}")


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8
    return devs
