"""Smoke test of benchmarks/bench_strategies.py: it runs, its JSON is complete, its formulas hold.

No timing targets here (those live in the benchmark's printed ratios): one tiny mesh, one timed
step, and the analytic formulas against numbers worked out by hand.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from helpers.scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_strategies")


def test_model_flops_by_hand(bench):
    # tiny preset: 2 layers, d 64, 114688 matmul params; batch 8 x seq 32 = 256 tokens.
    f = bench.model_flops(layers=2, d_model=64, matmul_params=114688, batch=8, seq=32)
    assert f["matmul"] == 6 * 256 * 114688 == 176_160_768
    assert f["attention"] == 12 * 2 * 8 * 32 * 32 * 64 == 12_582_912
    assert f["total"] == 188_743_680


def test_collective_formulas_by_hand(bench):
    assert bench.ring_all_reduce(100, 4) == 150          # 2 * 3/4 * 100
    assert bench.ring_all_gather(100, 4) == 75           # 3/4 * 100
    assert bench.ring_all_reduce(100, 1) == 0
    assert bench.dp_gradient_bytes(4000, 8) == 7000       # 2 * 7/8 * 4000
    assert bench.zero3_bytes(4096, 4) == 9216             # 3 * 3/4 * 4096
    # 2 layers, 4 + 1 (remat) all-reduces each, + 2 for the embedding, of 16384 B over 2 devices.
    assert bench.megatron_tp_bytes(layers=2, activation_bytes=16384, n=2) == 10 * 16384
    assert bench.megatron_tp_bytes(layers=2, activation_bytes=16384, n=2,
                                   recompute_per_layer=1) == 12 * 16384

    got = bench.analytic_collectives(
        mesh_shape={"fsdp": 4, "tensor": 2}, zero_stage=3,
        params=[(4096, P("fsdp", "tensor"), P("fsdp", "tensor")),  # 2048 B per tensor rank
                (400, P(), P())],                                   # replicated: grads all-reduced
        layers=2, batch=8, seq=32, d_model=64)
    assert got["fsdp"]["min"] == 3 * 0.75 * 2048 + 2 * 0.75 * 400 == 5208
    # 2 gathers of 3/4 x 2048 B; reduce-scatter 3/4 x 2048 B + all-reduce 2 x 3/4 x 400 B.
    assert got["fsdp"]["kinds"] == {"gather": 3072, "reduce": 1536 + 600}
    # batch 8 over fsdp=4 -> 2 rows x 32 x 64 x 4 B = 16384 B per all-reduce, ring over 2.
    assert got["tensor"]["min"] == 10 * 16384
    assert got["tensor"]["remat"] == 12 * 16384
    dp = bench.analytic_collectives(mesh_shape={"data": 8}, zero_stage=3,
                                    params=[(4000, P(), P())], layers=2, batch=8, seq=32,
                                    d_model=64)
    assert dp["data"]["min"] == 7000


def test_hlo_dot_flops_weights_loop_trip_counts(bench):
    def f(x, ws):
        return jax.lax.scan(lambda c, w: (c @ w, None), x, ws)[0]

    compiled = jax.jit(f).lower(jnp.ones((16, 32)), jnp.ones((5, 32, 32))).compile()
    got = bench.hlo_dot_flops(compiled.as_text())
    assert got["flops"] == 5 * 2 * 16 * 32 * 32
    assert got["dots"] >= 1


def test_benchmark_runs_on_tiny(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--meshes", "fsdp=4,tensor=2", "--steps", "1",
                "--warmup", "0", "--batch-size", "8", "--seq-len", "32", "--peak-n", "128",
                "--remat", "full", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "(a) step time" in printed and "(c) collective traffic" in printed

    report = json.loads(out.read_text())
    assert set(report) == {"meta", "layouts"}
    assert report["meta"]["devices"] == 8
    (row,) = report["layouts"]
    assert row["mesh"] == "fsdp=4,tensor=2" and row["label"] == "ZeRO-3+TP"
    for key in ("compile_s", "memory_per_device", "step_time_s", "flops", "utilisation",
                "collectives", "config"):
        assert key in row, key

    st = row["step_time_s"]
    assert st["ratio"] > 0 and st["pair_ratio"]["median"] > 0
    assert len(st["meshpar"]["all"]) == len(st["baseline"]["all"]) == 1

    fl = row["flops"]
    assert fl["model_total"] == 188_743_680  # as worked out in test_model_flops_by_hand
    # Full remat recomputes the layers' forward: the compiled program does more than the model.
    assert 1.0 < fl["hlo_over_model"] < 1.5
    assert fl["cost_analysis_flops_per_device"] > 0
    ut = row["utilisation"]
    assert ut["peak_flops_per_s"] > 0 and 0 < ut["mfu"] and ut["hfu"] > ut["mfu"]
    # The dots-only program runs exactly the step's dots: the same FLOPs, on all 8 devices.
    assert ut["dots_only_flops"] == pytest.approx(fl["hlo_dot_flops_total"])
    assert ut["dots_only_kinds"] >= 4 and ut["dots_only_s"]["median"] > 0
    assert ut["mfu_ceiling"] > ut["mfu"] and 0 < ut["dots_only_over_step"] < 1
    assert ut["mfu_ceiling_best"] >= ut["mfu_ceiling"]
    assert "MFU ceiling" in printed

    per_axis = row["collectives"]["per_axis"]
    assert set(per_axis) == {"fsdp", "tensor"}
    for axis in ("fsdp", "tensor"):
        a = per_axis[axis]
        assert a["measured_bytes"] > 0 and a["analytic_min_bytes"] > 0
        assert math.isclose(a["ratio_min"], a["measured_bytes"] / a["analytic_min_bytes"])
        assert math.isclose(sum(k["measured_bytes"] for k in a["kinds"].values()),
                            a["measured_bytes"])
    assert per_axis["fsdp"]["kinds"]["gather"]["measured_bytes"] > 0
    # ZeRO-3 reduce-scatters its gradients (meshpar.parallel.zero): at or below the 3(N-1)/N minimum
    # (below: the embedding is gathered once, not per layer); Megatron at its remat-aware count.
    assert 0.9 < per_axis["fsdp"]["ratio_min"] <= 1.0
    assert per_axis["tensor"]["ratio_remat"] == pytest.approx(1.0, abs=0.01)
    assert per_axis["tensor"]["kinds"]["reduce"]["measured_by_kind"]["all-reduce"] > 0
    # Every measured byte comes with a kind and an axis.
    by_kind = row["collectives"]["meshpar"]["by_kind_axis"]
    assert math.isclose(sum(v["traffic_bytes_per_step"] for v in by_kind.values()),
                        row["collectives"]["meshpar"]["total_traffic_bytes"])
    mem = row["memory_per_device"]["meshpar"]
    assert mem["argument"] > 0 and mem["temp"] > 0
