"""Smoke test of benchmarks/bench_plan.py: a two-layout run of the tiny GPT, each way of timing.

No ranking target here (two layouts, a few milliseconds a step); the figures live in
benchmarks/README.md.
"""

from __future__ import annotations

import math

import pytest

from helpers.scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_plan")


@pytest.mark.parametrize("sequential", [False, True], ids=["round-robin", "sequential"])
def test_two_layouts_are_planned_timed_and_ranked(bench, sequential):
    # h100-sxm: a shipped profile, so nothing is calibrated here.
    argv = ["--preset", "tiny", "--layers", "2", "--seq-len", "16", "--batch-size", "8",
            "--layouts", "2", "--steps", "3", "--warmup", "1", "--hardware", "h100-sxm"]
    report = bench.run(bench.parse_args(argv + (["--sequential"] if sequential else [])),
                       log=lambda *a: None)
    rows = report["rows"]
    assert len(rows) == 2 and rows[0]["layout"] != rows[1]["layout"]
    for row in rows:
        # One time per round (or step), all of them timed, the median reported.
        assert len(row["measured_wall_all_s"]) == 3
        assert all(t > 0 for t in row["measured_wall_all_s"])
        assert row["measured_wall_s"] == sorted(row["measured_wall_all_s"])[1]
        assert row["measured_cpu_s"] > 0 and row["predicted_s"] > 0
    for kind in ("wall", "cpu"):
        r = report[kind]
        assert math.isclose(abs(r["spearman"]), 1.0)   # two layouts: the same order or not
        assert r["top_pick"] == min(rows, key=lambda row: row["predicted_s"])["layout"]
        assert r["measured_best"] == min(rows, key=lambda row: row[f"measured_{kind}_s"])[
            "layout"]
        assert r["top_pick_over_best"] >= 0
