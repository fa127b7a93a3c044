"""3-D parallel GPT: data parallel x ZeRO-3 (FSDP) x Megatron tensor parallel on 8 devices.

The mesh ``data=2,fsdp=2,tensor=2`` splits the batch 4 ways (``data`` x ``fsdp``), shards every
weight over ``fsdp`` (gathered one layer at a time inside the layer scan) and splits attention
heads, the MLP and the vocabulary over ``tensor``. Run it::

    python examples/gpt_3d.py --steps 20            # add --explain to see what it costs
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
from meshpar.train.data import TokenBatches  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Train the built-in GPT on a 3-D mesh; print its layout and the losses."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=2")
    p.add_argument("--strategy", default="auto", help="auto = ZeRO-3 over fsdp + TP over tensor")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--explain", action="store_true", help="print the compiled step's costs")
    args = p.parse_args(argv)
    mp.emulate_devices(8)

    overrides = {k: v for k, v in (("layers", args.layers), ("d_model", args.d_model)) if v}
    cfg = get_preset(args.preset, **overrides)
    mesh = mp.make_mesh(args.mesh)
    trainer = mp.Trainer(
        lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(3e-3), lm_loss, mesh=mesh,
        strategy=args.strategy, config=mp.TrainConfig(microbatches=args.microbatches, row_separable=True),
    )
    plan = trainer.plan
    print(f"GPT {args.preset}: {cfg.param_count():,} parameters on mesh {mp.format_mesh(mesh)}; "
          f"parameter bytes {plan.bytes_total:,} in all, {plan.bytes_per_device:,} per device "
          "(split over fsdp and tensor, replicated over data)")
    print("  blocks/wq:", plan["blocks/wq"].spec, " blocks/w_in:", plan["blocks/w_in"].spec)
    data = TokenBatches(batch_size=args.batch_size, seq_len=args.seq_len, seed=0)
    if args.explain:
        from meshpar.inspect.explain import explain, format_explain, gpt_train_flops

        report = explain(trainer, data.batch(0), d_model=cfg.d_model, layer_remat=cfg.remat,
                         model_flops=gpt_train_flops(cfg, batch_size=args.batch_size,
                                                     seq_len=args.seq_len))
        print(format_explain(report))
    losses = []
    for step in range(args.steps):
        metrics = trainer.step(data.batch(step))
        losses.append(metrics["loss"])
        print(f"step {step:3d}  loss {metrics['loss']:.4f}  grad norm {metrics['grad_norm']:.3f}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
