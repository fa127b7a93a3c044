"""DiLoCo against data parallelism on the embedded corpus, and a lost worker survived.

Three runs of ``meshpar train`` with the same model, seed, global batch and steps (equal tokens):

1. **DP**: ``--mesh data=4,fsdp=2`` (gradients all-reduced every step);
2. **DiLoCo**: ``--mesh diloco=4,fsdp=2 --inner-steps H`` (4 replicas, outer Nesterov SGD 0.7/0.9),
   one process;
3. **kill and restart**: the DiLoCo run under ``meshpar launch`` with one process per replica
   group (4 processes x 2 CPU devices), checkpointing every H steps; once the checkpoint of
   ``--kill-after`` steps is complete, one process is killed (SIGKILL: a lost worker). JAX's
   runtime then stops the job (the launcher names the dead process), and the run is restarted
   from the last checkpoint with **3** processes and ``--mesh diloco=3,fsdp=2`` (the global batch
   must divide by 3 x 2: the default 48 does), and carries on to the end.

With ``--warm-start N`` (and ``--skip-kill``), DiLoCo starts from the DP run's checkpoint of step
N instead of from scratch, as the DiLoCo paper starts from a pretrained model, and both runs go
on to ``--steps`` with the same learning-rate schedule.

It prints the loss of each run (mean of the last 20 steps), the DiLoCo / DP ratio, the bytes sent
over ``diloco`` per step next to DP's, and writes ``diloco_vs_dp.png`` with the curves (DP,
DiLoCo, and the killed-and-restarted run). Figures and their reading: ``benchmarks/README.md``.

    python benchmarks/bench_diloco.py --out /tmp/diloco     # ~10 minutes on 2 busy cores
    python benchmarks/bench_diloco.py --out /tmp/dw --skip-kill --warm-start 1000 --steps 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _train_args(a: argparse.Namespace) -> list[str]:
    return ["--preset", a.preset, "--seq-len", str(a.seq_len), "--steps", str(a.steps),
            "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--no-progress"]


def _outer_args(a: argparse.Namespace) -> list[str]:
    return ["--inner-steps", str(a.inner_steps), "--outer-lr", str(a.outer_lr),
            "--outer-momentum", str(a.outer_momentum)]


def _losses(path: str) -> list[tuple[int, float]]:
    with open(path) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _run(cmd: list[str], log: str) -> int:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as out:
        return subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())


def _complete_steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.exists(os.path.join(directory, d, "commit_success.txt")))


def kill_and_restart(a: argparse.Namespace) -> dict:
    """Run 3: 4 processes, one killed after the checkpoint of ``kill_after`` steps, 3 restart."""
    ck = os.path.join(a.out, "ck")
    metrics = os.path.join(a.out, "killed.jsonl")
    py = sys.executable
    common = [*_train_args(a), *_outer_args(a), "--checkpoint-dir", ck,
              "--checkpoint-every", str(a.inner_steps)]
    launch = [py, "-m", "meshpar", "launch", "--processes", "4", "--cpu-devices-per-process",
              "2", "--", "train", "--mesh", "diloco=4,fsdp=2", *common,
              "--metrics-file", metrics]
    print("$", " ".join(launch), flush=True)
    log = open(os.path.join(a.out, "killed_4.log"), "w")
    launcher = subprocess.Popen(launch, stdout=log, stderr=subprocess.STDOUT, env=_env())
    victim = None
    while launcher.poll() is None:
        if a.kill_after in _complete_steps(ck):
            # The launcher's children are the four processes; kill the last one (replica 3).
            children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                      text=True).stdout.split()
            if children:
                victim = int(sorted(children, key=int)[-1])
                os.kill(victim, signal.SIGKILL)
                print(f"killed process {victim} (replica group 3) after the checkpoint of step "
                      f"{a.kill_after}", flush=True)
                break
        time.sleep(0.5)
    first_status = launcher.wait()
    log.close()
    before = _losses(metrics) if os.path.exists(metrics) else []
    resumed_from = max(_complete_steps(ck), default=0)
    metrics2 = os.path.join(a.out, "restarted.jsonl")
    restart = [py, "-m", "meshpar", "launch", "--processes", "3", "--cpu-devices-per-process",
               "2", "--", "train", "--mesh", "diloco=3,fsdp=2", *common, "--resume",
               "--metrics-file", metrics2]
    second_status = _run(restart, os.path.join(a.out, "restarted_3.log"))
    return {"killed_pid": victim, "first_status": first_status, "before": before,
            "resumed_from": resumed_from, "second_status": second_status,
            "after": _losses(metrics2) if os.path.exists(metrics2) else []}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="diloco_bench")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--inner-steps", type=int, default=16)
    p.add_argument("--outer-lr", type=float, default=0.7, help="outer SGD learning rate (0.7)")
    p.add_argument("--outer-momentum", type=float, default=0.9,
                   help="outer Nesterov momentum (0.9; 0: plain SGD)")
    p.add_argument("--kill-after", type=int, default=128,
                   help="kill one process once this step's checkpoint is complete (a multiple of H)")
    p.add_argument("--skip-kill", action="store_true", help="only the DP and DiLoCo runs")
    p.add_argument("--warm-start", type=int, default=0, metavar="N",
                   help="start DiLoCo from the DP run's checkpoint of step N (the DiLoCo paper "
                        "starts from a pretrained model); 0: both from scratch")
    a = p.parse_args(argv)
    if a.warm_start and not 0 < a.warm_start < a.steps:
        p.error(f"--warm-start {a.warm_start} must be between 0 and --steps {a.steps}")
    if a.warm_start and not a.skip_kill:
        p.error("--warm-start needs --skip-kill (the kill-and-restart run starts from scratch)")
    os.makedirs(a.out, exist_ok=True)
    py = sys.executable
    runs = {}
    warm = os.path.join(a.out, "warm")
    shutil.rmtree(warm, ignore_errors=True)
    for name, mesh, extra in (
        ("dp", "data=4,fsdp=2", ["--checkpoint-dir", warm, "--checkpoint-every",
                                 str(a.warm_start)] if a.warm_start else []),
        ("diloco", "diloco=4,fsdp=2", _outer_args(a)),
    ):
        if name == "diloco" and a.warm_start:
            # The DP run's checkpoint of step N alone: DiLoCo resumes from it with the same
            # --steps (the same learning-rate schedule), so both runs see the same tokens.
            start = os.path.join(a.out, "warm_diloco")
            shutil.rmtree(start, ignore_errors=True)
            os.makedirs(start)
            shutil.copytree(os.path.join(warm, str(a.warm_start)),
                            os.path.join(start, str(a.warm_start)))
            extra = [*extra, "--checkpoint-dir", start, "--resume"]
        path = os.path.join(a.out, f"{name}.jsonl")
        status = _run([py, "-m", "meshpar", "train", "--mesh", mesh, *_train_args(a), *extra,
                       "--metrics-file", path], os.path.join(a.out, f"{name}.log"))
        if status:
            print(f"{name} run failed (status {status}); see {a.out}/{name}.log")
            return 1
        runs[name] = _losses(path)
    tail = lambda rows: sum(l for _, l in rows[-20:]) / len(rows[-20:])  # noqa: E731
    dp, dl = tail(runs["dp"]), tail(runs["diloco"])
    with open(os.path.join(a.out, "diloco.jsonl")) as f:
        first = json.loads(f.readline())
    print(f"loss, mean of the last 20 of {a.steps} steps: DP {dp:.4f}, DiLoCo (4 x H={a.inner_steps}, "
          f"outer lr {a.outer_lr} momentum {a.outer_momentum})"
          f" {dl:.4f}, ratio {dl / dp:.4f} ({(dl / dp - 1) * 100:+.2f} %)")
    print(f"bytes sent per device per step: over diloco {first['diloco_bytes_per_step']:,.0f}, "
          f"data parallel would send {first['dp_bytes_per_step']:,.0f} "
          f"({first['diloco_bytes_per_step'] / first['dp_bytes_per_step']:.4f}x)")
    killed = None if a.skip_kill else kill_and_restart(a)
    if killed:
        after = killed["after"]
        print(f"kill: first launch status {killed['first_status']}, steps logged before the kill "
              f"{len(killed['before'])}, resumed from step {killed['resumed_from']} with 3 "
              f"replicas, restart status {killed['second_status']}, steps after "
              f"{after[0][0] if after else '-'}..{after[-1][0] if after else '-'}, final loss "
              f"(mean of last 20) {tail(after) if after else float('nan'):.4f}")

    import matplotlib  # lazy: only for the figure
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, label in (("dp", "DP (data=4,fsdp=2)"),
                        ("diloco", f"DiLoCo (diloco=4,fsdp=2, H={a.inner_steps}, outer SGD lr "
                                   f"{a.outer_lr}, momentum {a.outer_momentum})")):
        ax.plot(*zip(*runs[name]), label=label, lw=1)
    if killed and killed["after"]:
        ax.plot(*zip(*(killed["before"] + killed["after"])), lw=1, ls="--",
                label=f"DiLoCo, a worker killed after step {a.kill_after}, restarted with 3")
        ax.axvline(killed["resumed_from"], color="grey", lw=0.5)
    ax.set_xlabel("step (equal tokens per step)")
    ax.set_ylabel("training loss (nats per byte)")
    ax.set_title(f"GPT {a.preset}, batch {a.batch_size}x{a.seq_len}, embedded corpus")
    ax.legend()
    path = os.path.join(a.out, "diloco_vs_dp.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
