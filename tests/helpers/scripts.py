"""Loading a benchmark script (``benchmarks/NAME.py``) as a module, as its tests need."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent.parent / "benchmarks"


def load_benchmark(name: str) -> types.ModuleType:
    """``benchmarks/<name>.py`` imported by path (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Registered first, as an import would: dataclasses resolve their module's names there.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
