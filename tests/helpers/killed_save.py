"""``python tests/helpers/killed_save.py DIR [TRAIN FLAGS]``: a ``meshpar train`` run killed in
the middle of a save.

Builds exactly the trainer, data and metadata that ``meshpar train --preset tiny --batch-size 16
--steps 3 --checkpoint-dir DIR [TRAIN FLAGS]`` builds (same model, mesh, seed and optimizer;
extra flags such as ``--dropout 0.1`` are parsed by the real CLI parser), then:

1. runs step 0 and saves checkpoint 1 (waiting until it is complete);
2. runs step 1 and prints ``LOSS1 <json float>`` (what a resumed run must reproduce);
3. starts saving checkpoint 2 and SIGKILLs itself as soon as ``save()`` returns, i.e. while the
   asynchronous write is in flight. The saved state carries an extra 64 MB array so that the
   write reliably takes longer than the kill (the train state of the tiny model is ~3 MB).
"""

from __future__ import annotations

import json
import os
import signal
import sys

TRAIN_ARGS = ["train", "--preset", "tiny", "--batch-size", "16", "--steps", "3", "--no-progress"]


def main() -> int:
    directory = sys.argv[1]
    from meshpar.cli.args import build_parser, mesh_and_strategy, model_config
    from meshpar.backend.devices import emulate_devices

    args = build_parser().parse_args([*TRAIN_ARGS, *sys.argv[2:], "--checkpoint-dir", directory])
    emulate_devices(args.cpu_devices)

    import jax
    from flax import nnx

    from meshpar.train.checkpoint import Checkpointer
    from meshpar.train.data import TokenBatches
    from meshpar.models import GPT, lm_loss
    from meshpar.cli.train import _meta, make_optimizer
    from meshpar.train import TrainConfig, Trainer

    cfg = model_config(args)
    mesh, strategy = mesh_and_strategy(args)
    config = TrainConfig(microbatches=args.microbatches, precision=args.precision,
                         schedule=args.schedule, repeats=args.repeats, row_separable=True)
    trainer = Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(args.seed)), make_optimizer(args.lr, args.steps),
                      lm_loss, mesh=mesh, strategy=strategy, config=config)
    data = TokenBatches(batch_size=args.batch_size, seq_len=cfg.seq_len, seed=args.seed)
    ckpt = Checkpointer(directory, keep=args.keep_checkpoints)

    trainer.step(data.batch(0))
    ckpt.save(1, trainer.checkpoint_state(), meta=_meta(args, cfg, mesh, strategy, 1))
    ckpt.wait()
    print("SAVED 1", flush=True)
    loss1 = trainer.step(data.batch(1))["loss"]
    print(f"LOSS1 {json.dumps(loss1)}", flush=True)

    big = jax.random.normal(jax.random.key(0), (4096, 4096))  # 64 MB: the write takes a while
    state = {**trainer.checkpoint_state(), "pad": big}
    ckpt.save(2, state, meta=_meta(args, cfg, mesh, strategy, 2))
    os.kill(os.getpid(), signal.SIGKILL)  # mid-write: only <DIR>/2.orbax-checkpoint-tmp exists
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
