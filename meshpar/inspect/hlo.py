"""Reading the compiled program: collectives, their mesh axes, bytes and loop trip counts.

``compiled.as_text()`` is the partitioned per-device HLO. This module finds every collective in
it, decodes its replica groups (explicit ``{{0,1},...}``, iota ``[4,2]<=[8]``, or the
``mesh[...] {'axis'}`` form) into the *mesh axes* it communicates over, sizes it by its result
shape, and weights it by the trip counts of the ``while`` loops around it, so that a collective
inside a layer scan counts once per layer. This is how meshpar checks that a strategy's traffic
is what it promises and that no collective sits inside a loop where it should not.

Length: about 535 lines, one concept (reading HLO text): computations and loop trip counts, then
collectives, dots and the memory traffic outside them, which share that reading.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
from jax.sharding import Mesh

class CollectiveKind(enum.StrEnum):
    """The collectives of an HLO program, named as HLO names them (a ``str``: ``op.kind ==
    "all-reduce"`` holds too)."""

    ALL_REDUCE = "all-reduce"
    ALL_GATHER = "all-gather"
    REDUCE_SCATTER = "reduce-scatter"
    COLLECTIVE_PERMUTE = "collective-permute"
    ALL_TO_ALL = "all-to-all"


COLLECTIVES = tuple(CollectiveKind)

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
}
_COMP_HEAD = re.compile(r"^(ENTRY )?%?([^\s(]+) .*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT )?%?([^\s=]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_CALLED = re.compile(r"(?:to_apply|calls|body|condition|true_computation|false_computation)=%?([^\s,}]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of the compiled program."""

    kind: CollectiveKind
    name: str
    computation: str
    result_bytes: int  # per device, from the result shape
    group_size: int
    mesh_axes: tuple[str, ...]
    trip_count: int  # product of the known trip counts of the loops around it (1 outside)
    in_loop: bool

    @property
    def traffic_bytes(self) -> float:
        """Bytes each device sends with a ring/bidirectional algorithm, per execution."""
        n = self.group_size
        if n <= 1:
            return 0.0
        if self.kind is CollectiveKind.ALL_REDUCE:
            return 2 * (n - 1) / n * self.result_bytes
        if self.kind is CollectiveKind.ALL_GATHER:
            return (n - 1) / n * self.result_bytes
        if self.kind is CollectiveKind.REDUCE_SCATTER:
            return (n - 1) * self.result_bytes
        if self.kind is CollectiveKind.ALL_TO_ALL:
            return (n - 1) / n * self.result_bytes
        return float(self.result_bytes)  # collective-permute: each device sends its buffer

    @property
    def traffic_per_step(self) -> float:
        return self.traffic_bytes * self.trip_count


def _shape_bytes(text: str) -> int:
    total = 0
    # Layouts ({1,0}) and comments never match dtype[dims]; tuple results add up.
    for dtype, dims in _SHAPE.findall(text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
    ids = np.arange(math.prod(dims)).reshape(dims)
    return ids.transpose(perm) if perm else ids


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_groups(attrs: str, *, num_devices: int | None = None) -> list[list[int]] | None:
    """The device groups of a collective's attribute text.

    Args:
        attrs: the collective's attributes (the instruction's text after the opcode's ``(``
            will do, as :attr:`Instruction.rest`).
        num_devices: how many devices the program runs on. Only ``replica_groups={}`` needs it:
            XLA's notation for one group of all devices, decoded as ``[[0, ..., n - 1]]``.

    Returns:
        One list of device ids per group (per source-target pair for a collective-permute);
        ``[]`` for ``replica_groups={}`` when ``num_devices`` is not given (all devices, count
        unknown); ``None`` if the text has no groups at all.
    """
    m = re.search(r"source_target_pairs=\{(\{[^=]*?\})\}", attrs)
    if m:
        return [_ints(p) for p in re.findall(r"\{([0-9,]+)\}", m.group(1))]
    if re.search(r"replica_groups=\{\s*\}", attrs):
        return [list(range(num_devices))] if num_devices is not None else []
    m = re.search(r"replica_groups=\{(\{.*?\})\}", attrs)
    if m:
        return [_ints(g) for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if m:
        shape = _ints(m.group(1))
        ids = _iota(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\))? \{([^}]*)\}", attrs)
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names = [a for a, _ in axes]
        sizes = [int(s) for _, s in axes]
        ids = (_iota(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)
               if m.group(2) else np.arange(math.prod(sizes)))
        ids = ids.reshape(sizes)
        group_axes = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4))]
        rest = [i for i in range(len(names)) if i not in group_axes]
        ids = ids.transpose(rest + group_axes)
        return ids.reshape(-1, math.prod(sizes[i] for i in group_axes) if group_axes else 1).tolist()
    return None


