"""``meshpar train``: the built-in GPT on the embedded corpus, with any mesh and strategy."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

from meshpar.axes import TENSOR
from meshpar.backend.distributed import local_slice
from meshpar.cli.args import mesh_and_strategy, model_config
from meshpar.cli.plan import apply_auto_layout
from meshpar.errors import CheckpointError, MeshparError, UsageError
from meshpar.keypath import path_str
from meshpar.mesh import format_mesh
from meshpar.models import GPT, lm_loss
from meshpar.train import TrainConfig, Trainer
from meshpar.train.checkpoint import Checkpointer
from meshpar.train.data import TokenBatches, load_corpus, unigram_entropy


def make_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, and global-norm clipping at 1.0."""
    warmup = max(1, min(20, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def _check_args(args: argparse.Namespace, cfg) -> None:
    for flag in ("steps", "batch_size", "microbatches", "repeats", "keep_checkpoints"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every {args.checkpoint_every}: must be >= 0")
    if (args.resume or args.checkpoint_every) and not args.checkpoint_dir:
        raise UsageError("--resume and --checkpoint-every need --checkpoint-dir")
    if not args.lr > 0:
        raise UsageError(f"--lr {args.lr}: must be > 0")
    if cfg.vocab_size < 256:
        raise UsageError(
            f"--vocab-size {cfg.vocab_size}: the embedded corpus is byte-level and needs >= 256"
        )


def train_main(args: argparse.Namespace) -> int:
    """Run ``meshpar train`` with parsed arguments; returns the exit status."""
    if args.layout == "auto":
        apply_auto_layout(args)
    cfg = model_config(args)
    _check_args(args, cfg)
    mesh, strategy = mesh_and_strategy(args)
    seq_len = cfg.seq_len
    if strategy.sequence_parallel and TENSOR in mesh.shape and seq_len % mesh.shape[TENSOR]:
        raise MeshparError(
            f"--seq-len {seq_len} is not divisible by tensor={mesh.shape[TENSOR]}, which "
            "sequence parallel splits it over; choose a multiple"
        )
    for name, size in (("--heads", cfg.heads), ("--mlp-dim", cfg.mlp_dim)):
        if TENSOR in mesh.shape and size % mesh.shape[TENSOR]:
            raise MeshparError(
                f"{name} {size} is not divisible by tensor={mesh.shape[TENSOR]}, which tensor "
                "parallel splits it over; choose a multiple or a smaller tensor axis"
            )
    config = TrainConfig(
        microbatches=args.microbatches, precision=args.precision,
        on_nonfinite="skip" if args.skip_nonfinite else "raise",
        schedule=args.schedule, repeats=args.repeats,
        # lm_loss is a mean over equal-length rows and the GPT computes each row on its own.
        row_separable=True,
    )
    strategy.check_batch(mesh, args.batch_size, microbatches=args.microbatches)
    data = TokenBatches(batch_size=args.batch_size, seq_len=seq_len, seed=args.seed)
    trainer = Trainer(
        lambda: GPT(cfg, rngs=nnx.Rngs(args.seed)), make_optimizer(args.lr, args.steps), lm_loss,
        mesh=mesh, strategy=strategy, config=config,
        # Traced now, so that every fallback is printed below before the first step.
        example_batch=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), data.batch(0)),
    )
    main_process = jax.process_index() == 0
    checkpointer, start = _open_checkpoints(args, trainer, cfg, mesh, strategy)
    entropy = unigram_entropy(load_corpus())
    if main_process:
        print(
            f"meshpar train: GPT {cfg.param_count():,} params ({cfg.layers} layers, d={cfg.d_model}),"
            f" mesh {format_mesh(mesh)} on {jax.device_count()} {jax.devices()[0].platform} "
            f"devices, strategy {strategy.describe(mesh)}, batch {args.batch_size}x{seq_len}, "
            f"{args.microbatches} microbatch(es), {args.precision}"
            + (f", dropout {cfg.dropout}" if cfg.dropout else "")
            + (f", pipeline {trainer.pipeline.schedule} x{trainer.pipeline.stages} stages "
               f"(bubble {trainer.pipeline.bubble_fraction:.1%})" if trainer.pipeline else "")
            + "; corpus unigram entropy "
            f"{entropy:.3f} nats",
            flush=True,
        )
        for fallback in trainer.fallbacks:
            print(f"  note: {fallback}", flush=True)
    metrics_file = open(args.metrics_file, "w") if args.metrics_file and main_process else None
    bar = None
    if main_process and not args.no_progress:
        from tqdm import tqdm  # lazy: only a run that draws a progress bar needs it

        bar = tqdm(total=args.steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    tokens_per_step = args.batch_size * seq_len
    losses = []
    t0 = time.perf_counter()
    try:
        if bar is not None:
            bar.update(start)
        for step in range(start, args.steps):
            batch = data.batch(step)
            m = trainer.step(_local_rows(batch, trainer))
            losses.append(m["loss"])
            record = metrics_record(step, m, tokens_per_step)
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                bar.update(1)
            done = step + 1
            if checkpointer and (done == args.steps or (args.checkpoint_every and done % args.checkpoint_every == 0)):
                checkpointer.save(done, trainer.checkpoint_state(), meta=_meta(args, cfg, mesh, strategy, done))
    finally:
        if checkpointer:
            checkpointer.close()  # waits for the last asynchronous save
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()
    elapsed = time.perf_counter() - t0
    if main_process and losses:
        tail = losses[-min(10, len(losses)):]
        final = float(np.mean(tail))
        print(
            f"done: {args.steps - start} steps in {elapsed:.1f} s; loss {losses[0]:.3f} -> {final:.3f} "
            f"(mean of last {len(tail)}), {final / entropy:.2f}x the unigram entropy "
            f"{entropy:.3f}; {tokens_per_step * (args.steps - start) / elapsed:,.0f} tokens/s",
            flush=True,
        )
    return 0


def metrics_record(step: int, metrics: dict, tokens_per_step: int) -> dict:
    """One ``--metrics-file`` line: ``step``, ``loss``, ``grad_norm``, ``step_time_s``,
    ``tokens_per_s``, ``skipped``; ``loss_weight`` when the loss is a ``Ratio``; and each aux
    value (``metrics["aux"]``, see :meth:`Trainer.step`) as ``aux/<path>``: a float, or a
    (nested) list for an array.

    Example:
        >>> m = {"loss": 2.5, "grad_norm": 0.5, "step_time_s": 0.1, "skipped": False,
        ...      "loss_weight": 480.0, "aux": {"acc": 0.25, "per_layer": np.array([1.0, 2.0])}}
        >>> {k: v for k, v in metrics_record(3, m, 512).items() if k[:3] in ("los", "aux")}
        {'loss': 2.5, 'loss_weight': 480.0, 'aux/acc': 0.25, 'aux/per_layer': [1.0, 2.0]}
    """
    record = {
        "step": step, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
        "step_time_s": metrics["step_time_s"],
        "tokens_per_s": tokens_per_step / metrics["step_time_s"], "skipped": metrics["skipped"],
    }
    if "loss_weight" in metrics:
        record["loss_weight"] = float(metrics["loss_weight"])
    for path, value in jax.tree_util.tree_flatten_with_path(metrics.get("aux", {}))[0]:
        value = np.asarray(value)
        name = path_str(path)
        record["aux/" + name if name else "aux"] = (
            float(value) if value.ndim == 0 else value.astype(float).tolist()
        )
    return record


def _local_rows(batch, trainer):
    """This process's rows of a global host batch (all of it in a single process)."""
    if jax.process_count() == 1:
        return batch
    return local_slice(batch, {k: trainer.batch_sharding(v.ndim) for k, v in batch.items()})


# Settings that must match for a resumed run to continue the same run exactly.
_RESUME_KEYS = ("seed", "batch_size", "seq_len")


def _meta(args, cfg, mesh, strategy, step: int) -> dict:
    return {
        "step": step, "data_step": step, "seed": args.seed, "batch_size": args.batch_size,
        "seq_len": cfg.seq_len, "steps": args.steps, "lr": args.lr,
        "model": dataclasses.asdict(cfg), "mesh": format_mesh(mesh), "strategy": strategy.name,
        "zero_stage": strategy.zero_stage,
    }


# GPTConfig fields that change how the model computes, not what its parameters are.
_COMPUTE_ONLY = ("remat",)


def _open_checkpoints(args, trainer, cfg, mesh, strategy):
    """The checkpointer (or None) and the step to start from (restoring if --resume)."""
    if not args.checkpoint_dir:
        return None, 0
    if os.path.exists(args.checkpoint_dir) and not os.path.isdir(args.checkpoint_dir):
        raise CheckpointError(f"--checkpoint-dir {args.checkpoint_dir!r} is a file, not a directory")
    if args.resume and not os.path.isdir(args.checkpoint_dir):
        raise CheckpointError(f"--resume: checkpoint directory {args.checkpoint_dir!r} does not exist")
    checkpointer = Checkpointer(args.checkpoint_dir, keep=args.keep_checkpoints)
    if not args.resume:
        if checkpointer.latest_step() is not None:
            raise CheckpointError(
                f"{args.checkpoint_dir!r} already holds checkpoints (latest step "
                f"{checkpointer.latest_step()}); pass --resume to continue that run, or use "
                "another directory"
            )
        return checkpointer, 0
    if checkpointer.latest_step() is None:
        raise CheckpointError(
            f"--resume: no complete checkpoint in {args.checkpoint_dir!r} (empty, or only "
            "partial saves, which are ignored)"
        )
    # The metadata first: a different model is named by its config, before any array is read.
    step, meta = checkpointer.read_meta()
    if not isinstance(meta.get("step"), int) or meta["step"] != step:
        raise CheckpointError(
            f"--resume: checkpoint step {step} has no valid 'step' in its metadata "
            f"({meta.get('step')!r}); it was not written by meshpar train"
        )
    saved = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    if saved:
        # A field added to GPTConfig after the checkpoint was written (dropout) has its default.
        saved = {f.name: f.default for f in dataclasses.fields(cfg)
                 if f.default is not dataclasses.MISSING and f.name not in saved} | saved
    differ = ", ".join(
        f"{k}={saved.get(k)!r} there, {getattr(cfg, k)!r} here"
        for k in dataclasses.asdict(cfg)
        if k not in _COMPUTE_ONLY and saved.get(k) != getattr(cfg, k)
    )
    if differ:
        detail = ""
        try:  # name the first parameter whose shape differs too (no array is read)
            checkpointer.restore(trainer.checkpoint_target(), step=step)
        except CheckpointError as err:
            detail = f": {err}"
        raise CheckpointError(
            f"--resume: the checkpoint at step {step} is of a different model ({differ}){detail}"
        )
    for key in _RESUME_KEYS:
        here = cfg.seq_len if key == "seq_len" else getattr(args, key)
        if meta.get(key) != here:
            raise CheckpointError(
                f"--resume: --{key.replace('_', '-')} {here} differs from the checkpoint's "
                f"{meta.get(key)}; an exact resume needs the same value"
            )
    state, _ = checkpointer.restore(trainer.checkpoint_target(), step=step)
    trainer.load_checkpoint_state(state)
    if jax.process_index() == 0:
        print(f"resumed from step {step} (saved on mesh {meta.get('mesh')}, strategy "
              f"{meta.get('strategy')})", flush=True)
        if (meta.get("steps"), meta.get("lr")) != (args.steps, args.lr):
            print(
                f"note: --steps/--lr ({args.steps}, {args.lr}) differ from the saved run's "
                f"({meta.get('steps')}, {meta.get('lr')}); the learning-rate schedule changes, so "
                "this resume does not reproduce an uninterrupted run", flush=True,
            )
        if step >= args.steps:
            print(f"the checkpoint is at step {step} >= --steps {args.steps}: nothing to train", flush=True)
    return checkpointer, step
