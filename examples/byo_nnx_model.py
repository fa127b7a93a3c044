"""Bring your own Flax NNX model: annotate it, pick a strategy, train a few steps.

meshpar never needs to know your model. It reads the *logical* axis names you put on parameters
(``nnx.with_partitioning(init, ("embed", "mlp"))``) and activations (``mp.constrain``), and the
strategy maps those names onto the mesh. Run it::

    python examples/byo_nnx_model.py --mesh fsdp=4,tensor=2 --strategy zero3 --steps 30
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import meshpar as mp

if __name__ == "__main__":
    mp.emulate_devices(8)  # 8 CPU devices; must happen before JAX starts its backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402


def _linear(d_in: int, d_out: int, axes: tuple, *, rngs: nnx.Rngs) -> nnx.Linear:
    # The kernel gets two logical names, the bias the output one: that is all meshpar needs.
    return nnx.Linear(
        d_in, d_out, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]),
    )


class Block(nnx.Module):
    """A residual MLP block: ``x + down(gelu(up(x)))``."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.up = _linear(width, 4 * width, ("embed", "mlp"), rngs=rngs)
        self.down = _linear(4 * width, width, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x_BD: jax.Array) -> jax.Array:
        # Activations are named too; outside a meshpar layout constrain() does nothing.
        h_BM = mp.constrain(jax.nn.gelu(self.up(x_BD)), ("batch", "mlp"))
        return mp.constrain(x_BD + self.down(h_BM), ("batch", "embed"))


class Regressor(nnx.Module):
    """A small residual MLP mapping ``[B, d_in]`` features to one number per row."""

    def __init__(self, d_in: int, width: int, depth: int, *, rngs: nnx.Rngs):
        self.inp = _linear(d_in, width, (None, "embed"), rngs=rngs)
        self.blocks = nnx.List([Block(width, rngs=rngs) for _ in range(depth)])
        self.out = _linear(width, 1, ("embed", None), rngs=rngs)

    def __call__(self, x_BI: jax.Array) -> jax.Array:
        x_BD = mp.constrain(self.inp(x_BI), ("batch", "embed"))
        for block in self.blocks:
            x_BD = block(x_BD)
        return self.out(x_BD)[:, 0]


def mse(model: Regressor, batch) -> jax.Array:
    """``loss_fn(model, batch) -> scalar``, the only contract with the trainer."""
    return jnp.mean(jnp.square(model(batch["x"]) - batch["y"]))


def make_batch(step: int, *, batch_size: int, d_in: int) -> dict[str, np.ndarray]:
    """A synthetic regression batch: ``y = sin(x · w)``, a pure function of the step."""
    rng = np.random.default_rng(step)
    x = rng.normal(size=(batch_size, d_in)).astype(np.float32)
    w = np.random.default_rng(1234).normal(size=(d_in,)).astype(np.float32) / np.sqrt(d_in)
    return {"x": x, "y": np.sin(x @ w).astype(np.float32)}


def main(argv: Sequence[str] | None = None) -> int:
    """Train the regressor for a few steps on the chosen mesh and strategy; print the losses."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="fsdp=4,tensor=2")
    p.add_argument("--strategy", default="zero3", help="dp, zero1, zero2, zero3, tp, auto")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--d-in", type=int, default=16)
    args = p.parse_args(argv)
    mp.emulate_devices(8)  # a no-op when the backend already has 8 devices

    trainer = mp.Trainer(
        lambda: Regressor(args.d_in, args.width, args.depth, rngs=nnx.Rngs(0)),
        optax.adam(1e-3), mse, mesh=mp.make_mesh(args.mesh), strategy=args.strategy,
    )
    print(mp.format_plan(trainer.plan, title=f"Regressor, strategy {trainer.strategy.name}"))
    losses = []
    for step in range(args.steps):
        metrics = trainer.step(make_batch(step, batch_size=args.batch_size, d_in=args.d_in))
        losses.append(metrics["loss"])
        print(f"step {step:3d}  loss {metrics['loss']:.4f}")
    if not losses[-1] < losses[0]:
        print(f"error: the loss did not decrease ({losses[0]:.4f} -> {losses[-1]:.4f})",
              file=sys.stderr)
        return 1
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
