"""The package's import structure, read with ``ast`` (nothing is imported).

The subpackages follow the data flow, and each imports only from those before it:

    errors, axes, keypath, mesh  ->  backend  ->  sharding  ->  parallel  ->  models  ->  train
        ->  inspect  ->  planner  ->  cli

``models`` sits right after ``parallel``: a model uses only the parallel primitives
(``constrain``, ``scan_layers``, remat policies) and never the trainer; ``inspect`` builds the
built-in GPT for ``explain_gpt`` and ``cli`` drives everything. ``meshpar/__init__.py`` is the
public facade and may import from anywhere; nothing inside the package imports it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "meshpar"

#: The flow, first to last; a module may import from its own layer or an earlier one.
LAYERS = (
    ("meshpar.errors", "meshpar.axes", "meshpar.keypath", "meshpar.mesh", "meshpar._moved"),
    ("meshpar.backend",),
    ("meshpar.sharding",),
    ("meshpar.parallel",),
    ("meshpar.models",),
    ("meshpar.train",),
    ("meshpar.inspect",),
    ("meshpar.planner",),
    ("meshpar.cli",),
)
#: The entry points above the flow.
FACADES = ("meshpar", "meshpar.__main__")

#: Imports inside a function (``(module, what it imports from)``), each with its reason (the import line or the one above it must
#: carry a comment saying so too). Everything else is imported at the top of its module.
ALLOWED_LAZY = {
    ("meshpar.backend.devices", "jax._src"):
        "private JAX (xla_bridge), read only when asked whether the backend has started",
    ("meshpar.backend.distributed", "jax._src"):
        "private JAX (xla_bridge, distributed), read only when asked",
    ("meshpar.train.data", "pydoc_data.topics"): "a large module, read once to build the corpus",
    ("meshpar.cli.train", "tqdm"): "only a run that draws a progress bar needs it",
    ("meshpar.cli.inspect", "meshpar.inspect.plots"): "matplotlib, only for --plots",
    ("meshpar.cli.plan", "meshpar.inspect.plots"): "matplotlib, only for --plot",
    ("meshpar.planner.search", "tqdm"): "only a plan that draws a progress bar needs it",
    ("meshpar.cli.data", "meshpar.train.loader"): "Grain (a second to import), only for --data",
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str) -> bool:
    return name in MODULES


def _imports(name: str):
    """``(imported module, names imported from it, line, inside a function)`` of one module."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.append((alias.name, (), child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = tuple(a.name for a in child.names)
                # `from meshpar.inspect import hlo` imports the module meshpar.inspect.hlo.
                subs = [f"{base}.{n}" for n in names if _is_module(f"{base}.{n}")]
                for sub in subs:
                    out.append((sub, (), child.lineno, in_function))
                rest = tuple(n for n in names if not _is_module(f"{base}.{n}"))
                if rest or not subs:
                    out.append((base, rest, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return out


def _layer(name: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def _edges():
    return {m: sorted({i for i, _, _, _ in _imports(m) if i in MODULES}) for m in MODULES}


def test_every_module_has_a_place_in_the_flow():
    stray = [m for m in MODULES if m not in FACADES and _layer(m) is None]
    assert not stray, f"modules outside the flow (add them to a subpackage): {stray}"


def test_the_old_flat_modules_are_gone():
    # They import through meshpar._moved; a file at an old path would shadow the moved module.
    from_moved = ast.literal_eval(
        next(n.value for n in ast.walk(ast.parse((PACKAGE / "_moved.py").read_text()))
             if isinstance(n, ast.AnnAssign | ast.Assign)
             and getattr(getattr(n, "target", None) or n.targets[0], "id", "") == "MOVED")
    )
    assert len(from_moved) >= 20
    assert [old for old in from_moved if old in MODULES] == []
    assert all(new in MODULES for new in from_moved.values())


def test_imports_follow_the_flow():
    wrong = []
    for module, edges in _edges().items():
        if module in FACADES or _layer(module) is None:  # (reported by the test above)
            continue
        for target in edges:
            if target in FACADES:
                wrong.append(f"{module} imports the facade {target}")
            elif _layer(target) is not None and _layer(target) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {target} "
                             f"(layer {_layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = _edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join([*stack[stack.index(t):], t]))
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_no_private_names_across_modules():
    reach_ins = []
    for module in MODULES:
        path = MODULES[module]
        tree = ast.parse(path.read_text())
        imported_modules = {}
        for target, names, line, _ in _imports(module):
            if target.startswith("meshpar") and target != module:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    reach_ins.append(f"{module}:{line} imports {private} from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meshpar"):
                for a in node.names:
                    if _is_module(f"{node.module}.{a.name}"):
                        imported_modules[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                reach_ins.append(f"{module}:{node.lineno} reads "
                                 f"{imported_modules[node.value.id]}.{node.attr}")
    assert not reach_ins, "\n".join(reach_ins)


def test_function_level_imports_are_the_allowed_ones_and_say_why():
    found = {}
    for module in MODULES:
        lines = MODULES[module].read_text().splitlines()
        for target, _, line, in_function in _imports(module):
            if not in_function:
                continue
            key = (module, target)
            found[key] = line
            if key in ALLOWED_LAZY:
                here, above = lines[line - 1], lines[line - 2].strip()
                assert "#" in here or above.startswith("#"), \
                    f"{module}:{line}: say why {target} is imported inside a function"
    unexpected = sorted(set(found) - set(ALLOWED_LAZY))
    assert not unexpected, f"import these at the top of the module: {unexpected}"
    stale = sorted(set(ALLOWED_LAZY) - set(found))
    assert not stale, f"no longer imported lazily, drop from ALLOWED_LAZY: {stale}"


@pytest.mark.parametrize("old,new", [("meshpar.rules", "meshpar.sharding.rules"),
                                     ("meshpar.shard", "meshpar.sharding.placement"),
                                     ("meshpar.run", "meshpar.cli.train")])
def test_old_module_paths_import_with_a_warning(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} has moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_every_error_lives_in_errors_py_and_is_a_meshpar_error():
    import meshpar.errors as errors

    elsewhere = []
    for module, path in MODULES.items():
        if module == "meshpar.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
                    for b in node.bases):
                elsewhere.append(f"{module}.{node.name}")
    assert not elsewhere, f"define these in meshpar/errors.py: {elsewhere}"
    exceptions = [v for v in vars(errors).values()
                  if isinstance(v, type) and issubclass(v, BaseException)
                  and not issubclass(v, Warning)]
    assert len(exceptions) >= 14
    assert [e.__name__ for e in exceptions if not issubclass(e, errors.MeshparError)] == []
    # Re-exported where they were defined before.
    from meshpar.backend.distributed import DistributedError
    from meshpar.backend.launch import LaunchError
    from meshpar.cli import UsageError
    from meshpar.parallel.zero import StackNotScanned
    from meshpar.train.checkpoint import CheckpointError

    assert {DistributedError, LaunchError, UsageError, StackNotScanned, CheckpointError} <= \
        set(exceptions)


@pytest.mark.parametrize("module", ["meshpar", "meshpar.cli", "meshpar.launch"])
def test_python_dash_m_entry_points_still_run(module):
    # `python -m meshpar.launch` is the old path of meshpar.backend.launch (documented before
    # the move); `python -m meshpar` and `-m meshpar.cli` are the command.
    import subprocess
    import sys

    from helpers.env import child_env

    args = ["--help"] if module == "meshpar.launch" else ["launch", "--help"]
    proc = subprocess.run([sys.executable, "-m", module, *args], env=child_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: meshpar launch"), proc.stdout[:200]
