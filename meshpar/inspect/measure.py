"""Reading a compiled program: memory, FLOPs and collectives per device and step, as plain data.

:func:`measure` is the measured side of :func:`meshpar.inspect.explain.explain`; see there for
what each figure means and how it is read.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import jax

from meshpar.inspect import hlo

_OP_NAME = re.compile(r'op_name="([^"]*)"')
#: The phases a collective is counted in (from its ``op_name``).
PHASES = ("forward", "backward", "update")


def _phase(op_name: str) -> str:
    # jax names the backward pass transpose(jvp(...)); the optimizer update has no jvp at all.
    if "transpose(" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "update"


def dot_flops(hlo_text: str, /) -> float:
    """Matmul FLOPs per device, each ``dot`` weighted by its loop trips (see :func:`meshpar.inspect.hlo.dot_flops`).

    Example:
        >>> import jax.numpy as jnp
        >>> f = jax.jit(lambda x, w: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0])
        >>> dot_flops(f.lower(jnp.ones((8, 16)), jnp.ones((16, 16))).compile().as_text())
        20480.0
    """
    return hlo.dot_flops(hlo_text)["total"]


def _volume(op: hlo.Collective) -> int:
    # The tensor a collective works on: a reduce-scatter's input is its result x group size.
    return op.result_bytes * (op.group_size if op.kind is hlo.CollectiveKind.REDUCE_SCATTER else 1)


def measure(compiled: Any, /, *, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Memory, FLOPs and collectives of a compiled program, as plain data.

    Args:
        compiled: a ``jax.stages.Compiled`` (``jitted.lower(...).compile()``).
        mesh: the mesh it was compiled for (names the axes of each collective).

    Returns:
        ``{"memory": {...}, "flops": {...}, "collectives": {kind@axes: {...}}, "ops": [...]}``;
        bytes are per device, collective figures per step (trip counts included). Each
        ``collectives`` row carries its ``kind`` and ``axes`` too (the key is a label for
        people; code reads the fields).

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset, lm_loss
        >>> from meshpar.train import Trainer
        >>> from meshpar.train.data import TokenBatches
        >>> trainer = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
        ...                   optax.adamw(1e-3), lm_loss, mesh=make_mesh(fsdp=8), strategy="zero3")
        >>> batch = TokenBatches(batch_size=16, seq_len=32).batch(0)
        >>> measured = measure(trainer.lower(batch).compile(), mesh=trainer.mesh)
        >>> measured["memory"]["total"] > 0, sorted(measured["collectives"])
        (True, ['all-gather@fsdp', 'all-reduce@fsdp'])
    """
    mem = compiled.memory_analysis()
    memory = {
        "argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
        "temp": int(mem.temp_size_in_bytes), "alias": int(mem.alias_size_in_bytes),
        "peak_reported": int(getattr(mem, "peak_memory_in_bytes", 0) or 0),
    }
    memory["total"] = memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    text = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    dots = hlo.dot_flops(text)
    traffic = hlo.memory_traffic(text)
    flops = {"cost_analysis": float(cost.get("flops", 0.0)), "dots_weighted": dots["total"],
             # What the planner's memory-bound terms read (meshpar.planner.cost): the matmuls'
             # operand and result bytes, and the bytes moved outside matmuls and collectives.
             "dots_bytes": dots["bytes"], "memory_traffic": traffic["total"],
             "memory_traffic_in_loops": traffic["in_loops"]}
    names = {}
    for ins in hlo.instructions(text):
        if ins.op.removesuffix("-start") in hlo.COLLECTIVES:
            m = _OP_NAME.search(ins.rest)
            names[ins.name] = m.group(1) if m else ""
    ops, table, kinds = [], defaultdict(lambda: defaultdict(float)), {}
    for op in hlo.collectives(text, mesh=mesh):
        phase = _phase(names.get(op.name, ""))
        key = f"{op.kind}@{'+'.join(op.mesh_axes) or '-'}"
        kinds[key] = {"kind": str(op.kind), "axes": list(op.mesh_axes)}
        row = table[key]
        row["ops"] += 1
        row["executions"] += op.trip_count
        row["in_loop"] += int(op.in_loop)
        row["bytes_per_step"] += _volume(op) * op.trip_count
        row[f"{phase}_bytes"] += _volume(op) * op.trip_count
        row["traffic_bytes_per_step"] += op.traffic_per_step
        ops.append({"kind": str(op.kind), "axes": list(op.mesh_axes), "bytes": _volume(op),
                    "trip_count": op.trip_count, "in_loop": op.in_loop, "phase": phase})
    collectives = {
        k: {**kinds[k],
            **{f: (int(v) if f != "traffic_bytes_per_step" else float(v)) for f, v in row.items()}}
        for k, row in sorted(table.items())
    }
    return {"memory": memory, "flops": flops, "collectives": collectives, "ops": ops}