def mesh_axes_of(groups: list[list[int]] | None, mesh: Mesh | None) -> tuple[str, ...]:
    """The mesh axes along which the members of each group differ (device id = flat index)."""
    if not groups or mesh is None:
        return ()
    shape = tuple(mesh.devices.shape)
    varying: set[int] = set()
    for group in groups:
        coords = np.array(np.unravel_index(np.asarray(group) % math.prod(shape), shape))
        varying |= {i for i in range(len(shape)) if len(set(coords[i])) > 1}
    return tuple(mesh.axis_names[i] for i in sorted(varying))


class Instruction(NamedTuple):
    """One instruction of an HLO text, as :func:`instructions` splits it."""

    computation: str  # the computation it belongs to
    name: str         # without the leading %
    result: str       # the result shape text (``f32[4]{0}``, a tuple shape, ...)
    op: str           # the opcode (``all-reduce``, ``collective-permute-start``, ``dot``, ...)
    rest: str         # everything after the opcode's "(": operands, then the attributes


def instructions(hlo_text: str, /) -> Iterator[Instruction]:
    """Every instruction of an HLO text (``compiled.as_text()``), computation by computation.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> compiled = jax.jit(lambda x, w: jnp.tanh(x @ w)).lower(jnp.ones((8, 16)),
        ...                                                         jnp.ones((16, 4))).compile()
        >>> [i.op for i in instructions(compiled.as_text()) if i.op == "dot"]
        ['dot']
    """
    comps, _ = _computations(hlo_text)
    for computation, lines in comps.items():
        for _, ins in _parsed(computation, lines):
            yield ins


def _parsed(computation: str, lines: list[str]) -> Iterator[tuple[str, Instruction]]:
    # (line, instruction) for each line of one computation that is an instruction.
    for line in lines:
        m = _INSTR.match(line)
        if m:
            yield line, Instruction(computation, *m.groups())


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP_HEAD.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        comps[current].append(line)
    return comps, entry


def computation_weights(hlo_text: str, /) -> dict[str, tuple[int, bool]]:
    """Executions per run of each computation, and whether it runs inside a ``while`` loop.

    A loop body runs ``known_trip_count`` times per execution of its caller; counts add up over
    call sites and multiply through nested loops.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> f = jax.jit(lambda x: jax.lax.scan(lambda c, _: (jnp.sin(c), None), x, None,
        ...                                    length=6)[0])
        >>> weights = computation_weights(f.lower(jnp.ones(4)).compile().as_text())
        >>> max(weights.values())                   # the scan's body: 6 times, in a loop
        (6, True)
    """
    comps, entry = _computations(hlo_text)
    edges: dict[str, list[tuple[str, int, bool]]] = defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            op, rest = m.group(3), m.group(4)
            if op == "while":
                body = re.search(r"body=%?([^\s,}]+)", rest)
                trip = re.search(r'known_trip_count":\{"n":"(\d+)"', rest)
                cond = re.search(r"condition=%?([^\s,}]+)", rest)
                if body:
                    edges[name].append((body.group(1), int(trip.group(1)) if trip else 1, True))
                if cond:
                    edges[name].append((cond.group(1), 1, True))
                continue
            for callee in _CALLED.findall(rest):
                edges[name].append((callee, 1, False))
            for branches in _BRANCHES.findall(rest):
                for callee in re.findall(r"%?([^\s,]+)", branches):
                    edges[name].append((callee, 1, False))
    # Callers before callees (the call graph is a DAG from ENTRY), then sum over call sites.
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for callee, _, _ in edges.get(name, []):
            visit(callee)
        order.append(name)

    for root in [entry] if entry else list(comps):
        visit(root)
    weight: dict[str, int] = defaultdict(int)
    loop: dict[str, bool] = defaultdict(bool)
    for root in [entry] if entry else list(comps):
        weight[root] = max(weight[root], 1)
    for name in reversed(order):
        for callee, trip, is_loop in edges.get(name, []):
            weight[callee] += weight[name] * trip
            loop[callee] |= loop[name] or is_loop
    return {name: (weight[name] or 1, loop[name]) for name in comps}


