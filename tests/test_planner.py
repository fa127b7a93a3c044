"""The planner (issue 15): hardware profiles, candidate enumeration, the compiled candidates'
figures, the analytic pre-filter against ``memory_analysis``, the JSON and command fields, and
every error it promises."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shlex

import jax
import jax.numpy as jnp
import pytest

import meshpar as mp
from helpers.zoo import ZOO
from meshpar.backend import bf16
from meshpar.cli import main as cli_main
from meshpar.cli.args import build_parser, mesh_and_strategy, model_config
from meshpar.errors import PlanError, ProfileError
from meshpar.inspect import hlo
from meshpar.inspect.costs import gpt_train_flops
from meshpar.models import get_preset
from meshpar.parallel.schedule import PipelineConfig, Schedule
from meshpar.planner import Layout, enumerate_layouts, format_plan_result, load_profile, plan_gpt
from meshpar.planner import hardware
from meshpar.planner.cost import Collective, pipeline_permutes, step_time
from meshpar.planner.layout import Dims
from meshpar.planner.search import PREFILTER_SLACK

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_shipped_profiles_parse_and_name_their_sources():
    assert set(hardware.NAMES) == {"cpu", "a100-80g", "h100-sxm", "tpu-v5e", "tpu-v5p"}
    for name in hardware.NAMES[1:]:
        p = load_profile(name)
        text = (hardware.PROFILE_DIR / f"{name}.toml").read_text()
        assert p.name == name and p.source and "Source" in text, name
        assert p.peak_flops["bf16"] > p.peak_flops["fp32"] > 0 and p.memory_bytes > 2**33
        # The file round-trips through the dataclass's own TOML.
        again = dataclasses.asdict(hardware.parse_profile(p.to_toml()))
        assert again.pop("peak_flops") == pytest.approx(p.peak_flops)
        assert again == pytest.approx({k: v for k, v in dataclasses.asdict(p).items()
                                       if k != "peak_flops"})
    assert load_profile("h100-sxm").peak_flops["bf16"] == 989e12
    # Shipped as package data: a wheel without the TOML files would know no hardware.
    assert '"planner/profiles/*.toml"' in (ROOT / "pyproject.toml").read_text()


def test_a_profile_names_the_bf16_matmuls_its_programs_are_traced_with(monkeypatch):
    # A GPU's or TPU's programs use bf16 dots whatever this host's CPU has; the calibrated CPU
    # profile (shared cores: this machine's emulated devices) the host's own form.
    monkeypatch.setenv(bf16.ENV, "fp32")
    for name in ("a100-80g", "h100-sxm", "tpu-v5e", "tpu-v5p"):
        assert load_profile(name).bf16_dots is bf16.BF16Dots.NATIVE, name
    host = dataclasses.replace(load_profile("h100-sxm"), shared_cores=True)
    assert host.bf16_dots is bf16.BF16Dots.FP32
    monkeypatch.setenv(bf16.ENV, "native")
    assert host.bf16_dots is bf16.BF16Dots.NATIVE


def test_malformed_and_unknown_profiles_name_the_key_the_value_and_the_choices(tmp_path):
    good = (hardware.PROFILE_DIR / "a100-80g.toml").read_text()
    cases = {
        "memory_gib = 80.0": ("memory_gib = -3", r"'memory_gib' = -3 must be a positive number"),
        "overlap = 1.0": ("overlap = 2", r"'overlap' = 2 must be a number in \[0, 1\]"),
        "devices_per_node = 8": ("devices_per_node = 8.5", r"'devices_per_node' = 8.5 must be a "
                                 "positive integer"),
        "bf16 = 312.0": ("bf16 = \"fast\"", r"\[peak_tflops\]: key 'bf16' = 'fast'"),
        "[inter_node]": ("[inter_nodes]", r"unknown key\(s\) \['inter_nodes'\]"),
        "hbm_gb_s = 2039.0": ("hbm_gb_s = 2039.0\nshared_cores = 1",
                              r"'shared_cores' = 1 must be true or false"),
    }
    for old, (new, message) in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(good.replace(old, new))
        with pytest.raises(ProfileError, match=message):
            load_profile(str(path))
    (tmp_path / "broken.toml").write_text("memory_gib = = 3")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(str(tmp_path / "broken.toml"))
    with pytest.raises(ProfileError, match="unknown hardware 'h200'; valid: cpu, a100-80g, "
                                           "h100-sxm, tpu-v5e, tpu-v5p or a FILE.toml"):
        load_profile("h200")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(str(tmp_path / "missing.toml"))


def test_cpu_profile_is_calibrated_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPAR_CACHE_DIR", str(tmp_path))
    calls = []
    real = hardware.calibrate_cpu
    monkeypatch.setattr(hardware, "calibrate_cpu",
                        lambda: calls.append(1) or real(matmul=128, collective_mib=1, reps=2))
    first = load_profile("cpu")
    dots = bf16.bf16_dots().value   # the bf16 peak is timed in the form the GPT will use
    assert (tmp_path / "hardware" / f"cpu-8-{dots}-v3.toml").is_file() and calls == [1]
    assert first.peak_flops["fp32"] > 1e8 and first.intra_bandwidth > 1e6 and first.overlap == 0
    # The memory-bound rates are measured (v3), not the placeholder of v2 (hbm 10 GB/s).
    assert first.matmul_bandwidth > 1e6 and first.hbm_bandwidth > 1e6
    assert first.hbm_bandwidth != 1e10 and first.intra_latency < 0.1
    assert first.shared_cores  # emulated devices: a pipeline bubble lends its cores to the rest
    assert load_profile("cpu") == first and calls == [1]  # the cache, not a second calibration
    load_profile("cpu", recalibrate=True)
    assert calls == [1, 1]


def test_enumeration_keeps_tensor_in_a_node_and_says_why_a_factorisation_is_out():
    layouts, rejected = enumerate_layouts(8, batch_size=16, dims=Dims(layers=2, heads=4,
                                                                      mlp_dim=256),
                                          devices_per_node=2, remats=("full",))
    assert layouts and all(lay.devices == 8 and lay.tensor <= 2 for lay in layouts)
    assert all(2 % lay.pipe == 0 for lay in layouts)
    assert {lay.zero_stage for lay in layouts if lay.fsdp == 1} == {0}
    assert {lay.zero_stage for lay in layouts if lay.fsdp > 1} == {1, 2, 3}
    assert any(lay.pipe == 2 and lay.microbatches in (2, 4, 8) for lay in layouts)
    assert "tensor=4 spans more than a node (2 devices)" in "\n".join(rejected)
    assert "layers=2 is not divisible by pipe=4" in "\n".join(rejected)
    with pytest.raises(PlanError, match=r"no factorisation of 8 devices.*heads=3 is not divisible"
                                        r" by tensor=8.*batch 4 is not divisible by data x fsdp = 8"):
        plan_gpt(get_preset("tiny").replace(heads=3, head_dim=None, d_model=63, mlp_dim=63,
                                            layers=1),
                 batch_size=4, devices=8, hardware="h100-sxm", progress=False)


def test_enumeration_offers_the_1f1b_schedules_only_where_they_run_and_their_commands_parse():
    layouts, rejected = enumerate_layouts(8, batch_size=48, dims=Dims(layers=8, heads=4),
                                          pipe_microbatches=(2, 4, 6, 8))
    piped = {(lay.pipe, lay.microbatches, lay.schedule, lay.repeats) for lay in layouts
             if lay.pipe > 1}
    S = Schedule
    # Valid: 1F1B with M >= P, interleaved 1F1B with M a multiple of P and 8 layers in P x 2.
    assert {(4, 4, S.ONE_F_ONE_B, 1), (4, 6, S.ONE_F_ONE_B, 1), (8, 8, S.ONE_F_ONE_B, 1),
            (4, 4, S.INTERLEAVED_1F1B, 2), (4, 8, S.INTERLEAVED_1F1B, 2),
            (2, 6, S.INTERLEAVED_1F1B, 2), (4, 2, S.GPIPE, 1)} <= piped
    # Invalid: M < P for 1F1B, M = 6 not a multiple of P = 4, 8 layers not in 8 x 2 chunks.
    assert not piped & {(4, 2, S.ONE_F_ONE_B, 1), (8, 4, S.ONE_F_ONE_B, 1),
                        (4, 2, S.INTERLEAVED_1F1B, 2), (4, 6, S.INTERLEAVED_1F1B, 2),
                        (8, 8, S.INTERLEAVED_1F1B, 2)}
    for lay in layouts:
        assert isinstance(lay.schedule, Schedule)
        if lay.schedule.one_f_one_b:
            assert lay.microbatches >= lay.pipe > 1
        if lay.schedule is S.INTERLEAVED_1F1B:
            assert lay.microbatches % lay.pipe == 0 and 8 % (lay.pipe * lay.repeats) == 0
    text = "\n".join(rejected)
    assert ("pipe=4,data=2,fsdp=1,tensor=1, M=6: interleaved-1f1b x2: schedule='interleaved-1f1b'"
            " runs microbatches in groups of stages=4") in text
    assert "pipe=4,data=2,fsdp=1,tensor=1, M=2: circular x2: " in text
    assert "1f1b x1: schedule='1f1b' needs microbatches >= stages" in text
    assert ("pipe=8,data=1,fsdp=1,tensor=1: circular x2, interleaved-1f1b x2 left out: layers=8"
            in text)
    # A Layout is one meshpar train runs: it refuses what the pipeline or the CLI would.
    with pytest.raises(PlanError, match=r"pipe=4: .*'1f1b' needs microbatches >= stages"):
        Layout(pipe=4, microbatches=2, schedule="1f1b")
    with pytest.raises(PlanError, match="need a pipe axis of size > 1"):
        Layout(data=8, schedule=S.ONE_F_ONE_B)
    with pytest.raises(PlanError, match=r"Layout.schedule='zb-h1'; expected one of"):
        Layout(pipe=2, microbatches=2, schedule="zb-h1")
    # The command line parses back to the same pipeline, the CLI accepts it, and the Trainer
    # code builds the same TrainConfig.
    for want in ((4, 6, S.ONE_F_ONE_B, 1), (4, 8, S.INTERLEAVED_1F1B, 2)):
        lay = next(x for x in layouts
                   if (x.pipe, x.microbatches, x.schedule, x.repeats) == want)
        args = build_parser().parse_args(
            shlex.split(lay.command(["--preset", "tiny"], batch_size=48))[1:])
        assert (args.mesh, args.schedule, args.repeats, args.microbatches, args.batch_size) == (
            lay.mesh_text, want[2].value, want[3], want[1], 48)
        mesh, _ = mesh_and_strategy(args)
        assert dict(mesh.shape) == lay.mesh_shape
        config = mp.TrainConfig(microbatches=args.microbatches, precision=args.precision,
                                schedule=args.schedule, repeats=args.repeats)
        assert config == lay.train_config()
        code = lay.trainer_code()
        assert eval(code.split("config=", 1)[1][:-1], {"mp": mp}) == config
        assert lay.label.split()[-2] == (want[2].value if want[3] == 1
                                         else f"{want[2].value}x{want[3]}")
    # The ZeRO stage a layout names is the one that runs, on a pipelined mesh too: the command
    # line, the Trainer code and Layout.strategy (auto alone lowers ZeRO-2/3 to ZeRO-1 there,
    # and the planner's ZeRO-2/3 pipelines compiled as ZeRO-1 programs until 2026-12-03).
    staged = [x for x in layouts if x.pipe > 1 and x.zero_stage >= 2]
    assert {x.zero_stage for x in staged} == {2, 3}
    for lay in staged:
        args = build_parser().parse_args(
            shlex.split(lay.command(["--preset", "tiny"], batch_size=48))[1:])
        mesh, strategy = mesh_and_strategy(args)
        code = lay.trainer_code().split("strategy=", 1)[1].split(", config=")[0]
        for runs in (strategy, lay.strategy(), eval(code, {"mp": mp})):
            assert runs.for_mesh(mesh).zero_stage == lay.zero_stage, (lay.label, runs)


def test_1f1b_layouts_are_costed_with_their_forwards_bubble_and_permutes():
    """Nothing compiled: the analytic costing of gpipe, 1f1b and interleaved-1f1b layouts."""
    cfg = get_preset("tiny").replace(layers=4)
    layouts = [Layout(pipe=2, data=4, microbatches=2, remat="full"),
               Layout(pipe=2, data=4, microbatches=2, schedule="1f1b", remat="full"),
               Layout(pipe=2, data=4, microbatches=2, schedule="interleaved-1f1b", repeats=2,
                      remat="full")]
    h100 = load_profile("h100-sxm")
    result = plan_gpt(cfg, batch_size=16, devices=8, hardware=h100, layouts=layouts,
                      compile_top=0, progress=False)
    by = {c.layout: c for c in result.candidates}
    assert set(by) == set(layouts)
    piped = gpt_train_flops(cfg, batch_size=16, seq_len=32, pipelined=True)
    stack = piped - gpt_train_flops(cfg, batch_size=16, seq_len=32)
    assert stack > 0
    for lay in layouts:
        t = by[lay].time
        # The stack's forward twice under every schedule: GPipe's stage remat recomputes it,
        # 1F1B (pipeline_remat off, the default the planner's commands run) reruns it in its
        # forward ticks, whose residuals its backward ticks apply.
        assert t.compute == pytest.approx(piped / 8 / h100.peak("fp32"))
        f = PipelineConfig(stages=2, microbatches=2, schedule=lay.schedule,
                           repeats=lay.repeats).bubble_fraction
        assert 0 < f < 1 and t.bubble == pytest.approx(t.compute * f / (1 - f))
        permutes = pipeline_permutes(stages=2, microbatches=2, schedule=lay.schedule,
                                     repeats=lay.repeats, activation_bytes=4 * 32 * 64 * 4)
        bandwidth, latency = h100.link(2)
        assert t.comm_per_axis["pipe"] == pytest.approx(
            permutes.traffic / bandwidth + permutes.executions * latency)
    # 1F1B's backward loop: two permutes per tick, more than GPipe's autodiff loop.
    assert by[layouts[1]].time.comm_per_axis["pipe"] > by[layouts[0]].time.comm_per_axis["pipe"]
    rows = {r["schedule"]: r for r in json.loads(result.to_json())}
    assert set(rows) == {"gpipe", "1f1b", "interleaved-1f1b"}
    assert "--schedule interleaved-1f1b --repeats 2" in rows["interleaved-1f1b"]["command"]
    assert type(by[layouts[1]].as_dict()["schedule"]) is str
    # Devices that share their cores (emulated CPU devices): the bubble costs no time.
    shared = dataclasses.replace(h100, shared_cores=True)
    again = plan_gpt(cfg, batch_size=16, devices=8, hardware=shared, layouts=layouts[1:2],
                     compile_top=0, progress=False)
    assert again.candidates[0].time.bubble == 0


def test_cpu_time_model_charges_narrow_matmuls_memory_traffic_and_every_collective():
    """No timing: the memory-bound terms of a profile with ``matmul_bandwidth`` (the calibrated
    cpu profile's form), against the accelerator profiles, which keep FLOPs over the peak."""
    h100 = load_profile("h100-sxm")
    cpu = dataclasses.replace(
        h100, name="cpu-like", peak_flops={"fp32": 20e9, "bf16": 60e9}, hbm_bandwidth=1.5e9,
        matmul_bandwidth=1.2e9, intra_bandwidth=1e9, inter_bandwidth=1e9, intra_latency=1e-4,
        inter_latency=1e-4, overlap=0.0, shared_cores=True)

    def efficiency(m, k, n):
        flops, nbytes = 2.0 * m * k * n, 4.0 * (m * k + k * n + m * n)
        return flops / cpu.peak("fp32") / cpu.compute_seconds(flops, "fp32", matmul_bytes=nbytes)

    # The curve: near the peak for big matmuls, far below it for narrow per-device ones, and
    # monotone in each dimension.
    assert efficiency(2048, 2048, 2048) > 0.9 > efficiency(512, 512, 512)
    assert efficiency(512, 512, 512) > efficiency(512, 64, 512) > efficiency(1024, 32, 512) < 0.5
    for small, big in ((64, 128), (128, 512), (512, 2048)):
        assert efficiency(small, 512, 512) < efficiency(big, 512, 512)
        assert efficiency(512, small, 512) < efficiency(512, big, 512)
    assert cpu.compute_seconds(0.0, "fp32", memory_bytes=3e9) == pytest.approx(2.0)
    # The calibration's fit recovers the two rates from times that follow the model.
    shapes = [(512, 512, 512), (1024, 32, 512), (512, 64, 512), (64, 512, 512), (128, 512, 128)]
    rows = [(2.0 * m * k * n, 4.0 * (m * k + k * n + m * n)) for m, k, n in shapes]
    inv_peak, inv_bandwidth = hardware._fit_matmul([(f, b, f / 20e9 + b / 1.2e9) for f, b in rows])
    assert (1 / inv_peak, 1 / inv_bandwidth) == (pytest.approx(20e9), pytest.approx(1.2e9))
    # Accelerator profiles: the bytes change nothing.
    assert h100.compute_seconds(1e12, "bf16", matmul_bytes=1e12, memory_bytes=1e12) == \
        pytest.approx(1e12 / 989e12)
    # The profile's TOML carries the key (and a file without it has none).
    assert hardware.parse_profile(cpu.to_toml()).matmul_bandwidth == pytest.approx(1.2e9)
    assert h100.matmul_bandwidth is None and "matmul_gb_s" not in h100.to_toml()

    def step(collectives, **bytes_):
        return step_time(flops_per_device=1e9, collectives=collectives,
                         mesh_shape={"fsdp": 4, "tensor": 2}, hardware=cpu, precision="fp32",
                         **bytes_)

    # The same bytes in many collectives cost more than in few (each is a rendezvous of every
    # device thread on emulated devices), and memory-bound bytes add compute time.
    few = step([Collective("all-gather", ("fsdp",), 1e8, 4)])
    many = step([Collective("all-gather", ("fsdp",), 1e8, 200)])
    assert many.step - few.step == pytest.approx(196 * 1e-4)
    assert step([], matmul_bytes=1.2e9).compute == pytest.approx(1e9 / 20e9 + 1.0)
    assert step([], memory_bytes=1.5e9).compute == pytest.approx(1e9 / 20e9 + 1.0)


def test_memory_traffic_is_trip_weighted_slices_what_a_fusion_slices_and_leaves_out_matmuls():
    x, ws = jnp.ones((256, 256)), jnp.ones((8, 256, 256))
    tile = 256 * 256 * 4
    elementwise = jax.jit(lambda x, ws: jax.lax.scan(lambda c, w: (jnp.tanh(c * w), None), x,
                                                     ws)[0])
    got = hlo.memory_traffic(elementwise.lower(x, ws).compile().as_text())
    # 8 iterations, each reading the carry and one slice of the stack and writing the carry:
    # the whole stack per iteration would be 8x more.
    assert 8 * 3 * tile <= got["in_loops"] <= got["total"] < 1.5 * 8 * 3 * tile
    matmuls = jax.jit(lambda x, ws: jax.lax.scan(lambda c, w: (c @ w, None), x, ws)[0])
    text = matmuls.lower(x, ws).compile().as_text()
    counted = hlo.dot_flops(text)
    assert counted["bytes"] == 8 * 3 * tile and counted["total"] == 8 * 2 * 256**3
    # Left besides the matmuls: per iteration a slice of the stack and a copy of the carry (2
    # tiles each, read and written), not the matmul's own 3 tiles.
    assert 8 * 4 * tile <= hlo.memory_traffic(text)["total"] < 8 * 5 * tile


def test_compiled_candidates_read_memory_analysis_and_the_prefilter_stays_within_its_slack():
    """Two layouts of the tiny GPT compiled from abstract state: the candidate's memory is the
    compiled program's, the formula stays within the pre-filter's slack of it (so the pre-filter
    does not reject a layout that fits), communication is costed per mesh axis, and the command
    line and JSON describe the same layout."""
    layouts = [Layout(data=2, fsdp=2, tensor=2, zero_stage=3, remat="full"),
               Layout(data=8, remat="none", precision="bf16")]
    result = plan_gpt(get_preset("tiny"), batch_size=16, devices=8, hardware="h100-sxm",
                      layouts=layouts, compile_top=2, model_args=["--preset", "tiny"],
                      progress=False)
    assert [c.source for c in result.candidates] == ["compiled", "compiled"]
    for c in result.candidates:
        assert c.memory == c.memory_compiled and c.fits
        # The pre-filter rejects only what it puts more than PREFILTER_SLACK over the budget:
        # a budget equal to the compiled bytes must not make it reject the layout.
        assert 0.4 * c.memory_compiled < c.memory_analytic
        assert c.memory_prefilter <= PREFILTER_SLACK * c.memory_compiled, c.layout.label
        t = c.time
        assert t.step == pytest.approx(t.compute + t.exposed + t.bubble) and 0 < t.mfu < 1
        args = build_parser().parse_args(shlex.split(c.command)[1:])
        assert (args.mesh, args.zero, args.precision, args.remat, args.batch_size) == (
            c.layout.mesh_text, c.layout.zero_stage, c.layout.precision, c.layout.remat, 16)
        assert (args.schedule, args.repeats, args.microbatches) == (
            c.layout.schedule.value, c.layout.repeats, c.layout.microbatches)
        assert model_config(args).replace(remat="full") == get_preset("tiny")
    three_d = next(c for c in result.candidates if c.layout.tensor == 2)
    assert {"data", "fsdp", "tensor"} <= set(three_d.time.comm_per_axis)
    rows = json.loads(result.to_json())
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    assert rows[0]["command"] == result.best.command and "mp.Trainer(" in rows[0]["trainer"]
    text = format_plan_result(result)
    assert "top pick: " + result.best.layout.label in text and result.best.command in text


def test_formula_memory_is_close_to_memory_analysis():
    """The pre-filter's per-device memory against the compiled step's ``memory_analysis`` for
    diverse tiny-GPT layouts, each within 10%: remat none in bf16 (every layer's residuals, the
    bf16 weights; with microbatches the weights the layer scan saves in float32: 0.89x
    without), ZeRO-2 over fsdp (the whole local gradient before its reduce-scatter), a
    pipeline with ZeRO-1 and microbatches (loop carry, activation slots), a pipeline with remat
    full and ZeRO-2 (1.24x under the formula that counted a whole-gradient accumulator and the
    head beside the stage's recompute; 1.11x while it counted a copy of the stage's weights,
    which one layer a stage does not hold), ZeRO-2 with tensor=4 at 8 rows (0.86x without the
    gradients GSPMD gathers over tensor before reducing them over fsdp); two bf16 1F1B
    pipelines (0.83x without the backward loop's boundary blocks and channel messages; remat
    none 0.78x without the float32 read of the residual slot); and at two layers a stage (four
    layers), a bf16 GPipe and a bf16 1F1B pipeline (0.86x and 0.82x without the float32 copies
    of the stage inputs and weights the layer scan runs on), a ZeRO-3 one and an fp32 1F1B
    remat-none one (0.81x without the two residual sets its backward loop slices out), two
    bf16 GPipe remat-none ones (0.82x without the slices of a layer's residuals beside the
    chunk's stacks; ZeRO-3, 0.83x counting the stage's shards where the recompute returns the
    gathered layers); a ZeRO-3 pipeline with 1-row microbatches (1.19x, above the pre-filter's
    slack, while the formula counted a layer's gathered weights and its whole gradient
    together; the ZeRO-3 pipelines ran ZeRO-1 programs until 2026-12-03); tensor parallel at
    4096 tokens a device, fp32 and bf16; and remat none with tensor=4 (0.84x without the
    backward loop's slices of a layer's residuals); two bf16 1F1B pipelines whose peak is the
    head's (0.885x counting the logits but not the final LayerNorm's backward, five [T, D]
    buffers where the vocabulary split over tensor=4 is as narrow as D; 1.108x counting the
    stack's gradient, which a pipeline's head phase does not hold yet); an fp32 1F1B
    remat-none pipeline of the small preset at 2048 tokens a microbatch; two bf16 ZeRO-3
    layouts with microbatches (0.89x counting the layer's gathered float32 weights and its
    gradient, not the accumulation loop's float32 copies and the gradient assembled twice). A
    budget equal to each compiled figure must not make the pre-filter reject the layout."""
    layouts = [Layout(data=8, remat="none", precision="bf16"),
               Layout(data=2, fsdp=4, zero_stage=2, remat="none", precision="bf16"),
               Layout(fsdp=4, tensor=2, zero_stage=1, microbatches=2, remat="none",
                      precision="bf16"),
               Layout(pipe=2, data=2, fsdp=2, zero_stage=1, microbatches=2, remat="none"),
               Layout(pipe=2, data=2, fsdp=2, zero_stage=2, microbatches=4, remat="full"),
               Layout(fsdp=2, tensor=4, zero_stage=2, microbatches=4, remat="full"),
               Layout(pipe=2, tensor=4, microbatches=4, schedule="1f1b", remat="full",
                      precision="bf16"),
               Layout(pipe=2, fsdp=4, zero_stage=1, microbatches=2, schedule="1f1b",
                      remat="none", precision="bf16"),
               Layout(pipe=2, fsdp=4, zero_stage=3, microbatches=4, remat="full"),
               Layout(fsdp=2, tensor=4, zero_stage=3, remat="none"),
               Layout(pipe=2, tensor=4, microbatches=8, schedule="1f1b", remat="full",
                      precision="bf16"),
               Layout(pipe=2, fsdp=2, tensor=2, zero_stage=2, microbatches=8, schedule="1f1b",
                      remat="full", precision="bf16"),
               Layout(fsdp=8, zero_stage=3, microbatches=2, remat="full", precision="bf16"),
               Layout(data=2, fsdp=4, zero_stage=3, microbatches=2, remat="full",
                      precision="bf16")]
    result = plan_gpt(get_preset("tiny"), batch_size=16, devices=8, hardware="h100-sxm",
                      layouts=layouts, compile_top=len(layouts), progress=False)
    assert len(result.candidates) == len(layouts)
    deeper = [Layout(pipe=2, fsdp=4, zero_stage=1, microbatches=2, remat="full", precision="bf16"),
              Layout(pipe=2, fsdp=4, zero_stage=1, microbatches=2, schedule="1f1b", remat="full",
                     precision="bf16"),
              Layout(pipe=2, data=2, fsdp=2, zero_stage=3, microbatches=2, remat="full"),
              Layout(pipe=2, data=4, microbatches=4, schedule="1f1b", remat="none"),
              Layout(pipe=2, tensor=4, remat="none", precision="bf16"),
              Layout(pipe=2, fsdp=4, zero_stage=3, microbatches=2, remat="none",
                     precision="bf16")]
    four = plan_gpt(get_preset("tiny", layers=4), batch_size=16, devices=8, hardware="h100-sxm",
                    layouts=deeper, compile_top=len(deeper), progress=False)
    assert len(four.candidates) == len(deeper)
    # 4096 tokens a microbatch, where XLA:CPU's LayerNorm backward holds three [T, D] buffers
    # more (0.85x in fp32, 0.69x in bf16 under the one-phase count of one layer's working set).
    wide = [Layout(data=2, tensor=4, remat="full"),
            Layout(data=2, tensor=4, remat="full", precision="bf16")]
    tokens = plan_gpt(get_preset("tiny"), batch_size=256, devices=8, hardware="h100-sxm",
                      layouts=wide, compile_top=len(wide), progress=False)
    assert len(tokens.candidates) == len(wide)
    # A float32 1F1B tick of two layers a chunk at 2048 tokens a microbatch, whose vjp holds
    # the chunk's weights twice, not its layers' residuals (1.107x counting those).
    ticks = plan_gpt(get_preset("small", seq_len=512), batch_size=16, devices=8,
                     hardware="h100-sxm", compile_top=1, progress=False,
                     layouts=[Layout(pipe=2, fsdp=2, tensor=2, zero_stage=3, microbatches=2,
                                     schedule="1f1b", remat="none")])
    assert len(ticks.candidates) == 1
    for c in [*result.candidates, *four.candidates, *tokens.candidates, *ticks.candidates]:
        assert c.source == "compiled"
        ratio = c.memory_analytic / c.memory_compiled
        assert 0.9 <= ratio <= 1.1, (c.layout.label, ratio)
        assert c.memory_prefilter <= PREFILTER_SLACK * c.memory_compiled, c.layout.label
    # End to end: with the budget at its compiled bytes the pipeline is compiled, not left out.
    piped = next(c for c in result.candidates if c.layout == layouts[4])
    again = plan_gpt(get_preset("tiny"), batch_size=16, devices=8, hardware="h100-sxm",
                     layouts=[layouts[4]], compile_top=1, memory_budget=piped.memory_compiled,
                     progress=False)
    assert again.candidates[0].source == "compiled" and again.candidates[0].fits


def test_nothing_fits_states_the_least_memory_and_what_would_fit(capsys, tmp_path):
    # 4 of the 8 devices: fewer factorisations to place (nothing here compiles).
    result = plan_gpt(get_preset("tiny"), batch_size=16, devices=4, hardware="a100-80g",
                      memory_budget=2**16, compile_top=0, remats=("full",),
                      precisions=("fp32",), progress=False)
    assert result.candidates and not result.fitting
    least = min(c.memory for c in result.candidates)
    with pytest.raises(PlanError, match=rf"no candidate fits a100-80g's 0.1 MiB per device: the "
                                        rf"least memory found is {least / 2**20:.1f} MiB .*over "
                                        r"by .* What would fit: about \d+ devices"):
        result.best
    # The command: exit status 2 and the same message; --json lists candidates best first.
    assert cli_main(["plan", "--preset", "tiny", "--batch-size", "16", "--hardware", "a100-80g",
                     "--devices", "4", "--memory-mib", "0.0625", "--compile-top", "0", "--no-progress"]) == 2
    assert "least memory found" in capsys.readouterr().err
    assert cli_main(["plan", "--preset", "tiny", "--batch-size", "16", "--hardware", "tpu-v5e",
                     "--devices", "4", "--compile-top", "0", "--no-progress", "--json", "--remat", "full",
                     "--precision", "bf16", "--plot", str(tmp_path / "plan.png")]) == 0
    rows = json.loads(capsys.readouterr().out)
    # The PNG has a point per candidate and the Pareto front in red: not a blank figure.
    import matplotlib.image

    pixels = matplotlib.image.imread(tmp_path / "plan.png")[..., :3]
    assert (pixels.min(-1) < 0.9).mean() > 0.02
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
    assert red.sum() > 50
    assert len(rows) > 5 and all(r["fits"] and r["source"] == "analytic" for r in rows)
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    assert all(r["command"].startswith("meshpar train --preset tiny --seq-len 32 --mesh ")
               for r in rows)


def test_plan_any_model_compiles_its_best_layout():
    """Without the model's FLOPs an uncompiled candidate's figures are lower bounds and may rank
    above the compiled ones: while one ranks first, it is compiled too (up to compile_top
    more), so the top pick is a compiled layout."""
    zoo = ZOO["encoder"]
    result = mp.plan(zoo.make, zoo.loss, batch=zoo.batch(0), hardware="h100-sxm",
                     compile_top=1, layouts=[Layout(data=8), Layout(fsdp=8, zero_stage=3)],
                     progress=False)
    compiled = [c for c in result.candidates if c.source == "compiled"]
    assert len(compiled) == 2 and result.best.source == "compiled"
    for c in compiled:
        assert c.memory_compiled > 0 and c.time.compute > 0 and c.command is None
    assert len(result.candidates) == 2


def test_plan_any_model_prunes_uncompiled_layouts_by_a_lower_bound():
    """A model of your own has no formulas: before compiling, a layout costs the collectives
    its parameters fix (a lower bound), and once candidates are compiled, their least FLOPs per
    device besides. A layout whose bound is above the best compiled step is ranked below it
    without a compile; the rest are compiled while they rank first. Before, an uncompiled
    layout cost nothing, outranked every compiled one, and the top pick stayed uncompiled."""
    zoo = ZOO["encoder"]
    layouts = [Layout(data=8), Layout(fsdp=8, zero_stage=3), Layout(data=4, fsdp=2, zero_stage=1),
               Layout(data=2, fsdp=4, zero_stage=2), Layout(fsdp=8, zero_stage=1),
               Layout(fsdp=8, zero_stage=2), Layout(data=2, fsdp=4, zero_stage=3)]
    result = mp.plan(zoo.make, zoo.loss, batch=zoo.batch(0), hardware="h100-sxm",
                     compile_top=2, layouts=layouts, progress=False)
    compiled = [c for c in result.candidates if c.source == "compiled"]
    uncompiled = [c for c in result.candidates if c.source == "analytic"]
    assert result.best.source == "compiled" and len(result.candidates) == len(layouts)
    assert uncompiled and all(c.time.step >= result.best.time.step for c in uncompiled)
    assert all(c.time.compute > 0 and c.time.comm_per_axis for c in uncompiled)
    assert len(compiled) <= 4


def test_uncompiled_candidates_are_scaled_to_the_compiled_ones_and_the_top_pick_is_compiled():
    """A profile whose compiled time counts more than the formulas do (the cpu profile's memory
    traffic; here slow matmul and memory bandwidths): the analytic compute is scaled by the
    least compiled/analytic ratio, so no uncompiled candidate outranks the compiled ones by
    the terms only a compile shows, and the top pick is compiled."""
    slow = dataclasses.replace(load_profile("h100-sxm"), matmul_bandwidth=1e9, hbm_bandwidth=1e9)
    layouts = [Layout(data=8, remat="full"), Layout(fsdp=8, zero_stage=3, remat="full"),
               Layout(data=4, tensor=2, remat="full"), Layout(data=2, fsdp=4, zero_stage=1,
                                                              remat="full")]
    result = plan_gpt(get_preset("tiny"), batch_size=16, devices=8, hardware=slow,
                      layouts=layouts, compile_top=1, progress=False)
    compiled = [c for c in result.candidates if c.source == "compiled"]
    assert result.best.source == "compiled" and 1 <= len(compiled) <= 2
    scale = result.analytic_scale
    assert scale > 1.5 and any(n.startswith("analytic compute scaled by ") for n in result.notes)
    unscaled = plan_gpt(get_preset("tiny"), batch_size=16, devices=8, hardware=slow,
                        layouts=layouts, compile_top=0, progress=False)
    for c in result.candidates:
        if c.source == "analytic":
            before = next(u for u in unscaled.candidates if u.layout == c.layout)
            assert c.time.compute == pytest.approx(scale * before.time.compute)
            assert c.time.step >= result.best.time.step


def test_train_layout_auto_plans_prints_the_choice_and_runs_it(capsys):
    assert cli_main(["train", "--layout", "auto", "--preset", "tiny", "--steps", "1",
                     "--batch-size", "16", "--seq-len", "32", "--remat", "full",
                     "--hardware", "h100-sxm", "--compile-top", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    chosen = out.split("meshpar train --layout auto: ", 1)[1].split(" (predicted", 1)[0]
    # The run's own banner shows it trained on the chosen mesh.
    assert f"mesh {chosen.split()[0]} on 8 cpu devices" in out
    assert "equivalent to: meshpar train --preset tiny" in out and "done: 1 steps" in out


def test_proxy_layouts_keep_per_device_shapes_and_collectives_scale_per_axis():
    from meshpar.planner import Collective
    from meshpar.planner.search import extrapolate_collectives, proxy_layout

    target = Layout(data=64, fsdp=8, tensor=4, zero_stage=3)
    proxy = proxy_layout(target, 64)
    # fsdp kept whole (ZeRO shards keep their size), data shrunk, tensor kept.
    assert (proxy.data, proxy.fsdp, proxy.tensor, proxy.zero_stage) == (2, 8, 4, 3)
    assert proxy_layout(Layout(data=4, tensor=2), 8) is None  # fits: compiled as it is
    assert proxy_layout(Layout(pipe=4, data=2, fsdp=2, tensor=2), 8) is None  # no proxy fits
    colls = [Collective("all-reduce", ("data",), 100.0, 3), Collective("all-gather", ("fsdp",), 70.0),
             Collective("all-reduce", ("tensor",), 5.0, 9)]
    out = extrapolate_collectives(colls, proxy=proxy, target=target)
    assert out[0].traffic == pytest.approx(100.0 * (63 / 64) / (1 / 2)) and out[0].executions == 3
    assert out[1].traffic == 70.0 and out[2] == colls[2]
