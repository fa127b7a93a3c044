"""A Flax Linen model, sharded with ``meshpar.init_linen`` and trained by ``meshpar.Trainer``.

The first layer is annotated with ``nn.with_logical_partitioning``; the second is not, and a
*path rule* gives its parameters logical names; the head is left alone, so it is replicated and
the report says so. First ``init_linen`` creates the variables sharded and one hand-written jitted
SGD step runs with the parameters' shardings and the activation layout active. Then the same
Linen module goes through ``mp.from_linen`` (Flax's Linen -> NNX bridge) into ``mp.Trainer``,
which plans, shards and trains it like any NNX model for a few Adam steps. Run it::

    python examples/linen_model.py --mesh data=4,tensor=2
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
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402


class MLP(nn.Module):
    hidden: int = 256
    width: int = 64

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(self.hidden, name="up",
                     kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
        h = mp.constrain(nn.gelu(h), ("batch", "mlp"))
        h = nn.Dense(self.width, name="down")(h)  # unannotated: the path rules name its axes
        h = mp.constrain(h, ("batch", "embed"))
        return nn.Dense(1, name="head")(h)[:, 0]  # unannotated, no rule: replicated, reported


PATHS = [(r"down/kernel$", ("mlp", "embed")), (r"down/bias$", ("embed",))]
RULES = mp.Rules.table([("batch", "data"), ("mlp", "tensor"), ("embed", None)], paths=PATHS)


def train_with_trainer(args, mesh, x: np.ndarray, y: np.ndarray) -> list[float]:
    """The same MLP trained by ``mp.Trainer`` through ``mp.from_linen``; the step losses."""

    def make_model():
        # The bridge runs MLP.init on an example input (one row: only its shape matters) and
        # holds the variables as an NNX module; the Trainer builds it directly sharded.
        return mp.from_linen(MLP(hidden=args.hidden, width=args.width), x[:1],
                             rngs=nnx.Rngs(params=0))

    def loss_fn(model, batch):
        # Called like the Linen module, without variables: it returns what MLP.__call__ returns.
        return jnp.mean(jnp.square(model(batch["x"]) - batch["y"]))

    # The Trainer's rules come from its strategy; the path rules name the unannotated layer.
    strategy = mp.Strategy("auto+paths", zero_stage=3,
                           extra_param_rules=mp.Rules.table(paths=PATHS))
    trainer = mp.Trainer(make_model, optax.adam(args.lr / 10), loss_fn, mesh=mesh,
                         strategy=strategy)
    for path in ("up/kernel", "down/kernel"):
        entry = trainer.plan[path]
        print(f"Trainer: {path} {entry.shape} axes {entry.logical} -> {entry.spec} "
              f"({entry.source})")
    losses = [trainer.step({"x": x, "y": y})["loss"] for _ in range(args.steps)]
    print("Trainer losses: " + " ".join(f"{loss:.4f}" for loss in losses))
    return losses


def main(argv: Sequence[str] | None = None) -> int:
    """Initialise the MLP sharded, run one jitted step, train it with the Trainer; 0 if both
    losses fell."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="data=4,tensor=2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=5, help="Trainer steps")
    args = p.parse_args(argv)
    mp.emulate_devices(8)

    # Linen's init needs Auto mesh axes (constraints, not asserts): meshpar's meshes have them.
    mesh = mp.make_mesh(args.mesh)
    model = MLP(hidden=args.hidden, width=args.width)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, args.width)).astype(np.float32)
    y = np.tanh(x.sum(axis=1) / np.sqrt(args.width)).astype(np.float32)
    variables, plan = mp.init_linen(model, jax.random.key(0), x, mesh=mesh, rules=RULES)
    print(mp.format_plan(plan, title="Linen MLP"))

    shardings = jax.tree.map(lambda a: a.sharding, variables)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    x, y = jax.device_put(x, rows), jax.device_put(y, rows)

    def loss_fn(variables, x, y):
        return jnp.mean(jnp.square(model.apply(variables, x) - y))

    def step(variables, x, y):
        # The layout is activated inside the traced function, so constrain() resolves here.
        with mp.activate(mesh, RULES):
            loss, grads = jax.value_and_grad(loss_fn)(variables, x, y)
        return jax.tree.map(lambda v, g: v - args.lr * g, variables, grads), loss

    step = jax.jit(step, in_shardings=(shardings, rows, rows), out_shardings=(shardings, None),
                   donate_argnums=0)
    variables, loss0 = step(variables, x, y)
    _, loss1 = step(variables, x, y)
    print(f"loss {float(loss0):.4f} -> {float(loss1):.4f} after one SGD step")
    kernel = variables["params"]["down"]["kernel"]
    print(f"down/kernel {kernel.shape} is sharded {kernel.sharding.spec}")

    losses = train_with_trainer(args, mesh, x, y)
    return 0 if float(loss1) < float(loss0) and losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
