"""The notebooks execute (nbclient, the ``python3`` kernel of this interpreter) and every
example's ``main`` runs with tiny sizes.

Notebook kernels get a clean environment with the test suite's persistent compilation cache, so
repeated runs compile little; each notebook emulates its own 8 CPU devices in its first cell.
The examples need the same 8 devices as this test session, so they run in-process; one also runs
as a script, in a subprocess, to check its ``__main__`` path.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from helpers.env import child_env

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXAMPLES = {
    "byo_nnx_model": ["--steps", "3", "--width", "32", "--batch-size", "32"],
    "linen_model": ["--hidden", "64", "--width", "32"],
    "gpt_3d": ["--steps", "2"],
    "pipelined_gpt": ["--steps", "2", "--compare"],
    "resume_on_another_mesh": ["--steps", "2"],
    # Sampling on the training mesh here: another mesh would compile its programs again.
    "own_data": ["--steps", "2", "--vocab-size", "300", "--sample-mesh", "data=4,tensor=2"],
}


def test_every_notebook_and_example_is_tested():
    assert [p.name for p in NOTEBOOKS] == [
        "01_sharding_rules.ipynb", "02_zero_stages.ipynb", "03_tensor_sequence_parallel.ipynb",
        "04_pipelines.ipynb"]
    assert sorted(p.stem for p in (REPO / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # Committed without outputs, and 8 devices are set before anything starts JAX's backend.
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), path
    assert "mp.emulate_devices(8)" in code[0].source
    client = NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=child_env())
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Linen's dataclass modules look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, tmp_path, capsys):
    source = (REPO / "examples" / f"{name}.py").read_text()
    # Run as a script, the file sets 8 devices before JAX starts (importing it does not).
    assert 'if __name__ == "__main__":\n    mp.emulate_devices(8)' in source
    argv = EXAMPLES[name] + (["--dir", str(tmp_path / "ckpt")] if name.startswith(("resume", "own")) else [])
    assert _load(name).main(argv) == 0, capsys.readouterr().out[-2000:]


def test_an_example_runs_as_a_script():
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "linen_model.py"), "--hidden", "64", "--width", "32"],
        env=child_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "after one SGD step" in proc.stdout
