"""Every ``>>>`` example in meshpar's docstrings runs and prints what it shows.

An example nobody runs is a claim nobody checks: this test runs each module's doctests in the
suite's own process, so ``conftest.py``'s 8 emulated CPU devices, XLA flags and compile cache
apply, one test per module (pytest-xdist splits them). Examples that need what a test cannot
afford (a trained model, a checkpoint directory, several processes) are written as ``Example::``
blocks without prompts, which doctest does not run.

Each test also counts the prompts in the module's source: an example that doctest no longer
finds (a docstring on an object the finder skips, a prompt outside a docstring) fails too,
rather than passing unseen.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pathlib
import pkgutil
import re

import pytest

import meshpar

#: Modules whose examples are not run, each with its reason (none today).
EXCLUDED: dict[str, str] = {}

# A doctest prompt at the start of a line.
_PROMPT = re.compile(r"^[ \t]*>>>(?: |$)", re.M)
# One that begins an example: doctest drops a prompt followed by nothing or only a comment.
_EXAMPLE = re.compile(r"^[ \t]*>>> [ \t]*[^#\s]", re.M)


def _source(name: str, finder) -> str:
    spec = finder.find_spec(name) if finder is not None else None
    return pathlib.Path(spec.origin if spec else meshpar.__file__).read_text()


def _modules_with_examples() -> list[str]:
    """The importable ``meshpar`` modules whose source holds a ``>>>`` prompt, sorted.

    Read from the files, without importing the modules (``__main__`` modules run on import).
    """
    found = [("meshpar", None)]
    found += [(m.name, m.module_finder)
              for m in pkgutil.walk_packages(meshpar.__path__, prefix="meshpar.")]
    return sorted(name for name, finder in found
                  if name not in EXCLUDED and _PROMPT.search(_source(name, finder)))


MODULES = _modules_with_examples()


def test_the_scan_finds_the_modules_with_examples():
    # The parametrization below is only as good as this list.
    assert len(MODULES) >= 50
    assert {"meshpar", "meshpar.mesh", "meshpar.models.gpt",
            "meshpar.train.trainer"} <= set(MODULES)
    assert not set(EXCLUDED) & set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    prompts = len(_EXAMPLE.findall(pathlib.Path(module.__file__).read_text()))
    examples = sum(len(t.examples) for t in tests)
    assert examples == prompts > 0, (
        f"{name}: {prompts} '>>>' prompts in the source, but doctest finds {examples} examples "
        "(a prompt outside a docstring doctest reads? write illustrative code as an "
        "'Example::' block without prompts)")
    report = io.StringIO()
    runner = doctest.DocTestRunner(verbose=False)
    for test in sorted(tests, key=lambda t: t.lineno or 0):
        runner.run(test, out=report.write)
    # Fewer tries than examples: some were skipped (# doctest: +SKIP), which checks nothing.
    assert runner.tries == examples, (
        f"{name}: {examples - runner.tries} of {examples} examples skipped; make them run, or "
        "write them as an 'Example::' block without prompts")
    assert runner.failures == 0, f"{runner.failures} of {examples} examples failed:\n" + \
        report.getvalue()
