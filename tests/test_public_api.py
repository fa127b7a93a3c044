"""Everything the docs, notebooks, examples and error messages tell users to call exists.

The test reads the README, every notebook's code and markdown cells, every example and every
string literal of meshpar's own source (docstrings and error messages), collects each reference
to the package (``mp.NAME``, ``meshpar.NAME``, dotted further as in ``mp.Rules.table`` or
``meshpar.remat.maybe_remat``, and ``from meshpar import A, B``) and checks that it resolves: an
attribute of the package, or a submodule.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import pathlib
import re
import subprocess
import types

import pytest

import meshpar

ROOT = pathlib.Path(__file__).resolve().parents[1]

# `mp.X` / `meshpar.X.Y`, not preceded by a word character or a dot (so `self.mp.items` and
# `t_mp.append` are not references to the package).
_ATTR = re.compile(r"(?<![\w.])(?:mp|meshpar)((?:\.[A-Za-z_]\w*)+)")
_FROM = re.compile(r"\bfrom\s+(meshpar(?:\.\w+)*)\s+import\s+(\([^)]*\)|[^\n;]+)")


def _sources() -> list[tuple[str, str]]:
    """``(where, text)`` for every place that teaches users names."""
    out = [("README.md", (ROOT / "README.md").read_text())]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            if cell["cell_type"] in ("code", "markdown"):
                out.append((f"{nb.relative_to(ROOT)} cell {i}", "".join(cell["source"])))
    for ex in sorted((ROOT / "examples").glob("*.py")):
        out.append((str(ex.relative_to(ROOT)), ex.read_text()))
    for py in sorted((ROOT / "meshpar").rglob("*.py")):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append((f"{py.relative_to(ROOT)}:{node.lineno}", node.value))
    return out


def references(text: str) -> set[str]:
    """The dotted names under ``meshpar`` that ``text`` refers to, e.g. ``{"Rules.table"}``.

    Example:
        >>> sorted(references("mp.make_mesh(data=2); from meshpar import Rules as R, Trainer"))
        ['Rules', 'Trainer', 'make_mesh']
    """
    refs = {m.group(1)[1:] for m in _ATTR.finditer(text)}
    for m in _FROM.finditer(text):
        base = m.group(1).split(".")[1:]
        names = re.sub(r"#[^\n]*", "", m.group(2)).strip().strip("()")
        for item in names.split(","):
            name = item.split("#")[0].split(" as ")[0].strip()
            if name.isidentifier():
                refs.add(".".join([*base, name]))
    return refs


def resolves(dotted: str) -> bool:
    """Whether ``meshpar.<dotted>`` names an attribute or a submodule."""
    obj: object = meshpar
    for part in dotted.split("."):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif hasattr(obj, "__path__") and importlib.util.find_spec(f"{obj.__name__}.{part}"):
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        else:
            return False
    return True


def test_the_scanner_finds_references():
    text = ("import meshpar as mp\nmp.scan_layers(self.blocks, x)  # `meshpar.remat.maybe_remat`\n"
            "from meshpar import (\n    Rules,  # rules\n    Trainer as T,\n)\n"
            "self.mp.items(); t_mp.append(1)")
    assert references(text) == {"scan_layers", "remat.maybe_remat", "Rules", "Trainer"}
    assert resolves("Rules.table") and resolves("models") and resolves("errors.StrategyError")
    assert not resolves("no_such_name") and not resolves("errors.NoSuchError")


def test_every_documented_name_resolves():
    sources = _sources()
    assert any(w.startswith("notebooks/") for w, _ in sources), "no notebooks found"
    assert any(w.startswith("examples/") for w, _ in sources), "no examples found"
    missing: dict[str, list[str]] = {}
    seen = 0
    for where, text in sources:
        for ref in references(text):
            seen += 1
            if not resolves(ref):
                missing.setdefault(f"meshpar.{ref}", []).append(where)
    assert seen > 50  # the scanner reads what it should
    assert not missing, "named in the docs but not importable: " + "; ".join(
        f"{name} (in {', '.join(sorted(set(w)))})" for name, w in sorted(missing.items())
    )


def test_all_is_sorted_complete_and_importable():
    names = meshpar.__all__
    assert list(names) == sorted(names), "keep meshpar.__all__ sorted"
    assert len(set(names)) == len(names)
    assert [n for n in names if not hasattr(meshpar, n)] == []
    # Every public name bound in meshpar/__init__.py is listed (submodules are not names).
    public = {n for n, v in vars(meshpar).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public - set(names) == set()


@pytest.mark.parametrize("name", ["scan_layers", "Rules", "Trainer", "TrainConfig", "make_mesh"])
def test_names_the_readme_teaches(name):
    assert name in meshpar.__all__


def test_no_file_carries_merge_conflict_markers():
    # A merge once left `<<<<<<< HEAD` ... `>>>>>>> branch` in the README's Quickstart. Tracked
    # files only (CI runs on a git checkout); generated files such as *.egg-info copy the README.
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode().split("\0")
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)
    found = [name for name in tracked
             if name and (ROOT / name).is_file() and pathlib.Path(name).suffix in (".py", ".md", ".toml", ".ipynb", "")
             and marker.search((ROOT / name).read_text(errors="replace"))]
    assert not found, f"merge conflict markers in {found}"
