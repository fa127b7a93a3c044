"""Where one train step's time goes: a ``jax.profiler`` trace, op by op, sorted into kinds.

Model FLOP utilisation (``bench_strategies.py``, target (b)) says how far a step is from the
matmul peak; this says why. It traces a few steps of a meshpar ``Trainer``, matches every op the
XLA runtime timed to its instruction in the compiled HLO, and sorts the time into:

* ``matmul``: dots, and fusions built around a dot (XLA:CPU's ``ynn_fusion``);
* ``data movement``: copies, transposes, slices, dynamic-update-slices, broadcasts, pads and
  concatenations, alone or fused with nothing else (layout changes, scan stacking, zero fills);
* ``elementwise/reduce``: every other fusion (softmax, layer norm, GELU, the optimizer update);
* ``collective``: all-gather, reduce-scatter, all-reduce, ... as the runtime timed them;
* ``collective wait``: the runtime's ``Rendezvous`` events, where a device waits for the others.

Durations are wall intervals on each device's thread. With 8 emulated devices on 2 cores every
thread is descheduled part of the time, so an op's duration includes time the core spent on
other devices; the *shares* are what to read (each device's thread is busy in some op for the
whole step, so shares of op time approximate shares of the step).

Usage:
    python benchmarks/profile_step.py --mesh data=8
    python benchmarks/profile_step.py --mesh fsdp=8 --baseline   # and the hand-written step
    python benchmarks/profile_step.py --mesh fsdp=8 --top 25 --json /tmp/profile.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

# _common, whether this file runs as a script or is loaded by path (tests/test_profile_step.py).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

KINDS = ("matmul", "data movement", "elementwise/reduce", "collective", "collective wait")

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all",
                "collective-broadcast")
# Ops that only move or fill memory; a fusion made of these (and of the structural ops) moves
# data without computing anything.
_MOVES = {"copy", "transpose", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate",
          "pad", "broadcast", "reshape", "bitcast", "reverse", "iota"}
_STRUCTURAL = {"parameter", "constant", "tuple", "get-tuple-element"}
# Runtime events that contain others (the executor, loops, Python frames): not ops themselves.
_CONTAINERS = re.compile(r"^(ThunkExecutor|Wait:|\$|np\.|PjitFunction|while|call|conditional)")
_CALLS = re.compile(r"calls=%?([^\s,}]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def classify_instructions(hlo_text: str, /) -> dict[str, dict]:
    """Every instruction of a compiled HLO text with its kind (one of :data:`KINDS`).

    Args:
        hlo_text: ``compiled.as_text()``.

    Returns:
        ``{instruction name: {"kind", "op", "shape", "source"}}``; ``source`` is the tail of the
        JAX ``op_name`` metadata (which line of the model made it).

    Example:
        >>> kinds = classify_instructions(compiled.as_text())
        >>> kinds["ynn_fusion.3"]["kind"]
        'matmul'
    """
    from meshpar.inspect.hlo import instructions

    ops_of: dict[str, set[str]] = collections.defaultdict(set)
    calls_of: dict[str, list[str]] = collections.defaultdict(list)
    instrs = list(instructions(hlo_text))
    for ins in instrs:
        ops_of[ins.computation].add(ins.op)
        calls_of[ins.computation].extend(_CALLS.findall(ins.rest))

    def fused_ops(comp: str, seen: frozenset = frozenset()) -> set[str]:
        out = set(ops_of.get(comp, ()))
        for sub in calls_of.get(comp, ()):
            if sub not in seen:
                out |= fused_ops(sub, seen | {comp})
        return out

    table = {}
    for ins in instrs:
        ops = {ins.op}
        if ins.op == "fusion":
            called = _CALLS.search(ins.rest)
            ops = fused_ops(called.group(1)) if called else set()
        base = {o.removesuffix("-start").removesuffix("-done") for o in ops}
        if base & set(_COLLECTIVES):
            kind = "collective"
        elif ops & {"dot", "convolution"}:
            kind = "matmul"
        elif ops <= _MOVES | _STRUCTURAL:
            kind = "data movement"
        else:
            kind = "elementwise/reduce"
        src = _OP_NAME.search(ins.rest)
        table[ins.name] = {"kind": kind, "op": ins.op, "shape": ins.result.split("{")[0],
                           "source": src.group(1) if src else ""}
    return table


def summarize_trace(events: Sequence[dict], table: dict[str, dict], /, *, top: int = 15) -> dict:
    """Op time of a profiler trace by kind, and the ops that took longest.

    Args:
        events: the trace's complete events (``ph == "X"``), as in ``trace.json.gz``.
        table: :func:`classify_instructions` of the program that ran.
        top: how many single ops to list.

    Returns:
        ``{"total_us", "by_kind": {kind: {"us", "share"}}, "top": [...], "unmatched_us"}``;
        ``unmatched_us`` is op time whose name is not an instruction of ``table`` (other
        programs: the data placement, the peak matmul).
    """
    by_op: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    by_kind = dict.fromkeys(KINDS, 0.0)
    unmatched = 0.0
    for e in events:
        name, dur = e.get("name", ""), float(e.get("dur", 0.0))
        if name == "Rendezvous":
            by_kind["collective wait"] += dur
            continue
        if _CONTAINERS.match(name):
            continue
        info = table.get(name)
        if info is None:
            unmatched += dur
            continue
        by_kind[info["kind"]] += dur
        by_op[name] += dur
        count[name] += 1
    total = sum(by_kind.values())
    return {
        "total_us": total,
        "by_kind": {k: {"us": v, "share": v / total if total else 0.0} for k, v in by_kind.items()},
        "top": [{"name": n, "us": us, "share": us / total, "count": count[n], **table[n]}
                for n, us in by_op.most_common(top)],
        "unmatched_us": unmatched,
    }


def read_trace(trace_dir: str, /) -> list[dict]:
    """The complete events of the ``trace.json.gz`` that ``jax.profiler`` wrote under a folder."""
    found = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(max(found, key=os.path.getmtime)) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def _trace(run_step: Callable[[], None], *, warmup: int, steps: int,
           trace_dir: str | None) -> tuple[list[dict], float, str]:
    """Run ``warmup`` steps, then trace ``steps`` more: (events, seconds per step, trace dir)."""
    import jax

    for _ in range(warmup):
        run_step()
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="meshpar_profile_")
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            run_step()
    finally:
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
    return read_trace(trace_dir), wall / steps, trace_dir


def profile(*, mesh_text: str, preset: str, batch_size: int, seq_len: int, remat: str | None,
            strategy: str, warmup: int, steps: int, top: int, trace_dir: str | None = None,
            baseline: bool = False, log: Callable = print) -> dict:
    """Trace ``steps`` train steps (after ``warmup``) and sort their op time into kinds.

    With ``baseline``, the hand-written ``jax.jit`` step of ``bench_strategies.py`` (same
    shardings) is traced the same way, and its summary is returned under ``"baseline"``.
    """
    import jax

    import bench_strategies
    import meshpar as mp
    from meshpar.train.data import TokenBatches

    cfg = bench_strategies.gpt_config(preset, seq_len=seq_len, remat=remat)
    mesh = mp.make_mesh(mesh_text)
    trainer = bench_strategies.gpt_trainer(cfg, mesh=mesh, strategy=strategy)
    host_batch = TokenBatches(batch_size=batch_size, seq_len=seq_len, seed=0).batch(0)
    batch = trainer.place_batch(host_batch)
    table = classify_instructions(trainer.lower(host_batch).compile().as_text())
    step_fn, holder = trainer._jitted, {"state": trainer.state}  # Trainer.step minus the transfer

    def run_meshpar():
        holder["state"], metrics = step_fn(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    events, step_s, where = _trace(run_meshpar, warmup=warmup, steps=steps, trace_dir=trace_dir)
    trainer.state = holder["state"]
    summary = summarize_trace(events, table, top=top)
    summary.update(mesh=mp.format_mesh(mesh), preset=preset, batch_size=batch_size,
                   seq_len=seq_len, remat=cfg.remat, steps=steps, devices=mesh.size,
                   step_s=step_s, trace_dir=where, program="meshpar",
                   explicit_zero=bool(trainer.explicit_zero))
    log(format_summary(summary))
    if baseline:
        base_step, shardings = bench_strategies.make_baseline_step(
            trainer, jax.tree.map(lambda x: x.sharding, batch))
        base = {"state": bench_strategies._copy_state(trainer, shardings)}
        base_table = classify_instructions(base_step.lower(base["state"], batch).compile().as_text())

        def run_baseline():
            base["state"], loss = base_step(base["state"], batch)
            jax.block_until_ready((base["state"], loss))

        events, step_s, where = _trace(
            run_baseline, warmup=warmup, steps=steps,
            trace_dir=trace_dir and os.path.join(trace_dir, "baseline"))
        other = summarize_trace(events, base_table, top=top)
        other.update({k: summary[k] for k in ("mesh", "preset", "batch_size", "seq_len", "remat",
                                             "steps", "devices")},
                     step_s=step_s, trace_dir=where, program="hand-written jax.jit")
        summary["baseline"] = other
        log("\n" + format_summary(other))
        log("\n" + format_comparison(summary, other))
    return summary


def format_summary(s: dict, /) -> str:
    """A text table of :func:`profile`'s result."""
    per_dev_step = s["total_us"] / s["devices"] / s["steps"] / 1e6
    out = [f"[{s['program']}] {s['mesh']} {s['preset']} batch {s['batch_size']}x{s['seq_len']} remat "
           f"{s['remat']}: {s['step_s']:.2f} s/step (traced), op time "
           f"{per_dev_step:.2f} s per device and step", "",
           f"{'kind':<20}{'share':>8}{'s/dev/step':>12}"]
    for kind, v in s["by_kind"].items():
        out.append(f"{kind:<20}{v['share']:>8.1%}{v['us'] / s['devices'] / s['steps'] / 1e6:>12.3f}")
    out += ["", f"{'share':>6} {'runs':>5}  {'op':<36}{'kind':<19}{'shape':<26}source"]
    for t in s["top"]:
        out.append(f"{t['share']:>6.1%} {t['count']:>5}  {t['name']:<36}{t['kind']:<19}"
                   f"{t['shape']:<26}{t['source'][-70:]}")
    return "\n".join(out)