def collectives(hlo_text: str, /, *, mesh: Mesh | None = None) -> list[Collective]:
    """Every collective of a compiled program, with mesh axes, bytes and loop trip counts.

    Args:
        hlo_text: ``compiled.as_text()``.
        mesh: the mesh the program was compiled for (to name the axes of each collective).

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> mesh = make_mesh(data=8)
        >>> x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("data")))
        >>> ops = collectives(jax.jit(lambda x: x.sum(0)).lower(x).compile().as_text(), mesh=mesh)
        >>> [(op.kind == "all-reduce", op.mesh_axes, op.group_size, op.in_loop) for op in ops]
        [(True, ('data',), 8, False)]
    """
    comps, _ = _computations(hlo_text)
    weights = computation_weights(hlo_text)
    out = []
    for name, lines in comps.items():
        w, loop = weights.get(name, (1, False))
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            op = m.group(3).removesuffix("-start")
            if op not in COLLECTIVES:
                continue
            kind = CollectiveKind(op)
            groups = parse_groups(m.group(4),
                                  num_devices=mesh.devices.size if mesh is not None else None)
            size = 2 if kind is CollectiveKind.COLLECTIVE_PERMUTE else (len(groups[0]) if groups else 1)
            out.append(Collective(
                kind, m.group(1), name, _shape_bytes(m.group(2)), size,
                mesh_axes_of(groups, mesh), w, loop,
            ))
    return out


class Dot(NamedTuple):
    """One ``dot`` of a compiled program: operand shapes, dimension numbers and executions."""

    computation: str                  # the computation it sits in (often a fusion's body)
    name: str                         # without the leading %
    dtype: str                        # of the result (``f32``, ``bf16``, ...)
    lhs: tuple[int, ...]              # operand and result shapes
    rhs: tuple[int, ...]
    result: tuple[int, ...]
    lhs_batch: tuple[int, ...]        # dimension numbers, as ``lax.dot_general`` takes them
    lhs_contracting: tuple[int, ...]
    rhs_batch: tuple[int, ...]
    rhs_contracting: tuple[int, ...]
    executions: int                   # per run of the program (loop trip counts multiplied in)
    in_loop: bool

    @property
    def flops(self) -> float:
        """``2 * prod(result) * prod(contracting dims)`` for one execution."""
        return 2.0 * math.prod(self.result) * math.prod(self.lhs[i] for i in self.lhs_contracting)

    @property
    def bytes(self) -> float:
        """Operand and result bytes of one execution, at the result's item size (a bf16 x bf16
        -> f32 dot is counted at 4 bytes an element: an upper bound)."""
        size = _DTYPE_BYTES.get(self.dtype, 4)
        return float(size * (math.prod(self.lhs) + math.prod(self.rhs) + math.prod(self.result)))


