"""The ``meshpar`` command's arguments: the parser, and the model, mesh and strategy they
describe."""

from __future__ import annotations

import argparse
import dataclasses

import optax
from jax.sharding import Mesh

from meshpar.axes import DILOCO, PIPE
from meshpar.errors import UsageError
from meshpar.mesh import make_mesh, parse_mesh
from meshpar.models import GPTConfig, get_preset
from meshpar.parallel.schedule import SCHEDULES
from meshpar.sharding.strategy import Strategy, get_strategy
from meshpar.train.diloco import DiLoCoConfig
from meshpar.train.files import TOKEN_DTYPES
from meshpar.train.lr import LRSchedule

DEFAULT_MESH = "data=2,fsdp=2,tensor=2"
#: The first line of ``meshpar --help``.
DESCRIPTION = (
    "The ``meshpar`` command: ``inspect`` a layout, ``plan`` one, ``train`` the built-in GPT, "
    "``sample`` from it, ``launch`` processes."
)
CONFIG_HELP = ("read flags from this TOML file, keyed by their names without dashes "
               "(batch-size = 16); flags on the command line override it")


def _add_model_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("model (the built-in GPT)")
    g.add_argument("--preset", default="small", help="GPT preset: tiny, small, 20m (default: small)")
    g.add_argument("--layers", type=int, help="override the preset's number of layers")
    g.add_argument("--d-model", type=int, help="override the model width")
    g.add_argument("--heads", type=int, help="override the number of attention heads")
    g.add_argument("--mlp-dim", type=int, help="override the MLP hidden size")
    g.add_argument("--vocab-size", type=int, help="override the vocabulary size (>= 256 for bytes)")
    g.add_argument("--seq-len", type=int, help="sequence length (train: 64; inspect: the preset's)")
    g.add_argument("--remat", help="remat policy of the layer scan: none, full, dots, dots_no_batch, offload")
    return g


def _add_mesh_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--mesh", default=DEFAULT_MESH, help=f"mesh axes, e.g. {DEFAULT_MESH} (default)")
    g.add_argument("--strategy", default="auto", help="preset: auto, dp, zero1, zero2, zero3, tp, tp_sp")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage over the fsdp axis")
    g.add_argument("--sequence-parallel", action="store_true", help="split activations over seq on tensor")


def _add_layout_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("layout")
    _add_mesh_args(g)
    g.add_argument("--microbatches", type=int, default=1,
                   help="gradient-accumulation microbatches; with a pipe axis, the pipeline's")
    g.add_argument("--schedule", choices=SCHEDULES, default="gpipe",
                   help="pipeline schedule when the mesh has a pipe axis (default gpipe); 1f1b and "
                        "interleaved-1f1b keep activation memory flat in --microbatches")
    g.add_argument("--repeats", type=int, default=1,
                   help="layer chunks per stage for the circular and interleaved-1f1b schedules "
                        "(default 1)")
    g.add_argument("--pipeline-remat", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each pipeline stage's forward in its backward (default: on "
                        "for gpipe and circular; off for the 1F1B schedules, which then keep "
                        "each in-flight chunk's residuals and skip one forward per chunk)")
    g.add_argument("--batch-size", type=int, default=32, help="global batch size (default 32)")
    g.add_argument("--cpu-devices", type=int, default=8,
                   help="CPU devices to emulate (default 8; only the CPU backend is affected)")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """The planner's options (``meshpar plan``; ``meshpar train --layout auto``)."""
    g = p.add_argument_group("planner")
    g.add_argument("--devices", type=int, help="devices to plan for (default: the emulated ones)")
    g.add_argument("--hardware", default="cpu",
                   help="hardware profile: cpu (calibrated here, cached), a100-80g, h100-sxm, "
                        "tpu-v5e, tpu-v5p or FILE.toml (default cpu)")
    g.add_argument("--memory-mib", type=float, help="memory budget per device (default: the profile's)")
    g.add_argument("--compile-top", type=int, default=6,
                   help="compile this many of the best candidates by formula (default 6)")


def _add_diloco_args(p: argparse.ArgumentParser) -> None:
    dl = p.add_argument_group("DiLoCo (a diloco mesh axis: replicas that synchronise every H steps)")
    dl.add_argument("--inner-steps", type=int, metavar="H",
                    help="inner steps per round; needs a diloco axis in --mesh, e.g. diloco=4,fsdp=2")
    dl.add_argument("--outer-lr", type=float, default=0.7, help="outer SGD learning rate (default 0.7)")
    dl.add_argument("--outer-momentum", type=float, default=0.9,
                    help="outer Nesterov momentum (default 0.9; 0: plain SGD)")
    dl.add_argument("--streaming-fragments", type=int, default=1, metavar="F",
                    help="fragments synchronised at staggered steps (Streaming DiLoCo; default 1)")
    dl.add_argument("--diloco-reduce", choices=("fp32", "bf16"), default="fp32",
                    help="dtype the pseudo-gradients are averaged in (default fp32)")


