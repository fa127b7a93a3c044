"""Sharding rules: from logical axis names to mesh axes.

A :class:`Rules` value is an ordered table of ``(logical name, mesh axes)`` pairs plus optional
regex rules that give logical names to parameters nobody annotated. meshpar resolves it itself,
once per tensor, with these semantics (not Flax's last-rule-wins rename):

* The table order is the priority. For each dimension with logical name ``n``, **the first rule
  for ``n`` whose mesh axes are all still free in this tensor wins**; rules are applied in table
  order across the whole tensor, so an earlier rule claims its mesh axes before a later rule for
  another dimension of the same tensor (``embed->fsdp`` listed before ``mlp->fsdp`` puts ``fsdp``
  on the ``embed`` dimension of an ``(mlp, embed)`` weight). A rule may map to one mesh axis, a
  tuple of axes (the dimension is split over their product) or ``None`` (replicated, always
  free: use it as an explicit fallback).
* A logical name with no rule at all is replicated and recorded as unmatched
  (:attr:`Resolution.unmatched`; plans report it), or, with ``strict=True``, an error. Give
  names you mean to replicate an explicit ``(name, None)`` row (meshpar's presets do).
* A dimension's entry may be a tuple of names (a ``PartitionSpec`` entry such as
  ``('data', 'fsdp')``): each name resolves on its own and the dimension is split over the
  product of their mesh axes, in the entry's order.
* Consecutive rules marked ``major_first`` (:class:`Rule`) are tried in the tensor's dimension
  order instead: the major-most dimension they name claims the mesh axes first. meshpar's ZeRO
  rules use it so that ``fsdp`` splits a weight's major dimension, where the gradient's
  reduce-scatter can take it straight from the matmul (no transposed copy).
* A logical name that has rules but whose mesh axes are all taken by earlier dimensions is an
  error (:class:`RuleConflictError`): two dimensions of one tensor need the same mesh axis. Add a
  ``(name, None)`` fallback rule to allow replication.
* A dimension that its mesh axes do not divide raises :class:`IndivisibleError`, unless the rules
  opt in with ``on_indivisible="replicate"``; each such fallback is recorded and reported.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from typing import Literal

from jax.sharding import Mesh, PartitionSpec

from meshpar.errors import (
    IndivisibleError,
    RuleConflictError,
    RuleError,
    UnannotatedParameterError,
)

MeshAxes = str | tuple[str, ...] | None
#: One entry per dimension: a logical name, a tuple of names (split over their product) or None.
LogicalAxes = tuple[str | tuple[str, ...] | None, ...]


def _as_axes(mesh_axes: MeshAxes, *, where: str) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    if isinstance(mesh_axes, (tuple, list)) and all(isinstance(a, str) for a in mesh_axes):
        if len(set(mesh_axes)) != len(mesh_axes):
            raise RuleError(f"{where}: mesh axes {tuple(mesh_axes)} repeat an axis")
        return tuple(mesh_axes)
    raise RuleError(f"{where}: mesh axes must be a str, a tuple of str or None, got {mesh_axes!r}")


def _in_dimension_order(rules: Sequence[Rule],
                        parts: Sequence[tuple[str, ...]]) -> list[Rule]:
    """``rules`` with each run of consecutive ``major_first`` rules sorted by the first dimension
    of this tensor that the rule's name labels (rules naming no dimension keep their place
    after those that do). Stable: rules naming the same dimension keep the table order."""
    first = {}
    for dim, names in enumerate(parts):
        for logical in names:
            first.setdefault(logical, dim)
    out: list[Rule] = []
    group: list[Rule] = []
    for rule in (*rules, None):
        if rule is not None and rule.major_first:
            group.append(rule)
            continue
        out += sorted(group, key=lambda r: first.get(r.logical, len(parts)))
        group = []
        if rule is not None:
            out.append(rule)
    return out


def _as_entry(entry: object, *, where: str) -> str | tuple[str, ...] | None:
    # A list entry (from JSON or a user's list) means the same as the tuple.
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
        return tuple(entry) if len(entry) != 1 else entry[0]
    raise RuleError(
        f"{where}: logical axis {entry!r} is not a name, a tuple of names or None"
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the table: ``logical`` may be split over ``mesh_axes`` (``()`` = replicated).

    Attributes:
        logical: the logical axis name the rule applies to.
        mesh_axes: the mesh axes it splits that dimension over (``()``: replicated).
        if_divisible: a preference, not a demand: where the dimension does not divide over
            ``mesh_axes`` the rule is passed over (said in the tensor's resolution, never an
            error) and the next rules decide, as if this one were absent.
        major_first: consecutive ``major_first`` rules form a group that is tried in each
            tensor's dimension order (major-most first) instead of the table's: with
            ``embed->fsdp`` and ``mlp->fsdp`` both ``major_first``, an ``(mlp, embed)`` weight
            is split over ``mlp`` and an ``(embed, mlp)`` weight over ``embed``.

    Example:
        >>> import meshpar as mp
        >>> rules = mp.Rules.table([mp.Rule("vocab", ("fsdp",), if_divisible=True),
        ...                         ("embed", "fsdp"), ("embed", None)])
        >>> mesh = mp.make_mesh(fsdp=8)
        >>> rules.resolve(("vocab", "embed"), (256, 64), mesh).spec   # vocab divides: fsdp
        P('fsdp',)
        >>> rules.resolve(("vocab", "embed"), (250, 64), mesh).spec   # it does not: embed's
        P(None, 'fsdp')
    """

    logical: str
    mesh_axes: tuple[str, ...]
    if_divisible: bool = False
    major_first: bool = False

    def __str__(self) -> str:
        target = "replicated" if not self.mesh_axes else "×".join(self.mesh_axes)
        return (f"{self.logical}->{target}" + (" if divisible" if self.if_divisible else "")
                + (" major-most first" if self.major_first else ""))


