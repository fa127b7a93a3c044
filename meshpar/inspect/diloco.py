"""What DiLoCo sends over its ``diloco`` axis, read from the compiled programs.

:func:`explain_diloco` compiles a :class:`~meshpar.train.diloco.DiLoCoTrainer`'s inner step and
each fragment's outer step and reports their collectives by kind and mesh axes
(:func:`meshpar.inspect.hlo.summarize`), with three checks against the design:

* the inner step holds **no** collective over ``diloco``;
* each outer step's collectives over ``diloco`` are all-reduces of its fragment's per-device
  parameter bytes (summed over fragments: the parameters' size once per round);
* the bytes per step over ``diloco`` (the outer steps' traffic / H) against the analytic figure
  and against data parallelism's (the fp32 gradient all-reduced every step).

``meshpar inspect --mesh diloco=4,fsdp=2 --inner-steps 32 --compiled`` prints it
(:func:`format_diloco`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from meshpar.axes import DILOCO
from meshpar.inspect.hlo import collectives, summarize
from meshpar.train.diloco import DiLoCoTrainer


def explain_diloco(trainer: DiLoCoTrainer, batch: Mapping[str, Any], /) -> dict[str, Any]:
    """Compile the inner and outer steps for ``batch`` and compare their collectives with DiLoCo's
    promises.

    Args:
        trainer: the DiLoCo trainer.
        batch: this process's rows of a global batch (host arrays), as for ``trainer.step``.

    Returns:
        A JSON-able dict: ``inner`` and ``outer`` (per fragment) collective tables, and
        ``checks``: ``inner_collectives_over_diloco`` (0 expected), ``outer_bytes`` vs the
        parameters' per-device bytes, and ``bytes_per_step`` from the HLO vs analytic vs DP.

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset, lm_loss
        >>> from meshpar.train.data import TokenBatches
        >>> from meshpar.train.diloco import DiLoCoConfig
        >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
        ...                         optax.adamw(3e-4), lm_loss,
        ...                         mesh=make_mesh(diloco=4, fsdp=2),
        ...                         diloco=DiLoCoConfig(inner_steps=32))
        >>> data = TokenBatches(batch_size=16, seq_len=32)
        >>> report = explain_diloco(trainer, data.batch(0))
        >>> report["checks"]["inner_collectives_over_diloco"]
        0
    """
    mesh = trainer.mesh
    inner = collectives(trainer.lower_inner(batch).compile().as_text(), mesh=mesh)
    outer = [collectives(trainer.lower_outer(f).compile().as_text(), mesh=mesh)
             for f in range(len(trainer.fragments))]
    over = lambda ops: [c for c in ops if DILOCO in c.mesh_axes]  # noqa: E731
    comm = trainer.communication()
    h = trainer.diloco.inner_steps
    abs_params = jax.tree.leaves(trainer.inner.state.params)
    shardings = jax.tree.leaves(trainer.inner.state_shardings.params)
    param_bytes = sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
                      for x, s in zip(abs_params, shardings))
    hlo_per_step = sum(c.traffic_per_step for ops in outer for c in over(ops)) / h
    return {
        "replicas": trainer.replicas, "inner_steps": h,
        "fragments": len(trainer.fragments), "reduce_dtype": trainer.diloco.reduce_dtype,
        "inner": summarize(inner),
        "outer": [summarize(ops) for ops in outer],
        "checks": {
            "inner_collectives_over_diloco": len(over(inner)),
            "outer_kinds_over_diloco": sorted({c.kind for ops in outer for c in over(ops)}),
            "outer_result_bytes": sum(c.result_bytes for ops in outer for c in over(ops)),
            "param_bytes_per_device": param_bytes,
            "bytes_per_step_hlo": hlo_per_step,
            "bytes_per_step_analytic": comm.per_step,
            "dp_bytes_per_step_analytic": comm.dp_per_step,
        },
    }


def format_diloco(report: Mapping[str, Any], /) -> str:
    """:func:`explain_diloco`'s report as text.

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset, lm_loss
        >>> from meshpar.train.data import TokenBatches
        >>> from meshpar.train.diloco import DiLoCoConfig
        >>> trainer = DiLoCoTrainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
        ...                         optax.adamw(3e-4), lm_loss,
        ...                         mesh=make_mesh(diloco=4, fsdp=2),
        ...                         diloco=DiLoCoConfig(inner_steps=32))
        >>> batch = TokenBatches(batch_size=16, seq_len=32).batch(0)
        >>> text = format_diloco(explain_diloco(trainer, batch))    # print(text)
        >>> print(text.splitlines()[0])
        DiLoCo: 4 replicas, H=32, 1 fragment(s), fp32 reduction
        >>> [line.strip() for line in text.splitlines() if "in the inner step" in line]
        ['collectives over diloco in the inner step: 0 (OK)']
    """
    c = report["checks"]
    lines = [f"DiLoCo: {report['replicas']} replicas, H={report['inner_steps']}, "
             f"{report['fragments']} fragment(s), {report['reduce_dtype']} reduction"]

    def table(title, summary):
        lines.append(f"  {title}:")
        for key, row in summary.items():
            lines.append(f"    {key:<28} {row['ops']:>4} op(s) {row['executions']:>5} run(s)/step "
                         f"{row['traffic_bytes_per_step'] / 2**10:>10.1f} KiB sent/device")

    table("inner step (every step)", report["inner"])
    for f, summary in enumerate(report["outer"]):
        table(f"outer step of fragment {f} (once per round)", summary)
    verdict = "OK" if c["inner_collectives_over_diloco"] == 0 else "UNEXPECTED"
    lines.append(f"  collectives over diloco in the inner step: {c['inner_collectives_over_diloco']}"
                 f" ({verdict})")
    lines.append(f"  outer reductions over diloco: {', '.join(c['outer_kinds_over_diloco']) or '-'}"
                 f", {c['outer_result_bytes']:,} bytes; parameters {c['param_bytes_per_device']:,}"
                 " bytes per device")
    dp = c["dp_bytes_per_step_analytic"]
    lines.append(
        f"  sent over diloco per step: {c['bytes_per_step_hlo']:,.0f} B (HLO), "
        f"{c['bytes_per_step_analytic']:,.0f} B (analytic); data parallel would send {dp:,.0f} B"
        f" ({c['bytes_per_step_hlo'] / dp if dp else float('nan'):.4f}x)")
    if report["reduce_dtype"] == "bf16" and c["bytes_per_step_hlo"] > c["bytes_per_step_analytic"]:
        lines.append("  note: XLA:CPU promotes bf16 all-reduces to f32, so the bf16 reduction "
                     "moves fp32 bytes on CPU (GPU and TPU reduce in bf16)")
    return "\n".join(lines)