def diloco_config(args: argparse.Namespace, mesh: Mesh):
    """The :class:`~meshpar.train.diloco.DiLoCoConfig` of ``--inner-steps`` & co., or ``None``
    without a ``diloco`` mesh axis.

    Raises:
        UsageError: a diloco axis without ``--inner-steps`` or the other way round, or a bad
            outer learning rate or momentum.
    """
    if args.inner_steps is None and args.streaming_fragments != 1:
        raise UsageError("--streaming-fragments needs --inner-steps and a diloco mesh axis")
    if (DILOCO in mesh.shape) != (args.inner_steps is not None):
        raise UsageError(
            "--inner-steps H and a diloco mesh axis go together (e.g. --mesh diloco=4,fsdp=2 "
            f"--inner-steps 32); got --mesh {args.mesh}"
            + (f" --inner-steps {args.inner_steps}" if args.inner_steps is not None else "")
        )
    if args.inner_steps is None:
        return None
    if args.inner_steps < 1:
        raise UsageError(f"--inner-steps {args.inner_steps}: must be >= 1 (steps per DiLoCo round)")
    if not args.outer_lr > 0 or not 0 <= args.outer_momentum < 1:
        raise UsageError(f"--outer-lr {args.outer_lr} --outer-momentum {args.outer_momentum}: "
                         "the learning rate must be > 0 and the momentum in [0, 1)")
    outer = (optax.sgd(args.outer_lr, momentum=args.outer_momentum, nesterov=True)
             if args.outer_momentum else optax.sgd(args.outer_lr))
    return DiLoCoConfig(inner_steps=args.inner_steps, outer_optimizer=outer,
                        streaming_fragments=args.streaming_fragments,
                        reduce_dtype=args.diloco_reduce)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpar", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    ins = sub.add_parser("inspect", help="print how every parameter is sharded")
    _add_model_args(ins)
    _add_layout_args(ins)
    _add_diloco_args(ins)
    ins.add_argument("--config", metavar="TOML", help=CONFIG_HELP)
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    ins.add_argument("--compiled", action="store_true",
                     help="also compile one train step (--batch-size, --microbatches) and report "
                          "its memory, FLOPs and collectives beside the strategy's formulas")
    ins.add_argument("--plots", metavar="DIR",
                     help="write PNGs to DIR: sharding.png, memory.png, and schedule.png with a "
                          "pipe axis")

    pl = sub.add_parser("plan", help="choose the layout for a device count and a hardware profile")
    _add_model_args(pl)
    add_plan_args(pl)
    pl.add_argument("--precision", choices=("fp32", "bf16"),
                    help="compute precision (default: try fp32 and bf16)")
    pl.add_argument("--batch-size", type=int, default=32, help="global batch size (default 32)")
    pl.add_argument("--cpu-devices", type=int, default=None,
                    help="CPU devices to emulate (default: --devices, or 8)")
    pl.add_argument("--json", action="store_true",
                    help="print the candidates, best first, as JSON (each with its command)")
    pl.add_argument("--plot", metavar="PNG", help="write predicted time against memory here")
    pl.add_argument("--top", type=int, default=15, help="rows of the table (default 15)")
    pl.add_argument("--no-progress", action="store_true", help="no progress bar")

    tr = sub.add_parser("train", help="train the built-in GPT on the embedded corpus or your files")
    tr.add_argument("--config", metavar="TOML", help=CONFIG_HELP)
    _add_model_args(tr).add_argument(
        "--dropout", type=float, default=0.0, metavar="P",
        help="dropout rate in [0, 1) on the embeddings and the last hidden state (default 0)")
    _add_layout_args(tr)
    tr.add_argument("--layout", choices=("manual", "auto"), default="manual",
                    help="auto: plan the layout (meshpar plan, over these devices, --hardware, "
                         "remat unless --remat is given) and train with the top pick, replacing "
                         "--mesh, --strategy, --zero, --microbatches, --schedule, --repeats, "
                         "--pipeline-remat")
    add_plan_args(tr)
    tr.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    tr.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--lr", type=float, default=5e-3, help="peak AdamW learning rate (default 5e-3)")
    tr.add_argument("--lr-schedule", choices=[k.value for k in LRSchedule], default="cosine",
                    help="decay after warm-up, down to lr/10 at --steps (default cosine)")
    tr.add_argument("--warmup-steps", type=int,
                    help="linear warm-up steps (default: 10%% of --steps, 1 to 20)")
    tr.add_argument("--metrics-file", help="write one JSON line of metrics per step here")
    tr.add_argument("--skip-nonfinite", action="store_true",
                    help="skip updates whose loss is NaN/Inf instead of stopping")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--tensorboard", metavar="DIR",
                    help="also write TensorBoard event files (loss, eval loss, lr, grad norm, tokens/s)")
    tr.add_argument("--sample-tokens", type=int, default=32, metavar="N",
                    help="print a greedy sample of N tokens at the end (default 32; 0: none)")
    da = tr.add_argument_group("data (default: the embedded byte-level corpus)")
    da.add_argument("--data", metavar="PATH_OR_GLOB",
                    help="train on these files: UTF-8 text, or token ids in .npy or flat .bin files")
    da.add_argument("--token-dtype", choices=TOKEN_DTYPES,
                    help="element type of .bin token files (default uint16)")
    da.add_argument("--tokenizer", metavar="FILE",
                    help="Hugging Face tokenizers JSON for text files and prompts (default: bytes)")
    da.add_argument("--eval-data", metavar="PATH_OR_GLOB", help="held-out files for --eval-every")
    da.add_argument("--eval-fraction", type=float, metavar="F",
                    help="hold out the last fraction F of --data's windows for --eval-every")
    da.add_argument("--eval-every", type=int, default=0, metavar="N",
                    help="evaluate every N steps and at the end (default 0: never)")
    da.add_argument("--eval-batches", type=int, metavar="K",
                    help="held-out batches per evaluation (default 4)")
    # The main job's defaults: a few minutes on 8 emulated CPU devices (the small preset at
    # 64 tokens per row) for a loss well below the corpus' unigram entropy.
    tr.set_defaults(seq_len=64)
    _add_diloco_args(tr)
    ck = tr.add_argument_group("checkpoints")
    ck.add_argument("--checkpoint-dir", help="save checkpoints (Orbax, sharded, async, atomic) here")
    ck.add_argument("--checkpoint-every", type=int, default=0,
                    help="save every K steps (and at the end); 0: only at the end")
    ck.add_argument("--keep-checkpoints", type=int, default=3, help="keep the last N (default 3)")
    ck.add_argument("--resume", action="store_true",
                    help="continue from the latest complete checkpoint in --checkpoint-dir")
    sa = sub.add_parser("sample", help="write text with a model from a meshpar train checkpoint")
    sa.add_argument("--config", metavar="TOML", help=CONFIG_HELP)
    sa.add_argument("--checkpoint-dir", required=True, help="a meshpar train --checkpoint-dir")
    sa.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    sa.add_argument("--prompt", required=True, help="the text to continue")
    sa.add_argument("--max-tokens", type=int, default=64, help="tokens to write (default 64)")
    sa.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy and deterministic (default); > 0: sample")
    sa.add_argument("--top-k", type=int, help="sample among the K most likely tokens only")
    sa.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g = sa.add_argument_group("layout")
    _add_mesh_args(g)
    g.add_argument("--cpu-devices", type=int, default=8,
                   help="CPU devices to emulate (default 8; only the CPU backend is affected)")
    sa.set_defaults(schedule="gpipe", repeats=1, microbatches=1, pipeline_remat=None)
    return parser