def dots(hlo_text: str, /) -> list[Dot]:
    """Every ``dot`` of a compiled (per-device) program, with the shapes XLA gave its operands.

    A dot fused into a ``fusion`` (XLA:CPU puts most of them there) is found in the fused
    computation and weighted by how often that fusion runs. Dots whose operand shapes cannot be
    read from the text are left out.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> f = jax.jit(lambda x, w: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0])
        >>> [(d.lhs, d.rhs, d.executions) for d in dots(f.lower(jnp.ones((8, 16)),
        ...                                                      jnp.ones((16, 16))).compile().as_text())]
        [((8, 16), (16, 16), 5)]
    """
    comps, _ = _computations(hlo_text)
    weights = computation_weights(hlo_text)
    out = []
    for name, lines in comps.items():
        w, loop = weights.get(name, (1, False))
        shapes: dict[str, tuple[int, ...]] = {}
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            iname, result, op, rest = m.groups()
            found = _SHAPE.match(result)
            if found:
                shapes[iname] = _dims(found.group(2))
            if op != "dot" or not found:
                continue
            operands = _operand_shapes(rest.split(")", 1)[0], shapes)
            if operands is None:
                continue

            def dims(key: str) -> tuple[int, ...]:
                got = re.search(key + r"=\{([0-9,]*)\}", rest)
                return _dims(got.group(1)) if got else ()

            out.append(Dot(name, iname, found.group(1), operands[0], operands[1], shapes[iname],
                           dims("lhs_batch_dims"), dims("lhs_contracting_dims"),
                           dims("rhs_batch_dims"), dims("rhs_contracting_dims"), w, loop))
    return out


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _operand_shapes(operands: str, shapes: dict[str, tuple[int, ...]]
                    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    # Operands print as "%a, %b" or, in some dumps, "f32[..]{..} %a, f32[..]{..} %b".
    inline = _SHAPE.findall(operands)
    if len(inline) >= 2:
        return _dims(inline[0][1]), _dims(inline[1][1])
    names = [part.strip().split()[-1].lstrip("%") for part in operands.split(",") if part.strip()]
    got = [shapes.get(n) for n in names[:2]]
    return (got[0], got[1]) if len(got) == 2 and None not in got else None


def dot_flops(hlo_text: str, /) -> dict[str, float]:
    """Matmul FLOPs of a compiled (per-device) program, each ``dot`` weighted by its executions.

    ``2 * prod(result dims) * prod(contracting dims)`` per dot (see :func:`dots`).
    ``cost_analysis()`` counts a ``while`` body once; a layer scan runs it once per layer, so
    this is the count to compare with an analytic figure.

    Returns:
        ``{"total", "in_loops", "outside_loops", "unweighted", "dots", "bytes"}`` per device and
        run (``bytes``: the dots' operand and result bytes, weighted the same way; see
        :attr:`Dot.bytes`).

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> f = jax.jit(lambda x, w: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0])
        >>> dot_flops(f.lower(jnp.ones((8, 16)), jnp.ones((16, 16))).compile().as_text())["total"]
        20480.0
    """
    out = {"total": 0.0, "in_loops": 0.0, "outside_loops": 0.0, "unweighted": 0.0, "dots": 0,
           "bytes": 0.0}
    for d in dots(hlo_text):
        out["dots"] += 1
        out["unweighted"] += d.flops
        out["total"] += d.flops * d.executions
        out["in_loops" if d.in_loop else "outside_loops"] += d.flops * d.executions
        out["bytes"] += d.bytes * d.executions
    return out


def summarize(ops: Iterable[Collective], /) -> dict[str, dict]:
    """Per ``kind@axes``: count, executions per step, result bytes and traffic per step."""
    table: dict[str, Counter] = defaultdict(Counter)
    for op in ops:
        key = f"{op.kind}@{'+'.join(op.mesh_axes) or '-'}"
        table[key]["ops"] += 1
        table[key]["executions"] += op.trip_count
        table[key]["in_loop"] += int(op.in_loop)
        table[key]["result_bytes_per_step"] += op.result_bytes * op.trip_count
        table[key]["traffic_bytes_per_step"] += op.traffic_per_step
    return {k: dict(v) for k, v in sorted(table.items())}


def collectives_in_loops(hlo_text: str, /) -> dict[str, int]:
    """Static count of collective ops, by kind, inside ``while`` loops (and what they call).

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from meshpar.mesh import make_mesh
        >>> split = NamedSharding(make_mesh(data=8), P(None, "data"))
        >>> w = jax.device_put(jnp.ones((3, 16, 16)), split)       # 3 layers, rows split
        >>> x = jax.device_put(jnp.ones((4, 16)), split)
        >>> f = jax.jit(lambda x, w: jax.lax.scan(lambda c, wl: (c @ wl, None), x, w)[0])
        >>> collectives_in_loops(f.lower(x, w).compile().as_text()) == {"all-reduce": 1}
        True
    """
    return dict(Counter(op.kind for op in collectives(hlo_text) if op.in_loop))


#: Ops that move no data of their own (views, tuples, control flow whose callees are counted,
#: markers) or whose cost is counted elsewhere (collectives: the planner's communication term).
_NO_TRAFFIC = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
    "call", "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency",
    *COLLECTIVES, *(f"{k}-start" for k in COLLECTIVES), *(f"{k}-done" for k in COLLECTIVES),
})
_SLICES = frozenset({"dynamic-slice", "slice", "gather"})
_OPERANDS = re.compile(r"%([^\s,()]+)")