def format_comparison(a: dict, b: dict, /) -> str:
    """Seconds per device and step of each kind, two programs side by side."""
    def per(s, kind):
        return s["by_kind"][kind]["us"] / s["devices"] / s["steps"] / 1e6

    out = [f"{'kind':<20}{a['program']:>12}{'baseline':>12}{'difference':>12}"]
    for kind in KINDS:
        out.append(f"{kind:<20}{per(a, kind):>12.3f}{per(b, kind):>12.3f}"
                   f"{per(a, kind) - per(b, kind):>+12.3f}")
    ta = a["total_us"] / a["devices"] / a["steps"] / 1e6
    tb = b["total_us"] / b["devices"] / b["steps"] / 1e6
    out.append(f"{'all ops':<20}{ta:>12.3f}{tb:>12.3f}{ta - tb:>+12.3f}")
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _common.parser(__doc__)
    p.add_argument("--mesh", default="fsdp=4,tensor=2", help="e.g. data=8 or fsdp=4,tensor=2")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--preset", default="20m")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--remat", default="dots", help="a remat policy, or 'preset'")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="steps traced")
    p.add_argument("--top", type=int, default=15, help="single ops listed")
    p.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temp dir)")
    p.add_argument("--baseline", action="store_true",
                   help="also trace bench_strategies.py's hand-written jax.jit step")
    return _common.parse_args(p, argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import meshpar as mp

    mp.emulate_devices(args.cpu_devices)  # before anything starts JAX's backend
    run = _common.Run(args, "profile_step.py")
    result = profile(mesh_text=args.mesh, preset=args.preset, batch_size=args.batch_size,
                     seq_len=args.seq_len, remat=None if args.remat == "preset" else args.remat,
                     strategy=args.strategy, warmup=args.warmup, steps=args.steps, top=args.top,
                     trace_dir=args.trace_dir, baseline=args.baseline)
    result["meta"] = run.meta()
    _common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
