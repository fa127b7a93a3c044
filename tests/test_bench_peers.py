"""Smoke test of benchmarks/bench_peers.py: the command lines of both sides, the log parsers, and
one tiny meshpar-only run (the MaxText side skipped with its message; it takes minutes per run).

No timing targets here; the figures live in benchmarks/README.md.
"""

from __future__ import annotations

import json

import pytest

from helpers.scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_peers")


def test_sizes_match_the_gpt_presets(bench):
    from meshpar.models import get_preset

    for name, size in bench.SIZES.items():
        cfg = get_preset("20m" if name == "20m" else "small").replace(
            layers=size.layers, d_model=size.d_model, heads=size.heads, mlp_dim=size.mlp_dim,
            vocab_size=size.vocab, seq_len=size.seq, head_dim=None)
        assert size.matmul_params() == cfg.matmul_param_count(), name
    p = get_preset("20m")
    s = bench.SIZES["20m"]
    assert (s.layers, s.d_model, s.heads, s.mlp_dim, s.vocab, s.seq) == (
        p.layers, p.d_model, p.heads, p.mlp_dim, p.vocab_size, p.seq_len)
    # issue 13's model: 4 x 256, vocabulary 32000, batch 8 x 128 tokens
    small = bench.SIZES["small"]
    assert small.model_flops() == 6 * 8 * 128 * (4 * (4 * 256**2 + 2 * 256 * 1024) + 256 * 32000) \
        + 12 * 4 * 8 * 128**2 * 256


def test_command_lines(bench):
    size = bench.SIZES["small"]
    mt = bench.maxtext_args(size, "fsdp=4,tensor=2", steps=30, precision="bf16")
    assert {"ici_fsdp_parallelism=4", "ici_tensor_parallelism=2", "ici_data_parallelism=1",
            "ici_pipeline_parallelism=1", "dtype=bfloat16", "weight_dtype=float32",
            "per_device_batch_size=1", "vocab_size=32000", "base_num_decoder_layers=4",
            "logits_via_embedding=true", "remat_policy=full", "steps=30"} <= set(mt)
    mp = bench.meshpar_args(size, "fsdp=4,tensor=2", steps=30, precision="bf16",
                            metrics_file="/tmp/m.jsonl")
    assert mp[:1] == ["train"] and "--schedule" not in mp
    assert mp[mp.index("--mesh") + 1] == "fsdp=4,tensor=2"
    # the circular pipeline: one layer per stage and repeat on both sides
    mt = bench.maxtext_args(size, "pipe=2,fsdp=4", steps=30, precision="fp32")
    assert {"ici_pipeline_parallelism=2", "num_layers_per_pipeline_stage=1",
            "num_pipeline_microbatches=2", "dtype=float32"} <= set(mt)
    mp = bench.meshpar_args(size, "pipe=2,fsdp=4", steps=30, precision="fp32", metrics_file="m")
    assert mp[mp.index("--schedule") + 1] == "circular" and mp[mp.index("--repeats") + 1] == "2"


def test_parsers(bench, tmp_path):
    log = ("I1201 metric_logger.py:265] completed step: 5, seconds: 0.437, TFLOP/s/device: 0.004, "
           "Tokens/s/device: 46.7, total_weights: 1024, loss: 10.847, lm_loss: 10.847\n"
           "I1201 metric_logger.py:265] completed step: 6, seconds: 0.441, TFLOP/s/device: 0.004, "
           "Tokens/s/device: 46.7, total_weights: 1024, loss: 10.808, lm_loss: 10.808\n")
    times, losses = bench.parse_maxtext_log(log)
    assert times == {5: 0.437, 6: 0.441} and losses[6] == 10.808
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s, "step_time_s": 0.1 * s}) + "\n"
                            for s in range(4)))
    times, losses = bench.parse_meshpar_metrics(str(path))
    assert bench.median_from(times, 1) == pytest.approx(0.2) and losses[3] == 2.0


def test_tiny_run_meshpar_only(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEERS", str(tmp_path / "no_peers"))
    out = tmp_path / "peers.json"
    report = bench.main(["--sizes", "tiny", "--layouts", "fsdp=8", "--steps", "3",
                         "--first-step", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "MaxText side skipped: no MaxText venv at" in printed
    (row,) = report["rows"]
    assert row["maxtext_s"] is None and row["ratio"] is None
    assert row["meshpar_s"] > 0 and row["meshpar_gflops"] > 0
    assert set(row["pairs"][0]["meshpar"]["step_times"]) == {0, 1, 2}
    assert json.loads(out.read_text())["meta"]["maxtext"] is False
