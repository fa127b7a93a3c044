"""``python -m tests.helpers.dist_check``: a small multi-process smoke test, run by ``meshpar launch``.

Each process connects with :func:`meshpar.backend.distributed.initialize` (settings from the
environment), builds a mesh over the devices of *all* processes, feeds its own rows of a
deterministic global batch, and computes position-sensitive reductions under ``jit``. Process 0
prints one ``RESULT {json}`` line; the numbers are small integers in float32, so runs with any
process count must print exactly the same line. It also checks that the assembled global array
equals the batch (``LAYOUT ok``), repeats the computation on a mesh whose devices alternate between
processes (non-contiguous rows per process), and with ``--checkpoint DIR`` saves and restores the
array through :class:`meshpar.train.checkpoint.Checkpointer` from every process.

``--die-after S --die-rank R`` makes process ``R`` end itself ``S`` seconds after the computation
(``--die-how exit``: ``os._exit(1)``; ``kill``: SIGKILL) while the others keep running collectives,
to exercise failure handling.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.helpers.dist_check")
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=2")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--checkpoint", default=None, metavar="DIR")
    p.add_argument("--die-after", type=float, default=None, metavar="S")
    p.add_argument("--die-rank", type=int, default=1)
    p.add_argument("--die-how", choices=("exit", "kill"), default="kill")
    p.add_argument("--linger", type=float, default=120.0, metavar="S",
                   help="with --die-after: how long the survivors keep running collectives")
    return p


def _interleaved(devices, chunk):
    """Devices taken ``chunk`` at a time from each process in turn (p0 p0 p1 p1 p0 p0 ...).

    With ``chunk`` = the tensor size, consecutive batch blocks belong to different processes,
    so each process's rows are not one contiguous block.
    """
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    groups = [by_process[k] for k in sorted(by_process)]
    out = []
    for start in range(0, len(groups[0]), chunk):
        for group in groups:
            out.extend(group[start:start + chunk])
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from meshpar.backend import distributed

    if os.environ.get(distributed.ENV_NUM_PROCESSES):
        print("initializing jax.distributed", flush=True)  # tests time the init from here
        distributed.initialize()
    elif os.environ.get(distributed.ENV_CPU_DEVICES):
        from meshpar.backend.devices import emulate_devices

        emulate_devices(int(os.environ[distributed.ENV_CPU_DEVICES]))

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    from meshpar.mesh import make_mesh, parse_mesh

    me, count = jax.process_index(), jax.process_count()
    print(f"process {me}/{count}: {jax.local_device_count()} local of {jax.device_count()} devices",
          flush=True)
    batch = ((np.arange(args.rows * args.cols) % 17) - 8).astype(np.float32)
    batch = batch.reshape(args.rows, args.cols)
    axes = parse_mesh(args.mesh)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in axes)
    spec = P(batch_axes or None, "tensor" if "tensor" in axes else None)

    def reduce(x):
        rows = jnp.arange(x.shape[0], dtype=x.dtype)[:, None]
        return {
            "total": x.sum(),
            "row_weighted": (x * rows).sum(axis=0),  # wrong row order changes this
            "sq_by_col": (x * x).sum(axis=0),
        }

    results = {}
    for name, devices in (("default", jax.devices()), ("interleaved", _interleaved(jax.devices(), axes.get("tensor", 1)))):
        mesh = make_mesh(axes, devices=devices)
        sharding = NamedSharding(mesh, spec)
        local = distributed.local_slice(batch, sharding)
        x = distributed.global_batch_from_local(local, sharding)
        gathered = multihost_utils.process_allgather(x, tiled=True)
        if not np.array_equal(np.asarray(gathered), batch):
            print(f"LAYOUT MISMATCH on the {name} mesh", flush=True)
            return 1
        # Replicated outputs: every process can read them (a sharded one would span processes).
        out = jax.jit(reduce, out_shardings=NamedSharding(mesh, P()))(x)
        out = jax.tree.map(lambda v: np.asarray(v).tolist(), out)
        results[name] = out
        rows = distributed.local_slice(np.arange(args.rows), NamedSharding(mesh, P(batch_axes or None)))
        print(f"LAYOUT ok {name}: local block {local.shape}, rows {rows.tolist()}", flush=True)
    if results["default"] != results["interleaved"]:
        print("MISMATCH between the default and interleaved meshes", flush=True)
        return 1

    if args.checkpoint:
        from meshpar.train.checkpoint import Checkpointer, restore_target

        mesh = make_mesh(axes)
        x = distributed.global_batch_from_local(
            distributed.local_slice(batch, NamedSharding(mesh, spec)), NamedSharding(mesh, spec))
        with Checkpointer(args.checkpoint) as ckpt:
            ckpt.save(1, {"x": x}, meta={"processes": count})
            ckpt.wait()
            other = NamedSharding(mesh, P(None, tuple(axes)))  # columns over every device
            state, meta = ckpt.restore(restore_target({"x": x}, other))
        back = multihost_utils.process_allgather(state["x"], tiled=True)
        if not np.array_equal(np.asarray(back), batch) or meta != {"processes": count}:
            print("CHECKPOINT MISMATCH", flush=True)
            return 1
        print("CHECKPOINT ok", flush=True)

    if distributed.is_main_process():
        print("RESULT " + json.dumps(results["default"], sort_keys=True), flush=True)

    if args.die_after is not None:
        if me == args.die_rank:
            time.sleep(args.die_after)
            print(f"process {me} ending itself ({args.die_how})", flush=True)
            if args.die_how == "exit":
                os._exit(1)
            os.kill(os.getpid(), signal.SIGKILL)
        # The survivors keep doing cross-process collectives, as a training loop would.
        mesh = make_mesh(axes)
        x = distributed.global_batch_from_local(
            distributed.local_slice(batch, NamedSharding(mesh, spec)), NamedSharding(mesh, spec))
        step = jax.jit(reduce, out_shardings=NamedSharding(mesh, P()))
        end = time.monotonic() + args.linger
        while time.monotonic() < end:
            step(x)["total"].block_until_ready()
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
