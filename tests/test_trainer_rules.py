"""The README's "Rules and strict in the Trainer" example, run: path rules and strict=True."""

import re

import numpy as np
import optax
import pytest
from flax import nnx

import meshpar as mp

README_RULES = dict(paths=[(r"proj/kernel$", ("embed", "mlp"))], strict=True)


class _Model(nnx.Module):
    def __init__(self, *, annotate_out: bool = True, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.proj = nnx.Linear(8, 16, use_bias=False, rngs=rngs)  # nobody annotated it
        out_init = nnx.with_partitioning(init, ("mlp", None)) if annotate_out else init
        self.out = nnx.Linear(16, 1, use_bias=False, kernel_init=out_init, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.proj(x)))[:, 0]


def loss_fn(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def test_the_readme_example_trains_with_the_path_rule():
    make_model = lambda: _Model(rngs=nnx.Rngs(0))  # noqa: E731
    mesh = mp.make_mesh(fsdp=4, tensor=2)
    # As in the README:
    rules = mp.Rules.table(
        paths=[(r"proj/kernel$", ("embed", "mlp"))],   # logical names for a layer nobody annotated
        strict=True,          # any other parameter without logical axes or a path rule: an error
    )
    strategy = mp.Strategy("zero3+paths", zero_stage=3, extra_param_rules=rules)
    trainer = mp.Trainer(make_model, optax.adamw(3e-4), loss_fn, mesh=mesh, strategy=strategy)
    assert trainer.plan["proj/kernel"].source == "path rule 'proj/kernel$'"
    # The built-in rules placed the names: embed over fsdp (ZeRO-3), mlp over tensor.
    spec = tuple(trainer.plan["proj/kernel"].spec)
    assert spec == ("fsdp", "tensor"), spec
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 8)).astype(np.float32), "y": np.zeros(8, np.float32)}
    assert np.isfinite(trainer.step(batch)["loss"])


def test_strict_names_the_parameter_no_rule_covers():
    rules = mp.Rules.table(**README_RULES)
    strategy = mp.Strategy("zero3+paths", zero_stage=3, extra_param_rules=rules)
    named = re.escape("parameter out/kernel (shape (16, 1)) has no logical axes")
    with pytest.raises(mp.UnannotatedParameterError, match=named):
        mp.Trainer(lambda: _Model(annotate_out=False, rngs=nnx.Rngs(0)), optax.adamw(3e-4), loss_fn,
                   mesh=mp.make_mesh(fsdp=4, tensor=2), strategy=strategy)


def test_the_readme_shows_this_example():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert 'paths=[(r"proj/kernel$", ("embed", "mlp"))]' in readme
    assert 'mp.Strategy("zero3+paths", zero_stage=3, extra_param_rules=rules)' in readme
