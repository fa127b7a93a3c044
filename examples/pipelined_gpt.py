"""A pipelined GPT: two stages on a ``pipe`` axis, the circular (interleaved) schedule.

The model does not change: its layer stack runs through ``meshpar.scan_layers``, and on a mesh
with a ``pipe`` axis the trainer runs that stack as pipeline stages (``shard_map`` + ``ppermute``),
each stage holding ``repeats`` chunks of layers. Run it::

    python examples/pipelined_gpt.py --steps 10 --compare     # --compare: same loss unpipelined
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import meshpar as mp

if __name__ == "__main__":
    mp.emulate_devices(8)  # 8 CPU devices; must happen before JAX starts its backend

import optax  # noqa: E402
from flax import nnx  # noqa: E402

from meshpar.models import GPT, get_preset, lm_loss  # noqa: E402
from meshpar.parallel.schedule import schedule_table  # noqa: E402
from meshpar.train.data import TokenBatches  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Train a GPT with a 2-stage circular pipeline; optionally check it against no pipeline."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="pipe=2,data=4")
    p.add_argument("--schedule", default="circular", choices=("gpipe", "circular"))
    p.add_argument("--repeats", type=int, default=2, help="layer chunks per stage (circular)")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--compare", action="store_true",
                   help="also train without a pipeline (data=8) and compare the losses")
    args = p.parse_args(argv)
    mp.emulate_devices(8)

    cfg = get_preset("tiny", layers=args.layers, d_model=args.d_model)
    repeats = args.repeats if args.schedule == "circular" else 1
    config = mp.TrainConfig(microbatches=args.microbatches, schedule=args.schedule,
                            repeats=repeats)

    def trainer_on(mesh_text, train_config):
        return mp.Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(3e-3), lm_loss,
                          mesh=mp.make_mesh(mesh_text), strategy="auto", config=train_config)

    trainer = trainer_on(args.mesh, config)
    pipe = trainer.pipeline
    print(f"{pipe.schedule}: {pipe.stages} stages x {pipe.repeats} repeat(s), "
          f"{pipe.microbatches} microbatches, {pipe.iterations} iterations, bubble fraction "
          f"{pipe.bubble_fraction:.3f}")
    print("microbatch per stage (rows) and iteration (columns), -1 = bubble:")
    print(schedule_table(pipe))
    data = TokenBatches(batch_size=args.batch_size, seq_len=args.seq_len, seed=0)
    losses = [trainer.step(data.batch(s))["loss"] for s in range(args.steps)]
    for s, loss in enumerate(losses):
        print(f"step {s:3d}  loss {loss:.4f}")
    ok = losses[-1] < losses[0]
    if args.compare:
        # The same model, optimizer and batches without a pipeline: the same losses, up to
        # float32 summation order.
        flat = trainer_on("data=8", mp.TrainConfig())
        ref = [flat.step(data.batch(s))["loss"] for s in range(args.steps)]
        worst = max(abs(a - b) for a, b in zip(losses, ref))
        print(f"largest loss difference to the unpipelined run: {worst:.2e}")
        ok = ok and worst < 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
