"""A trainer's run against a single-device reference: what test_equivalence.py and
test_pipeline_train.py share.

A run is ``loss_and_grads`` on batch 0, then ``steps`` optimizer steps on batches ``0..steps-1``
(:func:`run_steps`); its results are compared leaf by leaf with the reference's. The tolerances
stay in the test files (each states and calibrates its own); the checks here take them as
arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from meshpar.mesh import make_mesh


def flat(tree) -> dict[str, np.ndarray]:
    """``{key path: host array}`` of a pytree of (possibly sharded) arrays."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def mesh_axes(spec: str) -> tuple[tuple[str, int], ...]:
    """``"data=2,tensor=4"`` -> ``(("data", 2), ("tensor", 4))`` (hashable, for cached cases)."""
    return tuple((a, int(n)) for a, n in (p.split("=") for p in spec.split(",")))


def single_device_mesh():
    """The reference's mesh: ``data=1`` on the first device."""
    return make_mesh(data=1, devices=jax.devices()[:1])


def init_params(make_model: Callable[[], nnx.Module]) -> dict[str, np.ndarray]:
    """The model's initial parameters, flat, built unsharded."""
    with nnx.use_eager_sharding(False):
        return flat(nnx.state(make_model(), nnx.Param))


def run_steps(trainer, batch_of: Callable[[int], dict], steps: int, *,
              grads_layout: Callable | None = None) -> tuple[float, dict[str, np.ndarray], list[float]]:
    """``(init loss, flat init gradients, step losses)``: ``loss_and_grads(batch_of(0))``, then
    ``steps`` calls of ``trainer.step`` on ``batch_of(0..steps-1)``.

    ``grads_layout`` (jitted) maps the gradients to the model's own layout before flattening.
    """
    loss, grads = trainer.loss_and_grads(batch_of(0))
    if grads_layout is not None:
        grads = jax.jit(grads_layout)(grads)
    init_loss, init_grads = float(loss), flat(grads)
    losses = [trainer.step(batch_of(s))["loss"] for s in range(steps)]
    return init_loss, init_grads, losses


def rel_norm(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> float:
    """``||a - b|| / ||scale||``."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(scale))


def deviations(got, ref, init: Mapping[str, np.ndarray], *,
               outliers: tuple[float, float] | None = None) -> dict[str, float]:
    """Largest deviations over all leaves, each in the unit its tolerance is stated in.

    ``got`` and ``ref`` have ``init_loss``, ``init_grads``, ``losses`` and ``params``; with
    ``outliers=(rtol, atol)`` also the most entries of one parameter leaf off by more than
    ``rtol * |ref| + atol``.
    """
    g, p = got.init_grads, got.params
    dev = {
        "init_loss_rel": abs(got.init_loss - ref.init_loss) / abs(ref.init_loss),
        "step_loss_rel": max(abs(a - b) / abs(b) for a, b in zip(got.losses, ref.losses)),
        "grad_abs/leaf_max": max(float(np.max(np.abs(g[k] - r)) / np.max(np.abs(r)))
                                 for k, r in ref.init_grads.items()),
        "grad_norm_rel": max(rel_norm(g[k], r, r) for k, r in ref.init_grads.items()),
        "param_abs": max(float(np.max(np.abs(p[k] - r))) for k, r in ref.params.items()),
        "param_dev/update": max(rel_norm(p[k], r, r - init[k]) for k, r in ref.params.items()),
    }
    if outliers is not None:
        rtol, atol = outliers
        dev["param_outliers"] = max(int(np.sum(np.abs(p[k] - r) > rtol * np.abs(r) + atol))
                                    for k, r in ref.params.items())
    return dev


def paired(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
           ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(key, got leaf, reference leaf)`` per reference leaf, after checking that both have the
    same leaves and that each pair has one shape and dtype float32."""
    assert sorted(got) == sorted(ref)
    for key, r in ref.items():
        g = got[key]
        assert g.shape == r.shape and g.dtype == np.float32, (key, g.shape, r.shape)
        yield key, g, r


def assert_losses_and_grads_match(got, ref, *, loss: tuple[float, float],
                                  grad_elem: tuple[float, float] | None,
                                  grad_norm: float) -> None:
    """The loss at init and the step losses within ``loss = (rtol, atol)``; every gradient leaf
    within ``||g - g_ref|| <= grad_norm ||g_ref||`` and, unless ``grad_elem`` is None, with
    ``grad_elem = (rtol, atol_frac)``, ``|g - g_ref| <= rtol |g_ref| + atol_frac max|g_ref|``."""
    rtol, atol = loss
    np.testing.assert_allclose(got.init_loss, ref.init_loss, rtol=rtol, atol=atol,
                               err_msg="loss_and_grads loss at init")
    np.testing.assert_allclose(got.losses, ref.losses, rtol=rtol, atol=atol,
                               err_msg=f"losses of the {len(ref.losses)} steps")
    for key, g, g_ref in paired(got.init_grads, ref.init_grads):
        if grad_elem is not None:
            rtol, atol_frac = grad_elem
            np.testing.assert_allclose(g, g_ref, rtol=rtol,
                                       atol=atol_frac * float(np.max(np.abs(g_ref))),
                                       err_msg=f"gradient {key} at init")
        assert rel_norm(g, g_ref, g_ref) <= grad_norm, f"gradient {key} at init (norm)"
