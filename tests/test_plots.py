"""``meshpar.inspect.plots`` and ``meshpar inspect --plots``: PNGs written, non-empty, for plain and
pipelined layouts."""

from __future__ import annotations

import pathlib

import matplotlib.image
import numpy as np
import pytest
from flax import nnx

import meshpar as mp
from meshpar.cli import main as cli_main
from meshpar.inspect.plots import (_blocks, plot_param_sharding, plot_pipeline_schedule,
                                   plot_strategy_memory, strategy_memory)
from meshpar.models import GPT, get_preset
from meshpar.parallel.schedule import PipelineConfig
from meshpar.train.plan import plan_training

CFG = get_preset("tiny")


def _make():
    return GPT(CFG, rngs=nnx.Rngs(0))


def _png(path) -> tuple[int, int]:
    """Width and height of a PNG that holds a drawing: at least 10% of its pixels are not
    white, in at least 3 colours that each cover 1% of it (a blank figure has 0 and 1)."""
    path = pathlib.Path(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = matplotlib.image.imread(path)[..., :3]
    assert (np.abs(img - 1).sum(-1) > 0.05).mean() > 0.10, f"{path}: almost blank"
    assert len(_colour_areas(path)) >= 3, f"{path}: fewer than 3 colours"
    height, width = img.shape[:2]
    return width, height


def _colour_areas(path) -> list[int]:
    """Pixel counts of the colours that each cover more than 1% of the image."""
    rgb = (matplotlib.image.imread(path)[..., :3].reshape(-1, 3) * 255).round().astype(int)
    _, counts = np.unique(rgb, axis=0, return_counts=True)
    return sorted(int(c) for c in counts if c > 0.01 * len(rgb))


def _equal_area_colours(path) -> int:
    """How many colours cover the same area (within 3%) as the median large colour: in a
    schedule plot, one colour per (microbatch, repeat), each drawn in the same number of cells."""
    areas = _colour_areas(path)
    median = float(np.median(areas))
    return sum(abs(a - median) <= 0.03 * median for a in areas)


def test_the_png_checks_reject_a_blank_figure(tmp_path):
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 4))
    fig.savefig(tmp_path / "blank.png")
    plt.close(fig)
    with pytest.raises(AssertionError, match="almost blank"):
        _png(tmp_path / "blank.png")


def test_param_blocks_name_the_devices_holding_them():
    plan = plan_training(_make, mesh=mp.make_mesh("data=2,fsdp=2,tensor=2"),
                         strategy=mp.get_strategy("auto")).params
    sharded, cells = _blocks(plan["blocks/wq"])  # P(None, 'fsdp', 'tensor')
    assert sharded == [1, 2]
    assert len(cells) == 4 and all(len(devices) == 2 for devices in cells.values())  # x data
    sharded, cells = _blocks(plan["ln_f_scale"])  # P('fsdp')
    assert sharded == [0] and sorted(len(d) for d in cells.values()) == [4, 4]


def test_plots_of_a_plain_layout(tmp_path):
    plan = plan_training(_make, mesh=mp.make_mesh("fsdp=4,tensor=2"),
                         strategy=mp.get_strategy("zero3")).params
    width, height = _png(plot_param_sharding(plan, tmp_path / "s.png") and tmp_path / "s.png")
    assert width > 800 and height > 600
    rows = strategy_memory(_make, {"DP": (mp.make_mesh(data=8), "dp"),
                                   "ZeRO-3": (mp.make_mesh(fsdp=8), "zero3")})
    assert rows[1]["params"] * 8 == rows[0]["params"]
    rows[1]["compiled"] = rows[1]["params"] + rows[1]["optimizer"]
    plot_strategy_memory(rows, tmp_path / "m.png")
    _png(tmp_path / "m.png")


def test_schedule_plot_for_gpipe_and_circular(tmp_path):
    configs = [PipelineConfig(stages=4, microbatches=8),
               PipelineConfig(stages=4, microbatches=8, schedule="circular", repeats=2)]
    fig = plot_pipeline_schedule(configs, tmp_path / "p.png")
    assert len(fig.axes) == 2
    width, _ = _png(tmp_path / "p.png")
    assert width > 1000  # 19 iterations wide
    # Pixels: one colour per microbatch (gpipe, 8) and per microbatch and repeat (circular, 16),
    # each covering the same area: every work item drawn once on every stage.
    for config, name in ((configs[0], "gpipe.png"), (configs[1], "circular.png")):
        plot_pipeline_schedule([config], tmp_path / name)
        assert _equal_area_colours(tmp_path / name) == config.microbatches * config.repeats, name


def test_inspect_plots_plain_layout(tmp_path, capsys):
    argv = ["inspect", "--preset", "tiny", "--mesh", "fsdp=4,tensor=2", "--plots", str(tmp_path)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.png", "sharding.png"]
    for p in tmp_path.iterdir():
        _png(p)
        assert f"wrote {p}" in out


def test_inspect_plots_pipelined_layout_writes_the_schedule(tmp_path, capsys):
    argv = ["inspect", "--preset", "tiny", "--layers", "8", "--mesh", "pipe=4,data=2",
            "--microbatches", "8", "--schedule", "circular", "--repeats", "2",
            "--plots", str(tmp_path), "--json"]
    assert cli_main(argv) == 0
    data = __import__("json").loads(capsys.readouterr().out)
    assert sorted(pathlib.Path(p).name for p in data["plots"]) == \
        ["memory.png", "schedule.png", "sharding.png"]
    width, height = _png(tmp_path / "schedule.png")
    assert width > height


@pytest.mark.parametrize("argv", [["--layers", "4"]])
def test_inspect_plots_refuses_a_pipeline_the_model_does_not_fit(tmp_path, capsys, argv):
    # 4 layers cannot make 4 stages x 2 repeats: a usage error, and no half-written plots.
    full = ["inspect", "--preset", "tiny", *argv, "--mesh", "pipe=4,data=2", "--microbatches",
            "8", "--schedule", "circular", "--repeats", "2", "--plots", str(tmp_path / "out")]
    assert cli_main(full) == 2
    assert "divisible by 8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_schedule_plot_for_1f1b(tmp_path):
    configs = [PipelineConfig(stages=4, microbatches=8, schedule="1f1b"),
               PipelineConfig(stages=4, microbatches=8, schedule="interleaved-1f1b", repeats=2)]
    fig = plot_pipeline_schedule(configs, tmp_path / "p.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert "backward pass: 20 ticks" in titles[0] and "5 activations kept" in titles[0], titles
    assert "backward pass: 36 ticks" in titles[1] and "12 activations kept" in titles[1], titles
    # One labelled cell per forward and backward: P*M*v - M forwards (the last chunk's is left
    # to its backward) and P*M*v backwards.
    labels = [[t.get_text() for t in ax.texts] for ax in fig.axes]
    assert sum(x.startswith("F") for x in labels[0]) == 4 * 8 - 8
    assert sum(x.startswith("B") for x in labels[1]) == 4 * 8 * 2
    width, _ = _png(tmp_path / "p.png")
    assert width > 1500  # 36 ticks wide
