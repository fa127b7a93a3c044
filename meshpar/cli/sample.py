"""``meshpar sample``: text from a ``meshpar train`` checkpoint, on any mesh."""

from __future__ import annotations

import argparse
import os

import jax
from flax import nnx

from meshpar.cli.args import mesh_and_strategy
from meshpar.cli.train import TOKENIZER_FILE, local_rows_of, make_optimizer
from meshpar.errors import CheckpointError
from meshpar.models import GPT, GPTConfig, lm_loss
from meshpar.train import TrainConfig, Trainer
from meshpar.train.checkpoint import Checkpointer
from meshpar.train.generate import generate
from meshpar.train.tokenizer import Tokenizer


def load_trainer(directory: str, args: argparse.Namespace, *, step: int | None = None) -> tuple[Trainer, dict]:
    """A trainer on ``args``' mesh holding the model of a ``meshpar train`` checkpoint.

    Raises:
        CheckpointError: no such directory, no complete checkpoint in it, or metadata that
            ``meshpar train`` did not write.

    Example::

        # "ckpt" written by `meshpar train --checkpoint-dir ckpt`:
        args = build_parser().parse_args(["sample", "--checkpoint-dir", "ckpt",
                                          "--prompt", "The", "--mesh", "data=8"])
        trainer, meta = load_trainer("ckpt", args)
        meta["model"]   # the GPTConfig fields the run trained
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"--checkpoint-dir {directory!r}: no such directory")
    checkpointer = Checkpointer(directory, keep=None)
    if checkpointer.latest_step() is None:
        raise CheckpointError(
            f"--checkpoint-dir {directory!r} holds no complete checkpoint (empty, or only partial "
            "saves); train with meshpar train --checkpoint-dir first"
        )
    step, meta = checkpointer.read_meta(step=step)
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"the checkpoint at step {step} in {directory!r} has no model "
                              "config in its metadata; it was not written by meshpar train")
    cfg = GPTConfig(**meta["model"])
    mesh, strategy = mesh_and_strategy(args)
    # The optimizer only shapes the state to restore into; its moments are read and unused.
    trainer = Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)),
                      make_optimizer(meta.get("lr", 1e-3), meta.get("steps", 1)), lm_loss,
                      mesh=mesh, strategy=strategy, config=TrainConfig(row_separable=True))
    state, _ = checkpointer.restore(trainer.checkpoint_target(), step=step)
    trainer.load_checkpoint_state(state)
    checkpointer.close()
    return trainer, meta


def sample_main(args: argparse.Namespace) -> int:
    """Run ``meshpar sample`` with parsed arguments; returns the exit status."""
    trainer, meta = load_trainer(args.checkpoint_dir, args, step=args.step)
    path = os.path.join(args.checkpoint_dir, TOKENIZER_FILE)
    data = meta.get("data") or {}
    saved = data.get("tokenizer", "bytes")
    if saved != "bytes" and not os.path.isfile(path):
        raise CheckpointError(f"the checkpoint was trained with the tokenizer "
                              f"{data.get('tokenizer_path')}, but {path} is missing")
    tokenizer = Tokenizer(path if saved != "bytes" else None)
    if tokenizer.fingerprint != saved:
        raise CheckpointError(f"{path} is not the tokenizer the checkpoint was trained with "
                              f"({data.get('tokenizer_path')}: {saved})")
    prompt = tokenizer.encode(args.prompt)
    ids = generate(trainer, prompt, max_tokens=args.max_tokens, seq_len=meta["model"]["seq_len"],
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                   local_rows=lambda batch: local_rows_of(batch, trainer))
    if jax.process_index() == 0:
        print(args.prompt + tokenizer.decode(ids), flush=True)
    return 0