@dataclasses.dataclass(frozen=True)
class PathRule:
    """Gives logical axes to parameters whose ``/``-joined path matches ``pattern`` (re.search)."""

    pattern: str
    logical_axes: LogicalAxes

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise RuleError(f"path rule {self.pattern!r} is not a valid regex: {err}") from None


@dataclasses.dataclass(frozen=True)
class DimResolution:
    """How one dimension of one tensor was resolved."""

    logical: str | tuple[str, ...] | None
    mesh_axes: tuple[str, ...]
    rule: str  # the rule that matched, or why none did
    fallback: str | None = None  # set when an opt-in replication fallback was taken
    unmatched: tuple[str, ...] = ()  # logical names no rule maps (replicated)
    replicated_by_rule: bool = False  # a rule (name, None) asked for replication
    passed_over: tuple[Rule, ...] = ()  # if_divisible rules that did not divide here


@dataclasses.dataclass(frozen=True)
class Resolution:
    """The PartitionSpec of one tensor and how each dimension got its entry."""

    spec: PartitionSpec
    dims: tuple[DimResolution, ...]

    @property
    def fallbacks(self) -> tuple[str, ...]:
        return tuple(d.fallback for d in self.dims if d.fallback)

    @property
    def unmatched(self) -> tuple[str, ...]:
        """Logical names of this tensor that no rule maps (replicated, or an error if strict)."""
        return tuple(n for d in self.dims for n in d.unmatched)

    @property
    def rules_text(self) -> str:
        """The rules that placed a dimension (or were refused as indivisible), comma-separated."""
        used = [d.rule for d in self.dims if d.mesh_axes or d.fallback or d.replicated_by_rule]
        return ", ".join(used) if used else "-"


