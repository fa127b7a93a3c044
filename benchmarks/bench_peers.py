"""meshpar against MaxText on the same GPT, mesh and precision: step times, their ratio, model FLOP/s.

For each model size and layout, one MaxText 0.2.5 run (``../shared/peers/maxtext/run.sh`` in a
subprocess, synthetic data) and one ``meshpar train`` run (a subprocess too, so both sides pay the
same process start-up and neither shares a thread pool with the other) train the same decoder:
tied embeddings, GELU MLP, learned positions (meshpar) / MaxText's defaults otherwise, bf16
compute with fp32 parameters (``--precision``), full remat, AdamW, global batch 8 (one row per
device). The two runs of a layout go back to back, MaxText first for even pairs and meshpar first
for odd ones (``--pairs``), so the load of the machine drifts across both. Each run logs the wall
time of every step (MaxText: ``completed step: N, seconds: S``; meshpar: ``--metrics-file``'s
``step_time_s``); the figure is the median of steps ``--first-step`` .. ``--steps - 1``.

Printed per size and layout: both medians, ``ratio = meshpar / MaxText`` (and, with several pairs,
the per-pair ratios), and the achieved *model* FLOP/s of each side, ``model_flops / median``, with
``model_flops = 6 x tokens x matmul params + 12 x layers x batch x seq^2 x d_model``
(``bench_strategies.model_flops``; no remat recompute counted, the full causal score matrix
counted, the same figure for both sides).

Layouts (``--layouts``, MaxText's ``ici_*`` = meshpar's ``--mesh``):

* ``fsdp=8``: ZeRO-3 over 8 devices;
* ``fsdp=4,tensor=2``: ZeRO-3 x Megatron tensor parallel;
* ``data=8``: data parallel;
* ``pipe=2,fsdp=4``: a circular pipeline of 2 stages, one layer per stage and repeat (MaxText
  ``ici_pipeline_parallelism=2 num_layers_per_pipeline_stage=1``, i.e. ``layers / 2`` repeats;
  meshpar ``--schedule circular --repeats layers/2``), 2 microbatches, ZeRO-3 over ``fsdp``.

Sizes (``--sizes``): ``small`` is issue 13's model (4 layers, d 256, 4 heads x 64, MLP 1024,
vocabulary 32000, sequence 128); ``20m`` is the shape of meshpar's ``20m`` preset (6 layers, d 512,
8 heads, MLP 2048, vocabulary 256, sequence 256); ``tiny`` is for the smoke test.

``--baseline-root DIR`` adds a third side to every pair: ``meshpar train`` from another checkout
(an older commit's tree), for before/after figures measured in the same invocation.
``--meshpar-python`` runs meshpar on another interpreter, e.g. MaxText's venv (jax 0.12 there,
0.10.2 in meshpar's): the same compiler on both sides.

The MaxText side needs its venv: ``$PEERS/mt_venv`` (``PEERS`` defaults to ``~/peers``), made by
``../shared/peers/maxtext/setup.sh``. Without it that side is skipped with a message and only
meshpar's times are printed.

Usage:
    python benchmarks/bench_peers.py                                   # all layouts, both sizes
    python benchmarks/bench_peers.py --sizes small --layouts "fsdp=8;data=8" --steps 30 --pairs 2
    python benchmarks/bench_peers.py --precision fp32 --json /tmp/peers.json
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

# _common, whether this file runs as a script or is loaded by path (tests/test_benchmarks.py).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

REPO = os.path.dirname(_HERE)
DEFAULT_RUN_SH = os.path.join(os.path.dirname(REPO), "shared", "peers", "maxtext", "run.sh")


class Size(NamedTuple):
    layers: int
    d_model: int
    heads: int
    mlp_dim: int
    vocab: int
    seq: int
    batch: int = 8

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def matmul_params(self) -> int:
        """Kernels and the (tied) unembedding, as ``GPTConfig.matmul_param_count``."""
        d = self.d_model
        return self.layers * (4 * d * d + 2 * d * self.mlp_dim) + d * self.vocab

    def model_flops(self) -> float:
        import bench_strategies

        return bench_strategies.model_flops(
            layers=self.layers, d_model=self.d_model, matmul_params=self.matmul_params(),
            batch=self.batch, seq=self.seq)["total"]


SIZES: dict[str, Size] = {
    "small": Size(layers=4, d_model=256, heads=4, mlp_dim=1024, vocab=32000, seq=128),
    "20m": Size(layers=6, d_model=512, heads=8, mlp_dim=2048, vocab=256, seq=256),
    "tiny": Size(layers=2, d_model=64, heads=4, mlp_dim=256, vocab=256, seq=32),
}

#: meshpar mesh -> MaxText ici_* settings. Axes MaxText has by default and we do not use are 1.
_AXES = {"data": "ici_data_parallelism", "fsdp": "ici_fsdp_parallelism",
         "tensor": "ici_tensor_parallelism", "pipe": "ici_pipeline_parallelism"}
LAYOUTS = ("fsdp=8", "fsdp=4,tensor=2", "data=8", "pipe=2,fsdp=4")
PIPE_MICROBATCHES = 2


def parse_layout(layout: str) -> dict[str, int]:
    """``"fsdp=4,tensor=2"`` -> ``{"fsdp": 4, "tensor": 2}``."""
    axes = {}
    for part in layout.split(","):
        name, _, size = part.partition("=")
        if name not in _AXES or not size.isdigit():
            raise SystemExit(f"bench_peers: bad layout {layout!r}: axes are {', '.join(_AXES)}")
        axes[name] = int(size)
    return axes


def maxtext_args(size: Size, layout: str, *, steps: int, precision: str) -> list[str]:
    """``key=value`` arguments of ``run.sh`` for one run."""
    axes = parse_layout(layout)
    devices = 1
    for n in axes.values():
        devices *= n
    if size.batch % devices:
        raise SystemExit(f"bench_peers: batch {size.batch} is not a multiple of {devices} devices")
    args = [
        f"steps={steps}", 'mlp_activations=["gelu"]', "logits_via_embedding=true",
        "remat_policy=full", f"dtype={'bfloat16' if precision == 'bf16' else 'float32'}",
        "weight_dtype=float32", f"per_device_batch_size={size.batch // devices}",
        f"max_target_length={size.seq}", f"base_emb_dim={size.d_model}",
        f"base_num_decoder_layers={size.layers}", f"base_num_query_heads={size.heads}",
        f"base_num_kv_heads={size.heads}", f"head_dim={size.head_dim}",
        f"base_mlp_dim={size.mlp_dim}", f"vocab_size={size.vocab}",
    ]
    args += [f"{key}={axes.get(axis, 1)}" for axis, key in _AXES.items()]
    if axes.get("pipe", 1) > 1:
        args += ["num_layers_per_pipeline_stage=1", f"num_pipeline_microbatches={PIPE_MICROBATCHES}"]
    return args


def meshpar_args(size: Size, layout: str, *, steps: int, precision: str,
                 metrics_file: str) -> list[str]:
    """Arguments of ``meshpar train`` for one run."""
    args = [
        "train", "--preset", "small", "--layers", str(size.layers), "--d-model", str(size.d_model),
        "--heads", str(size.heads), "--mlp-dim", str(size.mlp_dim),
        "--vocab-size", str(size.vocab), "--seq-len", str(size.seq),
        "--batch-size", str(size.batch), "--precision", precision, "--remat", "full",
        "--mesh", layout, "--steps", str(steps), "--metrics-file", metrics_file, "--no-progress",
    ]
    stages = parse_layout(layout).get("pipe", 1)
    if stages > 1:
        if size.layers % stages:
            raise SystemExit(f"bench_peers: {size.layers} layers do not split into {stages} stages")
        args += ["--schedule", "circular", "--repeats", str(size.layers // stages),
                 "--microbatches", str(PIPE_MICROBATCHES)]
    return args


_MT_STEP = re.compile(r"completed step: (\d+), seconds: ([0-9.eE+-]+).*?loss: ([0-9.eE+-]+|nan)")


def parse_maxtext_log(text: str) -> tuple[dict[int, float], dict[int, float]]:
    """``({step: seconds}, {step: loss})`` from MaxText's log lines."""
    times, losses = {}, {}
    for step, secs, loss in _MT_STEP.findall(text):
        times[int(step)] = float(secs)
        losses[int(step)] = float(loss)
    return times, losses