def _fused_summary(lines: list[str]) -> tuple[bool, dict[int, int] | None, int | None]:
    """(has a dot, parameter number -> bytes read when every use slices it, in-place update
    bytes when the root is a dynamic-update-slice)."""
    params: dict[str, int] = {}
    sliced: dict[str, int] = {}
    whole: set[str] = set()
    has_dot, update = False, None
    shapes: dict[str, int] = {}
    for line, (_, name, result, op, rest) in _parsed("", lines):
        shapes[name] = _shape_bytes(result)
        if op == "parameter":
            params[name] = int(re.match(r"\s*(\d+)", rest).group(1))
            continue
        has_dot |= op in ("dot", "convolution")
        used = _OPERANDS.findall(rest.split(")", 1)[0])
        for i, u in enumerate(used):
            if u in params:
                if op in _SLICES and i == 0:
                    sliced[u] = sliced.get(u, 0) + shapes[name]
                elif op == "dynamic-update-slice" and i == 0:
                    sliced[u] = sliced.get(u, 0)  # written in place: the update counts
                else:
                    whole.add(u)
        if line.lstrip().startswith("ROOT") and op == "dynamic-update-slice" and len(used) > 1:
            update = shapes.get(used[1], 0)
    return has_dot, {params[p]: b for p, b in sliced.items() if p not in whole}, update


def memory_traffic(hlo_text: str, /) -> dict[str, float]:
    """Bytes a compiled (per-device) program reads and writes outside its matmuls, per run.

    Every instruction outside fused computations counts its result and operand bytes, weighted
    by the trip counts of the loops around it (:func:`computation_weights`; ``cost_analysis()``
    counts a ``while`` body once). A fusion counts what it reads and writes, not its internals:
    an operand it only slices (a layer's weights out of the scanned stack) counts the slice, a
    fusion updating a buffer in place (``dynamic-update-slice`` root) the update. Left out:
    views and control flow (``bitcast``, tuples, ``while``...), collectives (costed as
    communication) and matmuls (a ``dot``, or a fusion around one: costed as compute, see
    :func:`dots`). This is the memory-bound work (layer norms, softmax, the optimizer update,
    gradient accumulation, copies) whose time a FLOP count does not see.

    Returns:
        ``{"total": bytes, "in_loops": bytes, "instructions": executions counted}``.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> f = jax.jit(lambda x: jax.lax.scan(lambda c, _: (jnp.tanh(c) * 2, None), x, None,
        ...                                    length=5)[0])
        >>> memory_traffic(f.lower(jnp.ones((256, 256))).compile().as_text())["total"] >= 5 * 2 * 2**18
        True
    """
    comps, _ = _computations(hlo_text)
    weights = computation_weights(hlo_text)
    fused: set[str] = set()
    for name, lines in comps.items():
        for _, ins in _parsed(name, lines):
            if ins.op == "fusion" or "to_apply=" in ins.rest:
                fused.update(re.findall(r"(?:calls|to_apply)=%?([^\s,}]+)", ins.rest))
    summaries = {name: _fused_summary(comps[name]) for name in fused if name in comps}
    out = {"total": 0.0, "in_loops": 0.0, "instructions": 0}
    for name, lines in comps.items():
        if name in fused:
            continue
        w, loop = weights.get(name, (1, False))
        shapes: dict[str, int] = {}
        for _, (_, iname, result, op, rest) in _parsed(name, lines):
            shapes[iname] = size = _shape_bytes(result)
            if op in _NO_TRAFFIC or op in ("dot", "convolution"):
                continue
            operands = [shapes.get(u, 0) for u in _OPERANDS.findall(rest.split(")", 1)[0])]
            if op in _SLICES:
                moved = 2 * size
            elif op == "dynamic-update-slice":
                moved = 2 * (operands[1] if len(operands) > 1 else size)
            elif op == "fusion":
                callee = re.search(r"calls=%?([^\s,}]+)", rest)
                has_dot, sliced, update = summaries.get(callee.group(1) if callee else "",
                                                        (False, {}, None))
                if has_dot:
                    continue
                moved = (update if update is not None else size) + sum(
                    (sliced or {}).get(i, b) for i, b in enumerate(operands))
            else:
                moved = size + sum(operands)
            out["total"] += moved * w
            out["in_loops"] += moved * w if loop else 0.0
            out["instructions"] += w
    return out