def model_config(args: argparse.Namespace) -> GPTConfig:
    """The built-in GPT's config: the preset with the command line's overrides."""
    cfg = get_preset(args.preset)
    overrides = {
        "layers": args.layers, "d_model": args.d_model, "heads": args.heads,
        "mlp_dim": args.mlp_dim, "vocab_size": args.vocab_size, "seq_len": args.seq_len,
        "remat": args.remat,
    }
    dropout = getattr(args, "dropout", None)  # a train flag only
    if dropout is not None:
        if not 0 <= dropout < 1:
            raise UsageError(f"--dropout {dropout}: must be in [0, 1) (0 turns dropout off)")
        overrides["dropout"] = dropout
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "d_model" in overrides or "heads" in overrides:
        overrides.setdefault("head_dim", None)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def mesh_and_strategy(args: argparse.Namespace) -> tuple[Mesh, Strategy]:
    """The mesh and the strategy (fitted to it) that ``--mesh``, ``--strategy``, ... describe."""
    mesh = make_mesh(parse_mesh(args.mesh))
    strategy = get_strategy(
        args.strategy, zero_stage=args.zero,
        sequence_parallel=True if args.sequence_parallel else None,
    )
    if mesh.shape.get(PIPE, 1) == 1 and (args.schedule != "gpipe" or args.repeats != 1):
        raise UsageError(
            f"--schedule {args.schedule} --repeats {args.repeats} need a pipe axis of size > 1 "
            f"in the mesh, e.g. --mesh pipe=2,{args.mesh}"
        )
    if mesh.shape.get(PIPE, 1) == 1 and getattr(args, "pipeline_remat", None) is not None:
        flag = "--pipeline-remat" if args.pipeline_remat else "--no-pipeline-remat"
        raise UsageError(f"{flag} needs a pipe axis of size > 1 in the mesh, e.g. --mesh "
                         f"pipe=2,{args.mesh}")
    if args.schedule in ("gpipe", "1f1b") and args.repeats != 1:
        other = "circular" if args.schedule == "gpipe" else "interleaved-1f1b"
        raise UsageError(f"--repeats {args.repeats} needs --schedule {other}")
    if args.schedule == "interleaved-1f1b" and args.repeats < 2:
        raise UsageError(f"--schedule interleaved-1f1b needs --repeats >= 2, got --repeats "
                         f"{args.repeats}; use --schedule 1f1b for one chunk per stage")
    return mesh, strategy.for_mesh(mesh)
