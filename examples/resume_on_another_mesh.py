"""Train on one mesh, checkpoint, and continue on another: ``fsdp=8`` to ``data=2,tensor=4``.

A checkpoint stores the state in the model's own layout (``Trainer.checkpoint_state``), so it
does not depend on the mesh. Restoring takes a *target*: ``jax.ShapeDtypeStruct`` leaves that
carry the shardings wanted now, here those of a new trainer on another mesh. Run it::

    python examples/resume_on_another_mesh.py --steps 5
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence

import meshpar as mp

if __name__ == "__main__":
    mp.emulate_devices(8)  # 8 CPU devices; must happen before JAX starts its backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from meshpar.models import GPT, get_preset, lm_loss  # noqa: E402
from meshpar.train.checkpoint import Checkpointer, restore_target  # noqa: E402
from meshpar.train.data import TokenBatches  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Train, save, restore onto another mesh, check the values, train on; 0 on success."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-mesh", default="fsdp=8")
    p.add_argument("--from-strategy", default="zero3")
    p.add_argument("--to-mesh", default="data=2,tensor=4")
    p.add_argument("--to-strategy", default="tp")
    p.add_argument("--steps", type=int, default=5, help="steps before and after the move")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--dir", help="checkpoint directory (default: a new temporary one)")
    args = p.parse_args(argv)
    mp.emulate_devices(8)

    cfg = get_preset("tiny", layers=args.layers)
    data = TokenBatches(batch_size=args.batch_size, seq_len=args.seq_len, seed=0)

    def trainer_on(mesh_text, strategy):
        return mp.Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(3e-3), lm_loss,
                          mesh=mp.make_mesh(mesh_text), strategy=strategy)

    old = trainer_on(args.from_mesh, args.from_strategy)
    for s in range(args.steps):
        print(f"[{args.from_mesh}] step {s}  loss {old.step(data.batch(s))['loss']:.4f}")
    directory = args.dir or tempfile.mkdtemp(prefix="meshpar-resume-")
    try:
        return _move(old, trainer_on, directory, data, args)
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


def _move(old, trainer_on, directory, data, args) -> int:
    with Checkpointer(directory) as ckpt:
        ckpt.save(args.steps, old.checkpoint_state(), meta={"step": args.steps})
        ckpt.wait()
        saved = jax.device_get(old.checkpoint_state())

        new = trainer_on(args.to_mesh, args.to_strategy)
        # The target: shapes and dtypes of the state, with the *new* trainer's shardings.
        target = restore_target(new.checkpoint_target())
        state, meta = ckpt.restore(target)
    new.load_checkpoint_state(state)

    restored = jax.device_get(new.checkpoint_state())
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)))
    wq = new.state.params["blocks"]["wq"].get_value()
    print(f"restored step {meta['step']} from {directory} onto {args.to_mesh}: values "
          f"{'identical' if same else 'DIFFER'}; blocks/wq now {wq.sharding.spec}")

    # Both trainers now hold the same state: the next step gives the same loss on either mesh.
    step = args.steps
    after_old = old.step(data.batch(step))["loss"]
    after_new = new.step(data.batch(step))["loss"]
    print(f"step {step}: loss {after_old:.6f} on {args.from_mesh}, {after_new:.6f} on {args.to_mesh}")
    for s in range(step + 1, 2 * args.steps):
        print(f"[{args.to_mesh}] step {s}  loss {new.step(data.batch(s))['loss']:.4f}")
    return 0 if same and abs(after_old - after_new) < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
