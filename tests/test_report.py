"""The sharding report and ``meshpar inspect``: golden tables for the built-in GPT, JSON, totals."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

import meshpar as mp
from meshpar.cli import main as cli_main
from meshpar.models import GPT, get_preset
from meshpar.sharding.placement import abstract_nnx

GOLDEN = pathlib.Path(__file__).parent / "golden"
LAYOUTS = {
    # name: (mesh, strategy)
    "dp_data8": ("data=8", "dp"),
    "zero3_fsdp8": ("fsdp=8", "zero3"),
    "3d_data2_fsdp2_tensor2": ("data=2,fsdp=2,tensor=2", "auto"),
    "tp_sp_fsdp4_tensor2": ("fsdp=4,tensor=2", "tp_sp"),
}


def _plan(preset, mesh_text, strategy):
    cfg = get_preset(preset)
    mesh = mp.make_mesh(mesh_text)
    _, params, _ = abstract_nnx(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    strat = mp.get_strategy(strategy)
    return mp.plan_nnx_state(params, mesh=mesh, rules=strat.param_rules(mesh))[1]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_golden_sharding_table_of_the_builtin_gpt(name):
    mesh_text, strategy = LAYOUTS[name]
    plan = _plan("tiny", mesh_text, strategy)
    table = {e.path: [list(x) if isinstance(x, tuple) else x for x in e.spec] for e in plan.entries}
    path = GOLDEN / f"gpt_tiny_{name}.json"
    if os.environ.get("MESHPAR_UPDATE_GOLDEN"):
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    assert table == json.loads(path.read_text()), f"sharding of the GPT changed under {name}"


def test_fsdp8_on_the_20m_preset_is_within_one_percent_of_total_over_8(capsys):
    assert cli_main(["inspect", "--preset", "20m", "--mesh", "fsdp=8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    totals = data["totals"]
    assert 18e6 < data["totals"]["bytes"] / 4 < 21e6
    ratio = totals["bytes_per_device"] / (totals["bytes"] / 8)
    assert 1.0 <= ratio < 1.01, ratio
    assert data["fallbacks"] == []
    # What stays replicated is listed, and it is what accounts for the excess.
    replicated = {p["path"]: p for p in data["params"] if p["replicated"]}
    assert set(data["replicated"]) == set(replicated)
    excess = totals["bytes_per_device"] - totals["bytes"] / 8
    assert excess == pytest.approx(sum(p["bytes"] * 7 / 8 for p in replicated.values()))


def test_inspect_table_lists_every_parameter(capsys):
    assert cli_main(["inspect", "--preset", "tiny", "--mesh", "fsdp=4,tensor=2"]) == 0
    out = capsys.readouterr().out
    for path in ("tok_embed", "pos_embed", "blocks/wq", "blocks/w_out", "ln_f_scale"):
        assert path in out
    assert "P(None, 'fsdp', 'tensor')" in out
    assert "per device" in out and "fallbacks: none" in out


def test_inspect_reports_fallbacks_and_unannotated():
    # The built-in GPT needs none; a model with one of each kind of fallback lists every one.
    assert "fallbacks: none" in mp.format_plan(_plan("tiny", "data=2,fsdp=2,tensor=2", "auto"))

    class Odd(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((6, 8)), out_sharding=("embed", "mlp"))  # 6 % 8 != 0
            self.b = nnx.Param(jnp.zeros((8,)))                                   # no axes
            self.c = nnx.Param(jnp.zeros((8,)), out_sharding=("mystery",))        # no rule

    _, params, _ = abstract_nnx(Odd)
    rules = mp.Rules.table([("embed", "fsdp"), ("mlp", None)], on_indivisible="replicate")
    plan = mp.plan_nnx_state(params, mesh=mp.make_mesh(fsdp=8), rules=rules)[1]
    lines = mp.format_plan(plan).splitlines()
    listed = lines[lines.index("fallbacks: ") + 1:lines.index("fallbacks: ") + 4]
    assert listed == [
        "  - b: no logical axes and no path rule -> replicated",
        "  - c: logical axis 'mystery' (annotation) has no rule -> replicated; add a rule "
        "('mystery', <mesh axis>) or ('mystery', None)",
        "  - w: w (shape (6, 8)): dimension 0 ('embed', size 6) is not divisible by mesh axis "
        "'fsdp' of size 8 -> replicated",
    ]
    assert lines[-1] == ("logical names no rule maps (replicated; Rules(strict=True) makes them "
                         "errors): mystery (1 params)")


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--mesh", "data=3"], r"3 devices .* 8 devices are available"),
        (["--mesh", "data=2,data=4"], r"'data' is given twice"),
        (["--strategy", "zero9"], r"unknown strategy 'zero9'"),
        (["--strategy", "tp", "--mesh", "data=8"], r"needs a 'tensor' mesh axis"),
        (["--heads", "3", "--d-model", "48", "--mesh", "tensor=8"], r"dimension 2 \('heads', size 3\) is not divisible by mesh axis 'tensor' of size 8"),
    ],
)
def test_inspect_usage_errors_exit_2_with_one_message(argv, pattern):
    proc = subprocess.run(
        [sys.executable, "-m", "meshpar", "inspect", "--preset", "tiny", *argv],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    import re
    assert re.search(pattern, proc.stderr), proc.stderr
