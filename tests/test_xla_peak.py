"""benchmarks/xla_peak.py: the temporary allocation's fullest program point, read from a real
XLA dump (a jitted function compiled in a subprocess with ``--xla_dump_to``) and from values
made by hand."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers.scripts import load_benchmark

PROGRAM = """
import jax, jax.numpy as jnp
def chain(x):
    a = jnp.sin(x) @ x          # [256, 256] temporaries that die one after another
    b = jnp.cos(a) @ a
    return (jnp.tanh(b) @ b).sum()
jax.jit(chain).lower(jnp.ones((256, 256))).compile()
"""


def test_peak_by_hand():
    xp = load_benchmark("xla_peak")
    values = [xp.Value("a{}", "f32[4]", 0, 16, 0, 2), xp.Value("b{}", "f32[4]", 16, 16, 1, 3),
              xp.Value("c{}", "f32[4]", 0, 16, 3, 4)]   # c reuses a's place once a is dead
    peak = xp.find_peak(32, values)
    assert (peak.point, peak.live_bytes) == (1, 32)
    assert [v.name for v in peak.values] == ["a{}", "b{}"]


def test_peak_of_a_compiled_program(tmp_path, capsys):
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path}", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True, timeout=120)
    xp = load_benchmark("xla_peak")
    xp.main([str(tmp_path), "--module", "chain", "--min-kib", "128"])
    out = capsys.readouterr().out
    assert out.startswith("temporary allocation ")
    assert "f32[256,256]" in out                        # a 256 KiB temporary live at the peak
    unused = float(out.split("(")[1].split("%")[0])
    assert 0.0 <= unused < 50.0
