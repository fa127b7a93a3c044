"""The module paths of meshpar's flat layout (before the subpackages) keep importing.

``import meshpar.rules`` (or ``from meshpar.rules import Rules``, or ``python -m meshpar.launch``)
gives the module at its new home, :mod:`meshpar.sharding.rules`, with a ``DeprecationWarning``
that names it. The old name is an alias of the same module object, so module globals,
``monkeypatch`` and ``isinstance`` behave as before.

Why a finder rather than a small re-exporting file at each old path: a file left at the old path
makes git see it as rewritten rather than moved, so edits made elsewhere to the old file would
conflict instead of following it to its new home.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

#: old module name -> new module name
MOVED = {
    "meshpar.devices": "meshpar.backend.devices",
    "meshpar.distributed": "meshpar.backend.distributed",
    "meshpar.launch": "meshpar.backend.launch",
    "meshpar.rules": "meshpar.sharding.rules",
    "meshpar.strategy": "meshpar.sharding.strategy",
    "meshpar.shard": "meshpar.sharding.placement",
    "meshpar.explicit": "meshpar.sharding.explicit",
    "meshpar.linen": "meshpar.models.linen",
    "meshpar.layout": "meshpar.parallel.layout",
    "meshpar.stack": "meshpar.parallel.stack",
    "meshpar.remat": "meshpar.parallel.remat",
    "meshpar.zero": "meshpar.parallel.zero",
    "meshpar.schedule": "meshpar.parallel.schedule",
    "meshpar.pipeline": "meshpar.parallel.pipeline",
    # (meshpar.plan, the old path of meshpar.train.plan, is gone: mp.plan is the planner.)
    "meshpar.loss": "meshpar.train.loss",
    "meshpar.checkpoint": "meshpar.train.checkpoint",
    "meshpar.data": "meshpar.train.data",
    "meshpar.hlo": "meshpar.inspect.hlo",
    "meshpar.explain": "meshpar.inspect.explain",
    "meshpar.report": "meshpar.inspect.report",
    "meshpar.plots": "meshpar.inspect.plots",
    "meshpar.run": "meshpar.cli.train",
    "meshpar.inspect_cmd": "meshpar.cli.inspect",
}


def warn_moved(old: str, new: str, *, stacklevel: int) -> None:
    warnings.warn(f"{old} has moved to {new}; import it from there", DeprecationWarning,
                  stacklevel=stacklevel + 1)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return None  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module) -> None:
        # The import system returns whatever sys.modules holds under the name after exec_module.
        # stacklevel 2 + importlib's own frames, which warnings skips: the importing line.
        warn_moved(module.__name__, self.new, stacklevel=2)
        sys.modules[module.__name__] = importlib.import_module(self.new)

    def get_code(self, fullname):
        # ``python -m <old name>`` (runpy) runs the new module's code as __main__.
        spec = importlib.util.find_spec(self.new)
        return spec.loader.get_code(self.new)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        real = importlib.util.find_spec(new)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new), origin=real.origin)


def install() -> None:
    """Let the old module paths import (idempotent)."""
    # First in line: another finder (an editable install's) could otherwise find an old file.
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())


def old_attribute(name: str):
    """``meshpar.<name>`` for an old module name (``meshpar.rules``), or ``AttributeError``."""
    old = f"meshpar.{name}"
    new = MOVED.get(old)
    if new is None:
        raise AttributeError(f"module 'meshpar' has no attribute {name!r}")
    warn_moved(old, new, stacklevel=3)  # the line that reads meshpar.<name>
    module = importlib.import_module(new)
    sys.modules.setdefault(old, module)
    setattr(sys.modules["meshpar"], name, module)
    return module