def parse_meshpar_metrics(path: str) -> tuple[dict[int, float], dict[int, float]]:
    """``({step: seconds}, {step: loss})`` from ``meshpar train --metrics-file``."""
    times, losses = {}, {}
    with open(path) as fh:
        for line in fh:
            rec = json.loads(line)
            times[rec["step"]] = rec["step_time_s"]
            losses[rec["step"]] = rec["loss"]
    return times, losses


def median_from(times: dict[int, float], first: int) -> float | None:
    kept = [t for s, t in times.items() if s >= first]
    return statistics.median(kept) if kept else None


def _tail(text: str, n: int = 15) -> str:
    lines = text.strip().splitlines()
    # An XLA CHECK failure ends in a long native stack trace: keep its message too.
    cause = [line for line in lines[:-n] if re.match(r"[FE]\d{4} |.*(Check failed|Error)", line)]
    return "\n".join("    " + line for line in cause[-3:] + lines[-n:])


def run_side(side: str, argv: list[str], env: dict[str, str], *, timeout: float, workdir: str,
             metrics_file: str | None, first: int) -> dict[str, Any]:
    """Run one side's subprocess; its step times, median, losses and wall time (or its error)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=env, cwd=workdir, capture_output=True, text=True,
                              timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        out, rc = out + f"\n[timed out after {timeout:.0f} s]", -1
    wall = time.perf_counter() - t0
    if side == "maxtext":
        times, losses = parse_maxtext_log(out)
    elif metrics_file is None:
        times, losses = {}, {}
    else:
        times, losses = ({}, {}) if not os.path.exists(metrics_file) else \
            parse_meshpar_metrics(metrics_file)
    result = {"rc": rc, "wall_s": wall, "step_times": times, "losses": losses,
              "median_s": median_from(times, first)}
    if rc != 0 or result["median_s"] is None:
        result["error"] = f"{side} run failed (exit {rc}); last lines:\n{_tail(out)}"
    return result


def maxtext_setup(peers: str | None, run_sh: str) -> tuple[str | None, str]:
    """``(None, why)`` when the MaxText side cannot run, else ``(peers dir, "")``."""
    peers = peers or os.environ.get("PEERS") or os.path.expanduser("~/peers")
    venv = os.path.join(peers, "mt_venv")
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        return None, (f"MaxText side skipped: no MaxText venv at {venv} (install it with "
                      "../shared/peers/maxtext/setup.sh, or point $PEERS / --peers at the folder "
                      "holding mt_venv); printing meshpar's times only")
    if not os.path.exists(run_sh):
        return None, f"MaxText side skipped: no run script at {run_sh} (--maxtext-run)"
    return peers, ""


def parse_args(argv: Sequence[str] | None = None):
    p = _common.parser(__doc__)
    p.add_argument("--sizes", default="small,20m", help="comma-separated: " + ", ".join(SIZES))
    p.add_argument("--layouts", default=";".join(LAYOUTS), help="';'-separated meshes")
    p.add_argument("--steps", type=int, default=30, help="steps per run")
    p.add_argument("--first-step", type=int, default=5, help="median over steps >= this (0-based)")
    p.add_argument("--pairs", type=int, default=1, help="MaxText/meshpar run pairs per layout")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--peers", default=None, help="folder with mt_venv (default $PEERS or ~/peers)")
    p.add_argument("--maxtext-run", default=os.environ.get("MAXTEXT_RUN", DEFAULT_RUN_SH))
    p.add_argument("--no-maxtext", action="store_true", help="run meshpar's side only")
    p.add_argument("--meshpar-root", default=REPO,
                   help="the meshpar checkout `meshpar train` runs from")
    p.add_argument("--meshpar-python", default=sys.executable,
                   help="the interpreter of `meshpar train` (e.g. $PEERS/mt_venv/bin/python: "
                        "meshpar on MaxText's jax and XLA, to separate compiler from code)")
    p.add_argument("--baseline-root", default=None,
                   help="a second meshpar checkout (e.g. an older commit's tree) run as a third "
                        "side of every pair: before/after figures from the same invocation")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = _common.parse_args(p, argv)
    for name in args.sizes.split(","):
        if name not in SIZES:
            p.error(f"unknown size {name!r}; sizes are {', '.join(SIZES)}")
    if args.first_step >= args.steps:
        p.error(f"--first-step {args.first_step} must be below --steps {args.steps}")
    return args


def main(argv: Sequence[str] | None = None, *, log=print) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    peers, why = (None, "MaxText side skipped: --no-maxtext") if args.no_maxtext else \
        maxtext_setup(args.peers, args.maxtext_run)
    if why:
        log(why)
    layouts = [lay.strip() for lay in args.layouts.split(";") if lay.strip()]
    for lay in layouts:
        if _product(parse_layout(lay).values()) != args.cpu_devices:
            raise SystemExit(f"bench_peers: layout {lay} does not use all {args.cpu_devices} devices")
    if peers and args.cpu_devices != 8:
        raise SystemExit("bench_peers: MaxText's run.sh emulates 8 devices; use --cpu-devices 8")

    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    root = os.path.abspath(args.meshpar_root)
    mp_env = dict(env, PYTHONPATH=os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])]))
    base_env = None if not args.baseline_root else dict(env, PYTHONPATH=os.pathsep.join(
        [os.path.abspath(args.baseline_root), *filter(None, [env.get("PYTHONPATH")])]))
    mt_env = dict(env, RUN_NAME="bench_peers")
    if peers:
        mt_env["PEERS"] = peers
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        mt_env["MT_OUT"] = os.path.join(tmp, "mt_out")
        for size_name in args.sizes.split(","):
            size = SIZES[size_name]
            for lay in layouts:
                row = {"size": size_name, "layout": lay, "model_flops": size.model_flops(),
                       "pairs": []}
                for k in range(args.pairs):
                    metrics = os.path.join(tmp, f"mp_{size_name}_{len(results)}_{k}.jsonl")
                    sides = {
                        "meshpar": ([args.meshpar_python, "-m", "meshpar",
                                     *meshpar_args(size, lay, steps=args.steps,
                                                   precision=args.precision,
                                                   metrics_file=metrics),
                                     "--cpu-devices", str(args.cpu_devices)], mp_env, metrics),
                    }
                    if base_env is not None:
                        base_metrics = metrics.replace("mp_", "base_")
                        sides["baseline"] = (
                            [args.meshpar_python, "-m", "meshpar",
                             *meshpar_args(size, lay, steps=args.steps, precision=args.precision,
                                           metrics_file=base_metrics),
                             "--cpu-devices", str(args.cpu_devices)], base_env, base_metrics)
                    if peers:
                        sides["maxtext"] = (["bash", args.maxtext_run,
                                             *maxtext_args(size, lay, steps=args.steps,
                                                           precision=args.precision)],
                                            mt_env, None)
                    # maxtext first on even pairs, last on odd ones
                    order = sorted(sides, key=lambda n: n != "maxtext", reverse=(k % 2 == 1))
                    pair = {}
                    for side in order:
                        argv_, env_, mfile = sides[side]
                        pair[side] = run_side(side, argv_, env_, timeout=args.timeout,
                                              workdir=tmp, metrics_file=mfile,
                                              first=args.first_step)
                        if "error" in pair[side]:
                            log(f"[{size_name} {lay}] {pair[side]['error']}")
                    pair["order"] = order
                    row["pairs"].append(pair)
                _summarize_row(row)
                results.append(row)
                log(_format_row(row, first=True) if len(results) == 1 else _format_row(row))
    report = {
        "meta": {"date": date, "command": " ".join(["python", "benchmarks/bench_peers.py",
                                                    *(sys.argv[1:] if argv is None else argv)]),
                 "args": vars(args), "loadavg": os.getloadavg(), "host_cpus": os.cpu_count(),
                 "maxtext": bool(peers), "maxtext_skipped": why or None,
                 "wall_s": time.perf_counter() - t_start},
        "rows": results,
    }
    log(f"\nsteps {args.first_step}..{args.steps - 1} of {args.steps}, precision {args.precision}, "
        f"{args.pairs} pair(s) per layout, load average {os.getloadavg()[0]:.1f}, "
        f"wall {report['meta']['wall_s']:.0f} s")
    _common.write_json(args.json, report)
    return report


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _summarize_row(row: dict) -> None:
    def med(side):
        got = [p[side]["median_s"] for p in row["pairs"] if side in p and p[side]["median_s"]]
        return statistics.median(got) if got else None

    row["meshpar_s"], row["maxtext_s"] = med("meshpar"), med("maxtext")
    row["baseline_s"] = med("baseline")
    row["vs_baseline"] = (row["meshpar_s"] / row["baseline_s"]
                          if row["meshpar_s"] and row["baseline_s"] else None)
    row["ratio"] = (row["meshpar_s"] / row["maxtext_s"]
                    if row["meshpar_s"] and row["maxtext_s"] else None)
    row["pair_ratios"] = [p["meshpar"]["median_s"] / p["maxtext"]["median_s"]
                          for p in row["pairs"] if "maxtext" in p
                          and p["meshpar"]["median_s"] and p["maxtext"]["median_s"]]
    for side in ("meshpar", "maxtext", "baseline"):
        s = row[f"{side}_s"]
        row[f"{side}_gflops"] = row["model_flops"] / s / 1e9 if s else None
        last = [p[side]["losses"][max(p[side]["losses"])] for p in row["pairs"]
                if side in p and p[side]["losses"]]
        row[f"{side}_last_loss"] = last[-1] if last else None


def _fmt(x, spec):
    width = int(re.match(r"\d*", spec).group() or 0)
    return format(x, spec) if x is not None else "-".rjust(width)


def _format_row(row: dict, first: bool = False) -> str:
    head = (f"{'size':6s} {'layout':16s} {'MaxText s':>9s} {'meshpar s':>9s} {'ratio':>6s} "
            f"{'pair ratios':18s} {'MT GF/s':>8s} {'mp GF/s':>8s} {'model GF':>8s} "
            f"{'MT loss':>7s} {'mp loss':>7s} {'base s':>7s} {'mp/base':>7s}\n")
    pr = ",".join(f"{r:.2f}" for r in row["pair_ratios"]) or "-"
    line = (f"{row['size']:6s} {row['layout']:16s} {_fmt(row['maxtext_s'], '9.3f')} "
            f"{_fmt(row['meshpar_s'], '9.3f')} {_fmt(row['ratio'], '6.3f')} {pr:18s} "
            f"{_fmt(row['maxtext_gflops'], '8.1f')} {_fmt(row['meshpar_gflops'], '8.1f')} "
            f"{row['model_flops'] / 1e9:8.2f} {_fmt(row['maxtext_last_loss'], '7.3f')} "
            f"{_fmt(row['meshpar_last_loss'], '7.3f')} {_fmt(row['baseline_s'], '7.3f')} "
            f"{_fmt(row['vs_baseline'], '7.3f')}")
    return (head if first else "") + line


if __name__ == "__main__":
    main()