@dataclasses.dataclass(frozen=True)
class Rules:
    """An ordered table of logical-to-mesh rules, plus path rules for unannotated parameters.

    Attributes:
        logical: the ordered rules.
        paths: regex path rules, first match wins; consulted only for parameters without logical
            axes of their own.
        on_indivisible: ``"error"`` (default) or ``"replicate"``: opt in to replicating a dimension
            that does not divide its mesh axes (recorded as a fallback).
        strict: raise for a parameter with no logical axes and no matching path rule, and for a
            logical name that no rule maps, instead of replicating it (and reporting it).

    Example:
        >>> from meshpar.mesh import make_mesh
        >>> rules = Rules.table([("batch", ("data", "fsdp")), ("mlp", "tensor"), ("mlp", None)])
        >>> mesh = make_mesh(data=2, fsdp=2, tensor=2)
        >>> rules.resolve(("batch", "mlp"), (8, 64), mesh).spec
        P(('data', 'fsdp'), 'tensor')
    """

    logical: tuple[Rule, ...] = ()
    paths: tuple[PathRule, ...] = ()
    on_indivisible: Literal["error", "replicate"] = "error"
    strict: bool = False

    def __post_init__(self) -> None:
        if self.on_indivisible not in ("error", "replicate"):
            raise RuleError(
                f"on_indivisible={self.on_indivisible!r}; expected 'error' or 'replicate'"
            )

    @classmethod
    def table(
        cls,
        rows: Iterable[tuple[str, MeshAxes] | Rule] = (),
        /,
        *,
        paths: Iterable[tuple[str, Sequence[str | None]]] = (),
        on_indivisible: Literal["error", "replicate"] = "error",
        strict: bool = False,
    ) -> Rules:
        """Build rules from ``(logical, mesh_axes)`` rows (or :class:`Rule` values) and
        ``(regex, logical_axes)`` rows.

        Example:
            >>> rules = Rules.table([("embed", "fsdp"), ("embed", None)],
            ...                     paths=[(r"kernel$", ("embed", None))])
            >>> rules.describe()
            ['embed->fsdp', 'embed->replicated', "path 'kernel$' -> ('embed', None)"]
        """
        logical = []
        for row in rows:
            if isinstance(row, Rule):
                logical.append(row)
                continue
            if not (isinstance(row, (tuple, list)) and len(row) == 2 and isinstance(row[0], str)):
                raise RuleError(f"rule {row!r} is not a (logical_name, mesh_axes) pair or a Rule")
            logical.append(Rule(row[0], _as_axes(row[1], where=f"rule {row[0]!r}")))
        path_rules = [PathRule(p, tuple(axes)) for p, axes in paths]
        return cls(tuple(logical), tuple(path_rules), on_indivisible, strict)

    # -- combining ---------------------------------------------------------------------------

    def merge(self, other: Rules, /) -> Rules:
        """Combine two rule sets; rules of ``self`` come first.

        Raises:
            RuleConflictError: both sets have rules for one logical name (or one path pattern)
                and the rules differ, or their options differ.
        """
        mine = self._by_name()
        theirs = other._by_name()
        for name in mine.keys() & theirs.keys():
            if mine[name] != theirs[name]:
                raise RuleConflictError(
                    f"rule sets disagree on logical axis {name!r}: "
                    f"{[str(r) for r in mine[name]]} vs {[str(r) for r in theirs[name]]}; "
                    "drop one of them or make them identical"
                )
        my_paths = {p.pattern: p.logical_axes for p in self.paths}
        for p in other.paths:
            if p.pattern in my_paths and my_paths[p.pattern] != p.logical_axes:
                raise RuleConflictError(
                    f"rule sets disagree on path rule {p.pattern!r}: "
                    f"{my_paths[p.pattern]} vs {p.logical_axes}"
                )
        if (self.on_indivisible, self.strict) != (other.on_indivisible, other.strict):
            raise RuleConflictError(
                "rule sets disagree on options: "
                f"on_indivisible={self.on_indivisible!r}/{other.on_indivisible!r}, "
                f"strict={self.strict}/{other.strict}"
            )
        extra = tuple(r for r in other.logical if r.logical not in mine)
        extra_paths = tuple(p for p in other.paths if p.pattern not in my_paths)
        return dataclasses.replace(self, logical=self.logical + extra, paths=self.paths + extra_paths)

    def _by_name(self) -> dict[str, list[Rule]]:
        out: dict[str, list[Rule]] = {}
        for rule in self.logical:
            out.setdefault(rule.logical, []).append(rule)
        return out

    # -- checking and resolving -------------------------------------------------------------

    def validate(self, mesh: Mesh, /) -> None:
        """Raise :class:`RuleError` if a rule names a mesh axis that ``mesh`` does not have."""
        for rule in self.logical:
            for axis in rule.mesh_axes:
                if axis not in mesh.shape:
                    raise RuleError(
                        f"rule {rule} names mesh axis {axis!r}, but the mesh has axes "
                        f"{tuple(mesh.shape)}; add the axis to the mesh (size 1 is fine) or "
                        "drop the rule"
                    )

    def path_axes(self, path: str, /) -> tuple[PathRule, LogicalAxes] | None:
        """The first path rule matching ``path`` and its logical axes, or ``None``."""
        for rule in self.paths:
            if re.search(rule.pattern, path):
                return rule, rule.logical_axes
        return None

    def resolve(
        self,
        logical_axes: Sequence[str | None],
        shape: Sequence[int],
        mesh: Mesh,
        /,
        *,
        name: str = "tensor",
        skip_axes: Iterable[str] = (),
    ) -> Resolution:
        """Resolve the PartitionSpec of one tensor.

        Args:
            logical_axes: one logical name, tuple of names (split over their product) or
                ``None`` per dimension.
            shape: the tensor's global shape.
            mesh: the mesh the spec is for.
            name: the tensor's name (parameter path), used in error messages.
            skip_axes: mesh axes that are manual in the current ``shard_map`` (the pipeline's
                ``pipe``, the batch axes of a gradient-accumulation loop): a dimension is already
                local along them, so they are dropped from every rule's mesh axes.

        Raises:
            RuleError: wrong number of logical axes, or a rule naming an axis not in the mesh.
            UnannotatedParameterError: ``strict`` rules and a logical name no rule maps.
            RuleConflictError: two dimensions need the same mesh axis and no fallback exists.
            IndivisibleError: a dimension is not divisible by its mesh axes' size (unless
                ``on_indivisible="replicate"``).
        """
        logical_axes = tuple(_as_entry(a, where=name) for a in logical_axes)
        shape = tuple(int(s) for s in shape)
        if len(logical_axes) != len(shape):
            raise RuleError(
                f"{name}: {len(logical_axes)} logical axes {logical_axes} for a tensor of rank "
                f"{len(shape)} (shape {shape})"
            )
        by_name = self._by_name()
        skip = frozenset(skip_axes)
        # A dimension's entry is one name or a tuple of names (a PartitionSpec entry such as
        # ('data', 'fsdp')); each name is resolved on its own and the dimension is split over
        # the product of what they get, in the entry's order.
        parts = [() if a is None else (a,) if isinstance(a, str) else a for a in logical_axes]
        used: dict[str, str | None] = {}
        chosen: dict[tuple[int, int], DimResolution] = {}
        # (dim, part) -> the if_divisible rule that did not divide there, and its text.
        passed: dict[tuple[int, int], tuple[Rule, str]] = {}
        # Rule-major: the table order is the priority order across the whole tensor, so a rule
        # placed earlier claims its mesh axes before a later rule for another dimension does
        # (except within a group of major_first rules: see _in_dimension_order).
        for rule in _in_dimension_order(self.logical, parts):
            if skip & set(rule.mesh_axes):
                rule = dataclasses.replace(
                    rule, mesh_axes=tuple(a for a in rule.mesh_axes if a not in skip))
            for dim, (names, size) in enumerate(zip(parts, shape)):
                for part, logical in enumerate(names):
                    if logical != rule.logical or (dim, part) in chosen:
                        continue
                    if any(a in used for a in rule.mesh_axes):
                        continue  # taken: a later rule for this name may still apply
                    for axis in rule.mesh_axes:
                        if axis not in mesh.shape:
                            raise RuleError(
                                f"{name}: rule {rule} names mesh axis {axis!r}, but the mesh has "
                                f"axes {tuple(mesh.shape)}"
                            )
                    ways = math.prod(mesh.shape[a] for a in rule.mesh_axes)
                    # Divisibility counts the axes the dimension's other names already took.
                    before = math.prod(
                        mesh.shape[a] for (d, _), r in chosen.items() if d == dim
                        for a in r.mesh_axes
                    )
                    if size % (ways * before) and rule.if_divisible:
                        passed[dim, part] = (rule, f"{rule}: not taken, size {size} does not "
                                                   f"divide over {ways * before}")
                        continue
                    if size % (ways * before):
                        detail = (
                            f"{name} (shape {shape}): dimension {dim} ({logical!r}, size {size}) "
                            "is not "
                            + (f"divisible by mesh axis {rule.mesh_axes[0]!r} of size {ways}"
                               if len(rule.mesh_axes) == 1 else
                               f"divisible by mesh axes {rule.mesh_axes} of size {ways} "
                               f"({' x '.join(f'{a}={mesh.shape[a]}' for a in rule.mesh_axes)})")
                            + (f" times the {before} ways its other names already split it"
                               if before > 1 else "")
                        )
                        if self.on_indivisible == "replicate":
                            chosen[dim, part] = DimResolution(
                                logical, (), f"{rule}:indivisible", detail
                            )
                            continue
                        raise IndivisibleError(
                            detail + f". Fix: choose a size divisible by {ways * before}, change "
                            f"the mesh, add an earlier rule for {logical!r}, or opt in to "
                            "replication with Rules(on_indivisible='replicate')"
                        )
                    for axis in rule.mesh_axes:
                        used[axis] = logical
                    chosen[dim, part] = DimResolution(
                        logical, rule.mesh_axes, str(rule), replicated_by_rule=not rule.mesh_axes
                    )
        entries: list[str | tuple[str, ...] | None] = []
        dims: list[DimResolution] = []
        for dim, (names, size) in enumerate(zip(parts, shape)):
            got: list[DimResolution] = []
            for part, logical in enumerate(names):
                if (dim, part) in chosen and (dim, part) in passed:
                    r = chosen[dim, part]
                    skipped, why = passed[dim, part]
                    got.append(dataclasses.replace(r, rule=f"{why}; {r.rule}",
                                                   passed_over=(skipped,)))
                elif (dim, part) in chosen:
                    got.append(chosen[dim, part])
                elif (dim, part) in passed:
                    # Only a preference named it and it did not divide: replicated, as said.
                    skipped, why = passed[dim, part]
                    got.append(DimResolution(logical, (), why, replicated_by_rule=True,
                                             passed_over=(skipped,)))
                elif logical not in by_name:
                    if self.strict:
                        raise UnannotatedParameterError(
                            f"{name} (shape {shape}): dimension {dim} has logical axis "
                            f"{logical!r}, which no rule maps (strict rules; the mesh has axes "
                            f"{dict(mesh.shape)}). Fix: add a rule ({logical!r}, <mesh axis>) "
                            f"to shard it or ({logical!r}, None) to replicate it"
                        )
                    got.append(DimResolution(logical, (), f"{logical}:no rule", None, (logical,)))
                else:
                    candidates = by_name[logical]
                    taken = {a: used[a] for r in candidates for a in r.mesh_axes if a in used}
                    raise RuleConflictError(
                        f"{name} (shape {shape}): dimension {dim} ({logical!r}) needs mesh axes "
                        f"{[r.mesh_axes for r in candidates]}, but "
                        + ", ".join(f"{a!r} is already used by {owner!r}"
                                    for a, owner in taken.items())
                        + "; two logical axes of one tensor cannot share a mesh axis. Add a "
                        f"fallback rule ({logical!r}, None) to replicate it, or map it to another "
                        "mesh axis"
                    )
            if not got:
                res = DimResolution(None, (), "-")
            elif len(got) == 1 and isinstance(logical_axes[dim], str):
                res = got[0]
            else:
                res = DimResolution(
                    logical_axes[dim], tuple(a for r in got for a in r.mesh_axes),
                    ", ".join(r.rule for r in got),
                    "; ".join(r.fallback for r in got if r.fallback) or None,
                    tuple(n for r in got for n in r.unmatched),
                    any(r.replicated_by_rule for r in got),
                    tuple(p for r in got for p in r.passed_over),
                )
            dims.append(res)
            axes = res.mesh_axes
            entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        while entries and entries[-1] is None:
            entries.pop()
        return Resolution(PartitionSpec(*entries), tuple(dims))

    def describe(self) -> list[str]:
        """One line per rule, for reports."""
        lines = [str(r) for r in self.logical]
        lines += [f"path {p.pattern!r} -> {p.logical_axes}" for p in self.paths]
        return lines
