"""``meshpar train``: the built-in GPT on the embedded corpus or your own files, with any mesh and
strategy; held-out evaluation, TensorBoard, a learning-rate schedule and a sample at the end.

Length: about 440 lines, one concept (the ``meshpar train`` command): the run loop, its checks,
the metrics record and opening/validating checkpoints for ``--resume``, which most of it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from meshpar.axes import DILOCO, TENSOR
from meshpar.backend.allocator import describe_heap, keep_freed_memory
from meshpar.backend.bf16 import describe_bf16_dots
from meshpar.backend.distributed import local_slice
from meshpar.cli.args import build_parser, diloco_config, mesh_and_strategy, model_config
from meshpar.cli.config import effective_config, write_effective
from meshpar.cli.data import build_data, check_resume_data
from meshpar.cli.tensorboard import TensorBoard
from meshpar.cli.plan import apply_auto_layout
from meshpar.errors import CheckpointError, MeshparError, UsageError
from meshpar.keypath import path_str
from meshpar.mesh import format_mesh
from meshpar.models import GPT, lm_loss
from meshpar.train import TrainConfig, Trainer
from meshpar.train.checkpoint import Checkpointer
from meshpar.train.diloco import DiLoCoTrainer
from meshpar.train.generate import generate
from meshpar.train.lr import LRSchedule, default_warmup, lr_schedule


def make_optimizer(lr: float, steps: int, *, schedule: LRSchedule | str = LRSchedule.COSINE,
                   warmup: int | None = None) -> optax.GradientTransformation:
    """AdamW on ``schedule`` (linear warm-up, then cosine/linear decay to lr/10, or constant),
    with global-norm clipping at 1.0; ``warmup=None`` is :func:`~meshpar.train.lr.default_warmup`.

    Example:
        >>> tx = make_optimizer(5e-3, 300, schedule="linear", warmup=10)
    """
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(_schedule(lr, steps, schedule, warmup), weight_decay=0.01))


def _schedule(lr, steps, schedule=LRSchedule.COSINE, warmup=None) -> optax.Schedule:
    warmup = default_warmup(steps) if warmup is None else warmup
    return lr_schedule(LRSchedule(schedule), peak=lr, steps=steps, warmup=warmup)


def _check_args(args: argparse.Namespace, cfg) -> None:
    for flag in ("steps", "batch_size", "microbatches", "repeats", "keep_checkpoints"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every {args.checkpoint_every}: must be >= 0")
    if args.sample_tokens < 0:
        raise UsageError(f"--sample-tokens {args.sample_tokens}: must be >= 0")
    if (args.resume or args.checkpoint_every) and not args.checkpoint_dir:
        raise UsageError("--resume and --checkpoint-every need --checkpoint-dir")
    if not args.lr > 0:
        raise UsageError(f"--lr {args.lr}: must be > 0")
    if (args.warmup_steps is not None and args.lr_schedule != LRSchedule.CONSTANT.value
            and args.warmup_steps >= args.steps):
        raise UsageError(
            f"--warmup-steps {args.warmup_steps} must be below --steps {args.steps} for a "
            f"{args.lr_schedule} decay after it (or use --lr-schedule constant)"
        )
    _schedule(args.lr, args.steps, args.lr_schedule, args.warmup_steps)  # raises on bad values


def _batch_rows(mesh, strategy, batch_size: int, *, diloco: bool = False) -> np.ndarray:
    """The positions of this process's rows in a global batch (all of them in one process);
    a DiLoCo run splits the batch over ``diloco`` first (see ``DiLoCoTrainer.batch_sharding``)."""
    axes = ((DILOCO,) if diloco else ()) + strategy.batch_axes(mesh)
    sharding = NamedSharding(mesh, PartitionSpec(axes if axes else None, None))
    return local_slice(np.arange(batch_size)[:, None], sharding)[:, 0]


def _write_config(args, main_process: bool) -> None:
    """The effective configuration beside the checkpoints, the metrics and the event files."""
    if not main_process:
        return
    config = effective_config(args, build_parser())
    places = []
    if args.checkpoint_dir:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        places.append(os.path.join(args.checkpoint_dir, "config.toml"))
    if args.metrics_file:
        places.append(os.path.splitext(args.metrics_file)[0] + ".config.toml")
    if args.tensorboard:
        os.makedirs(args.tensorboard, exist_ok=True)
        places.append(os.path.join(args.tensorboard, "config.toml"))
    for place in places:
        write_effective(place, config, command="train")


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
        schedule=args.schedule, repeats=args.repeats, pipeline_remat=args.pipeline_remat,
        # lm_loss is a mean over equal-length rows and the GPT computes each row on its own.
        row_separable=True,
    )
    diloco = diloco_config(args, mesh)
    replicas = mesh.shape[DILOCO] if diloco is not None else None
    if replicas is not None and (args.eval_every or args.eval_data):
        raise UsageError(
            "--eval-every/--eval-data: held-out evaluation of a DiLoCo run (a diloco mesh axis) "
            "is not built yet; evaluate its checkpoint's shared parameters after the run"
        )
    if replicas is None:
        strategy.check_batch(mesh, args.batch_size, microbatches=args.microbatches)
    # The data before the model: a bad file or vocabulary is reported before anything compiles.
    data = build_data(args, vocab_size=cfg.vocab_size, seq_len=seq_len,
                      batch_rows=_batch_rows(mesh, strategy, args.batch_size,
                                             diloco=replicas is not None),
                      local_rows=lambda batch: local_rows_of(batch, trainer))
    if args.resume and args.checkpoint_dir and os.path.isdir(args.checkpoint_dir):
        saved = Checkpointer(args.checkpoint_dir, keep=None)
        if saved.latest_step() is not None:  # other data is refused before anything compiles
            saved_step, saved_meta = saved.read_meta()
            check_resume_data(saved_meta.get("data"), data.spec, saved_step)
    schedule = _schedule(args.lr, args.steps, args.lr_schedule, args.warmup_steps)
    make_model = lambda: GPT(cfg, rngs=nnx.Rngs(args.seed))  # noqa: E731
    tx = make_optimizer(args.lr, args.steps, schedule=args.lr_schedule, warmup=args.warmup_steps)
    if replicas is not None:
        trainer = DiLoCoTrainer(make_model, tx, lm_loss, mesh=mesh, strategy=strategy,
                                config=config, diloco=diloco)
        trainer.check_batch(args.batch_size)
    else:
        trainer = Trainer(
            make_model, tx, lm_loss, mesh=mesh, strategy=strategy, config=config,
            # Traced now, so that every fallback is printed below before the first step.
            example_batch={key: jax.ShapeDtypeStruct((args.batch_size, seq_len), np.int32)
                           for key in ("inputs", "targets")},
        )
    main_process = jax.process_index() == 0
    checkpointer, start, meta = _open_checkpoints(args, trainer, cfg, mesh, strategy)
    data.start(start, (meta or {}).get("data_iterator"))
    _write_config(args, main_process)
    if checkpointer and data.tokenizer.path and main_process:
        # The checkpoint carries its tokenizer: `meshpar sample` needs nothing else.
        shutil.copyfile(data.tokenizer.path, os.path.join(args.checkpoint_dir, TOKENIZER_FILE))
    if main_process:
        print(
            f"meshpar train: GPT {cfg.param_count():,} params ({cfg.layers} layers, d={cfg.d_model}),"
            f" mesh {format_mesh(mesh)} on {jax.device_count()} {jax.devices()[0].platform} "
            f"devices, strategy {strategy.describe(mesh)}, batch {args.batch_size}x{seq_len}, "
            f"{args.microbatches} microbatch(es), {args.precision}"
            + (f", dropout {cfg.dropout}" if cfg.dropout else "")
            + (f", pipeline {trainer.pipeline.schedule} x{trainer.pipeline.stages} stages "
               f"(bubble {trainer.pipeline.bubble_fraction:.1%})"
               if getattr(trainer, "pipeline", None) else "")
            + (f", DiLoCo {replicas} replicas x {args.inner_steps} inner steps"
               f" ({args.streaming_fragments} fragment(s), outer SGD lr {args.outer_lr}"
               f" momentum {args.outer_momentum}, {args.diloco_reduce} reduction)"
               if replicas is not None else "")
            + f"; data: {data.describe()}",
            flush=True,
        )
        for fallback in trainer.fallbacks:
            print(f"  note: {fallback}", flush=True)
        if args.precision == "bf16":
            print(f"  note: {describe_bf16_dots()}", flush=True)
        if jax.default_backend() == "cpu":
            # What the Trainer did to malloc (cached: this call changes nothing more).
            print(f"  note: {describe_heap(keep_freed_memory())}", flush=True)
    metrics_file = open(args.metrics_file, "w") if args.metrics_file and main_process else None
    board = TensorBoard(args.tensorboard) if args.tensorboard and main_process else None
    bar = None
    if main_process and not args.no_progress:
        from tqdm import tqdm  # lazy: only a run that draws a progress bar needs it

        bar = tqdm(total=args.steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    tokens_per_step = args.batch_size * seq_len
    losses, last_eval = [], None
    t0 = time.perf_counter()
    try:
        if bar is not None:
            bar.update(start)
        for step in range(start, args.steps):
            batch = data.next_batch(step)
            m = trainer.step(batch)
            losses.append(m["loss"])
            record = metrics_record(step, m, tokens_per_step)
            if replicas is not None:
                comm = trainer.communication()
                # Bytes each device sent over diloco at this step (0 between synchronisations),
                # the average per step, and what data parallelism over that axis would send.
                record.update(diloco_bytes=trainer.sync_bytes(step + 1),
                              diloco_bytes_per_step=comm.per_step, dp_bytes_per_step=comm.dp_per_step)
            record["lr"] = float(schedule(step))
            done = step + 1
            if data.eval is not None and (done % args.eval_every == 0 or done == args.steps):
                last_eval = evaluate(trainer, data.eval_iter())
                record["eval_loss"], record["eval_perplexity"] = last_eval
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if board is not None:
                board.write(record)
            if bar is not None:
                postfix = {"loss": f"{m['loss']:.3f}", "tok_s": f"{record['tokens_per_s']:,.0f}"}
                if last_eval is not None:
                    postfix.update(eval=f"{last_eval[0]:.3f}", ppl=f"{last_eval[1]:.2f}")
                bar.set_postfix(postfix)
                bar.update(1)
            if checkpointer and (done == args.steps or (args.checkpoint_every and done % args.checkpoint_every == 0)):
                meta = _meta(args, cfg, mesh, strategy, done, data=data)
                if replicas is not None:
                    meta.update(trainer.checkpoint_meta())
                checkpointer.save(done, trainer.checkpoint_state(), meta=meta)
    finally:
        if checkpointer:
            checkpointer.close()  # waits for the last asynchronous save
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()
        if board is not None:
            board.close()
    elapsed = time.perf_counter() - t0
    entropy = data.entropy
    if main_process and losses:
        tail = losses[-min(10, len(losses)):]
        final = float(np.mean(tail))
        print(
            f"done: {args.steps - start} steps in {elapsed:.1f} s; loss {losses[0]:.3f} -> {final:.3f} "
            f"(mean of last {len(tail)}), {final / entropy:.2f}x the unigram entropy "
            f"{entropy:.3f}; {tokens_per_step * (args.steps - start) / elapsed:,.0f} tokens/s"
            + (f"; eval loss {last_eval[0]:.3f}, perplexity {last_eval[1]:.2f}" if last_eval else ""),
            flush=True,
        )
    if args.sample_tokens and start < args.steps and replicas is not None:
        if main_process:
            print("sample: skipped (a DiLoCo run: its replicas hold different parameters until "
                  "they synchronise; sample from the checkpoint's shared parameters)", flush=True)
    elif args.sample_tokens and start < args.steps:
        ids = generate(trainer, data.prompt, max_tokens=args.sample_tokens, seq_len=seq_len,
                       local_rows=data.local_rows)
        if main_process:
            print(f"sample: {data.tokenizer.decode(data.prompt)!r} -> "
                  f"{data.tokenizer.decode(ids)!r}", flush=True)
    return 0


def evaluate(trainer: Trainer, batches) -> tuple[float, float]:
    """``(loss, perplexity)`` on held-out batches: the mean of ``lm_loss`` over them (equal-sized
    batches: the mean over all their tokens), forward only, on the trainer's mesh.

    Example:
        >>> import math
        >>> import optax
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset, lm_loss
        >>> from meshpar.train import Trainer
        >>> from meshpar.train.data import TokenBatches
        >>> trainer = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
        ...                   optax.adamw(1e-3), lm_loss, mesh=make_mesh(data=8))
        >>> held_out = TokenBatches(batch_size=8, seq_len=32, seed=1)
        >>> loss, ppl = evaluate(trainer, [held_out.batch(0), held_out.batch(1)])
        >>> 5.0 < loss < 6.0, math.isclose(ppl, math.exp(loss))   # untrained: about ln 256
        (True, True)
    """
    losses = [float(trainer.evaluate(lm_loss, batch)) for batch in batches]
    loss = float(np.mean(losses))
    return loss, float(np.exp(loss))


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


def local_rows_of(batch, trainer):
    """This process's rows of a global host batch (all of it in a single process).

    Example::

        # In every process of a job, each feeding its own rows of the same global batch:
        metrics = trainer.step(local_rows_of(data.batch(step), trainer))
    """
    if jax.process_count() == 1:
        return batch
    return local_slice(batch, {k: trainer.batch_sharding(v.ndim) for k, v in batch.items()})


# Settings that must match for a resumed run to continue the same run exactly.
_RESUME_KEYS = ("seed", "batch_size", "seq_len")


#: The tokenizer file a checkpoint directory carries (copied from --tokenizer).
TOKENIZER_FILE = "tokenizer.json"


def _meta(args, cfg, mesh, strategy, step: int, *, data=None) -> dict:
    meta = {
        "step": step, "data_step": step, "seed": args.seed, "batch_size": args.batch_size,
        "seq_len": cfg.seq_len, "steps": args.steps, "lr": args.lr,
        "lr_schedule": getattr(args, "lr_schedule", "cosine"),
        "warmup_steps": getattr(args, "warmup_steps", None),
        "model": dataclasses.asdict(cfg), "mesh": format_mesh(mesh), "strategy": strategy.name,
        "zero_stage": strategy.zero_stage,
    }
    if data is not None:
        # The Grain iterator's position (None for the embedded corpus, which is addressed by
        # step): a resume continues with the batches an uninterrupted run would have read.
        meta["data"] = data.spec
        meta["data_iterator"] = data.iterator_state()
    return meta


# GPTConfig fields that change how the model computes, not what its parameters are.
_COMPUTE_ONLY = ("remat",)


def _open_checkpoints(args, trainer, cfg, mesh, strategy):
    """The checkpointer (or None), the step to start from (restoring if --resume) and the
    restored checkpoint's metadata (None without --resume)."""
    if not args.checkpoint_dir:
        return None, 0, None
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
        return checkpointer, 0, None
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
    saved_diloco = meta.get("diloco")
    if isinstance(trainer, DiLoCoTrainer):
        trainer.restore(checkpointer, step=step)
        if jax.process_index() != 0:
            pass
        elif not saved_diloco:
            print(f"note: the checkpoint is of a run without {DILOCO}: every replica starts from "
                  "its parameters and optimizer state, the outer optimizer starts fresh",
                  flush=True)
        elif saved_diloco.get("replicas") != trainer.replicas:
            print(f"note: the checkpoint has {saved_diloco.get('replicas')} DiLoCo replicas, this "
                  f"run {trainer.replicas}: every replica restarts from the shared parameters of "
                  "the last synchronisation (work since then is dropped)", flush=True)
    elif saved_diloco:
        raise CheckpointError(
            f"--resume: the checkpoint at step {step} is of a DiLoCo run "
            f"({DILOCO}={saved_diloco.get('replicas')}, --inner-steps "
            f"{saved_diloco.get('inner_steps')}) and this mesh has no {DILOCO} axis. Resume it "
            f"with a {DILOCO} axis of any size (e.g. --mesh {DILOCO}=1,{args.mesh} --inner-steps "
            f"{saved_diloco.get('inner_steps')}), or convert it to a plain checkpoint: restore it "
            "with mp.DiLoCoTrainer(...).restore(checkpointer) and save "
            "trainer.plain_checkpoint_state() (the shared parameters, the replicas' mean "
            "optimizer state) in a new directory"
        )
    else:
        state, _ = checkpointer.restore(trainer.checkpoint_target(), step=step)
        trainer.load_checkpoint_state(state)
    if jax.process_index() == 0:
        print(f"resumed from step {step} (saved on mesh {meta.get('mesh')}, strategy "
              f"{meta.get('strategy')})", flush=True)
        here = (args.steps, args.lr, args.lr_schedule, args.warmup_steps)
        there = (meta.get("steps"), meta.get("lr"), meta.get("lr_schedule", "cosine"),
                 meta.get("warmup_steps"))
        if here != there:
            print(
                f"note: --steps/--lr/--lr-schedule/--warmup-steps {here} differ from the saved "
                f"run's {there}; the learning-rate schedule changes, so this resume does not "
                "reproduce an uninterrupted run", flush=True,
            )
        if step >= args.steps:
            print(f"the checkpoint is at step {step} >= --steps {args.steps}: nothing to train", flush=True)
    return checkpointer, step, meta
