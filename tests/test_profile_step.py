"""benchmarks/profile_step.py: ops are sorted into the right kinds, and a traced step adds up."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from helpers.scripts import load_benchmark


@pytest.fixture(scope="module")
def prof():
    return load_benchmark("profile_step")


def test_classify_instructions_of_a_small_program(prof):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P(None, "d")))
    w = jax.device_put(jnp.ones((32, 16)), NamedSharding(mesh, P("d", None)))

    def f(x, w):
        y = jnp.einsum("bd,df->bf", x, w, out_sharding=P())  # contracts over d: an all-reduce
        return jnp.tanh(y).T * 2.0, jnp.zeros((128, 128))

    with jax.set_mesh(mesh):
        table = prof.classify_instructions(jax.jit(f).lower(x, w).compile().as_text())
    kinds = {v["kind"] for v in table.values()}
    assert {"matmul", "collective"} <= kinds, table
    for name, info in table.items():
        if info["op"] in ("all-reduce", "all-reduce-start"):
            assert info["kind"] == "collective"
        if info["op"] == "dot":
            assert info["kind"] == "matmul"
        if info["op"] in ("broadcast", "copy", "transpose"):
            assert info["kind"] == "data movement", (name, info)


def test_summarize_trace_by_hand(prof):
    table = {
        "ynn_fusion.1": {"kind": "matmul", "op": "fusion", "shape": "f32[8,8]", "source": "a"},
        "add_fusion": {"kind": "elementwise/reduce", "op": "fusion", "shape": "f32[8]",
                       "source": "b"},
        "all-reduce.2": {"kind": "collective", "op": "all-reduce", "shape": "f32[8]",
                         "source": "c"},
    }
    events = [
        {"name": "ThunkExecutor::Execute", "dur": 1000},  # a container: not counted
        {"name": "ynn_fusion.1", "dur": 60}, {"name": "ynn_fusion.1", "dur": 20},
        {"name": "add_fusion", "dur": 5}, {"name": "all-reduce.2", "dur": 10},
        {"name": "Rendezvous", "dur": 5}, {"name": "other_program_op", "dur": 7},
    ]
    s = prof.summarize_trace(events, table, top=2)
    assert s["total_us"] == 100
    assert s["by_kind"]["matmul"] == {"us": 80, "share": 0.8}
    assert s["by_kind"]["collective wait"]["us"] == 5
    assert s["by_kind"]["data movement"]["us"] == 0
    assert s["unmatched_us"] == 7
    assert [(t["name"], t["count"]) for t in s["top"]] == [("ynn_fusion.1", 2), ("all-reduce.2", 1)]


def test_profile_a_tiny_zero3_tp_step(prof, tmp_path):
    out = tmp_path / "profile.json"
    result = prof.main(["--mesh", "fsdp=4,tensor=2", "--preset", "tiny", "--batch-size", "16",
                        "--seq-len", "32", "--warmup", "1", "--steps", "1", "--top", "5",
                        "--trace-dir", str(tmp_path / "trace"), "--json", str(out), "--baseline"])
    assert json.loads(out.read_text())["by_kind"] == result["by_kind"]
    shares = {k: v["share"] for k, v in result["by_kind"].items()}
    assert sum(shares.values()) == pytest.approx(1.0)
    # Every kind a ZeRO-3 + TP step has shows up: dots, fusions, gathers and their waits.
    for kind in ("matmul", "elementwise/reduce", "collective", "collective wait"):
        assert shares[kind] > 0, shares
    assert result["explicit_zero"] is True
    assert len(result["top"]) == 5
    # The hand-written step (GSPMD) is traced too, and its ops
    # are matched against its own program.
    base = result["baseline"]
    assert base["program"] == "hand-written jax.jit"
    assert sum(v["share"] for v in base["by_kind"].values()) == pytest.approx(1.0)
    assert base["by_kind"]["matmul"]["us"] > 0 and base["by_kind"]["collective"]["us"] > 0
    assert base["unmatched_us"] < 0.2 * base["total_us"]
    # Almost all op time is the step's own program (the batch placement is a few tiny ops).
    assert result["unmatched_us"] < 0.2 * result["total_us"]
