"""Parallel strategies as data: parameter, compute, gradient and optimizer-state rules.

A :class:`Strategy` does not run anything; it turns a mesh into rule tables. Which mesh axes
exist decides which kinds of parallelism are on, and the strategy's few fields decide how the
``fsdp`` axis is used:

=========  =====================================================================================
mesh axis  effect
=========  =====================================================================================
``data``   data parallel: the batch is split over it, parameters and optimizer state replicated
``fsdp``   ZeRO over it: stage 1 shards optimizer state, 2 also gradients (the accumulation
           buffer lives sharded), 3 also parameters (gathered per layer where they are used).
           It also splits the batch, as FSDP does.
``tensor`` Megatron tensor parallel: heads and MLP hidden split column-then-row, vocab split for
           the (un)embedding; with ``sequence_parallel`` the activations between blocks are split
           over ``seq`` on the same axis.
``pipe``   pipeline stages (see :mod:`meshpar.parallel.pipeline`); outside the pipelined stack
           the batch is split over it too where it divides (the embedding, head and loss).
=========  =====================================================================================

Presets are small values: ``dp``, ``zero1``, ``zero2``, ``zero3``, ``tp``, ``tp_sp``, and
``auto`` (ZeRO-3 over ``fsdp`` if present, TP over ``tensor`` if present, DP over ``data``).

Models annotated with **mesh-axis names** instead of logical names (Flax's Gemma example writes
``nnx.with_partitioning(init, ("tensor", "fsdp"))``, or a ``PartitionSpec``) compose with the
strategy: each mesh axis name used as a logical name asks for that axis, and gets it where the
strategy puts that kind of state there. In the weight tables ``tensor`` -> ``tensor``; ``fsdp`` ->
``fsdp`` only where the state is ZeRO-sharded (parameters from ZeRO-3, gradients from ZeRO-2,
optimizer state from ZeRO-1), else replicated; ``data`` and ``pipe`` never split a weight. In the
compute (activation) table ``data``, ``fsdp`` and ``tensor`` map to themselves (the batch is split
over ``data`` and ``fsdp``, and outside a pipelined stack over ``pipe`` too) and ``pipe`` as a
name is replicated. Any other axis of the mesh, used as a
name, maps to itself. These rows come first, so an explicit axis request beats a logical rule
for the same axis in the same tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from jax.sharding import Mesh

from meshpar.axes import DATA, FSDP, PIPE, TENSOR
from meshpar.errors import StrategyError
from meshpar.sharding.rules import MeshAxes, Rule, Rules

# Logical names meshpar's rules know. Every one has a row in the built-in tables (at least an
# explicit `(name, None)`), so the report lists only names a model uses that nobody mapped.
# `stages`/`repeats` are the leading axes of a pipelined stack (meshpar.train.plan).
PARAM_NAMES = ("vocab", "embed", "heads", "head_dim", "mlp", "layers", "seq", "stages", "repeats")
COMPUTE_NAMES = ("batch", *PARAM_NAMES)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How the mesh axes are used.

    Attributes:
        name: a label for reports.
        zero_stage: 0 (no ZeRO: DP only over ``fsdp`` too), 1, 2 or 3; acts on the ``fsdp`` axis.
        sequence_parallel: split activations between blocks over ``seq`` on the ``tensor`` axis.
        requires: mesh axes this strategy needs (checked by :meth:`check_mesh`).
        extra_param_rules: user parameter rules; they come first and replace the built-in
            rules for every logical name they mention. Their options (``strict``,
            ``on_indivisible``) apply to the whole table, even with no rows of their own.
        extra_compute_rules: user activation rules, likewise.
        pipeline_zero_stage: the ZeRO stage to use instead of a higher ``zero_stage`` on a mesh
            with a ``pipe`` axis of size > 1 (``None``: ``zero_stage`` everywhere); the
            ``auto`` preset sets 1 (see :meth:`for_mesh`).

    Example:
        >>> from meshpar.mesh import make_mesh
        >>> strategy = Strategy(zero_stage=3, sequence_parallel=True)
        >>> strategy.param_rules(make_mesh(fsdp=4, tensor=2)).describe()[:2]
        ['fsdp->fsdp', 'tensor->tensor']
    """

    name: str = "custom"
    zero_stage: Literal[0, 1, 2, 3] = 3
    sequence_parallel: bool = False
    requires: tuple[str, ...] = ()
    extra_param_rules: Rules = Rules()
    extra_compute_rules: Rules = Rules()
    pipeline_zero_stage: Literal[0, 1, 2, 3] | None = None

    def __post_init__(self) -> None:
        for field in ("zero_stage", "pipeline_zero_stage"):
            value = getattr(self, field)
            if (value is not None or field == "zero_stage") and (
                    isinstance(value, bool) or value not in (0, 1, 2, 3)):
                raise StrategyError(f"{field}={value!r}; ZeRO stages are 0, 1, 2 and 3")

    # -- mesh checks -------------------------------------------------------------------------

    def check_mesh(self, mesh: Mesh, /) -> None:
        """Raise :class:`StrategyError` if the mesh lacks an axis this strategy needs."""
        for axis in self.requires + ((TENSOR,) if self.sequence_parallel else ()):
            if axis not in mesh.shape:
                raise StrategyError(
                    f"strategy {self.name!r} needs a {axis!r} mesh axis, but the mesh has "
                    f"{dict(mesh.shape)}; add e.g. {axis}=2 to the mesh"
                )

    def for_mesh(self, mesh: Mesh, /) -> Strategy:
        """This strategy as applied to ``mesh``: checks the axes and, on a pipelined mesh,
        applies :attr:`pipeline_zero_stage`.

        ``auto`` is ZeRO-3 over ``fsdp``, except on a pipelined mesh, where it is ZeRO-1:
        ZeRO-3 re-gathers every stage's weights for every microbatch of the pipeline (DeepSpeed
        does not combine them at all), while ZeRO-1 keeps the optimizer-state saving and lets the
        pipeline sum gradients once per step. Ask for ``zero3``, or give the stage
        (``get_strategy("auto", zero_stage=3)``, ``--zero 3``), to get it anyway.
        """
        self.check_mesh(mesh)
        lower = self.pipeline_zero_stage
        if lower is not None and mesh.shape.get(PIPE, 1) > 1 and self.zero_stage > lower:
            return dataclasses.replace(self, zero_stage=lower)
        return self

    @staticmethod
    def batch_axes(mesh: Mesh, /) -> tuple[str, ...]:
        """The mesh axes the batch is split over: ``data`` and ``fsdp`` where present."""
        return tuple(a for a in (DATA, FSDP) if a in mesh.shape)

    def check_batch(self, mesh: Mesh, /, global_batch_size: int, *, microbatches: int = 1) -> None:
        """Raise :class:`StrategyError` unless the batch divides over batch axes × microbatches."""
        axes = self.batch_axes(mesh)
        need = math.prod(mesh.shape[a] for a in axes) * microbatches
        if global_batch_size % need:
            split = " x ".join(f"{a}={mesh.shape[a]}" for a in axes) or "no batch axes"
            raise StrategyError(
                f"global batch size {global_batch_size} is not divisible by the batch-sharding "
                f"axes ({split}) times microbatches={microbatches} = {need}; use a batch size "
                f"that is a multiple of {need}"
            )

    # -- rule tables -------------------------------------------------------------------------

    def param_rules(self, mesh: Mesh, /) -> Rules:
        """Where parameters live."""
        return self._weights(mesh, shard_fsdp=self.zero_stage >= 3, extra=self.extra_param_rules)

    def optimizer_rules(self, mesh: Mesh, /) -> Rules:
        """Where optimizer state lives (sharded over ``fsdp`` from ZeRO-1 on)."""
        return self._weights(mesh, shard_fsdp=self.zero_stage >= 1, extra=self.extra_param_rules)

    def gradient_rules(self, mesh: Mesh, /) -> Rules:
        """Where gradients and the accumulation buffer live (sharded from ZeRO-2 on)."""
        return self._weights(mesh, shard_fsdp=self.zero_stage >= 2, extra=self.extra_param_rules)

    def compute_rules(self, mesh: Mesh, /) -> Rules:
        """How activations, and weights at the moment they are used, are laid out.

        Weights resolved through these rules lose their ``fsdp`` split: a constraint with these
        rules inside a layer is the ZeRO-3 all-gather.
        """
        self.check_mesh(mesh)
        t = TENSOR in mesh.shape
        # Activations annotated with mesh-axis names get the axes they name: the batch is
        # split over data and fsdp anyway, and tensor is tensor parallel.
        rows: list[tuple[str, MeshAxes] | Rule] = _axis_name_rows(
            mesh, {DATA: DATA in mesh.shape, FSDP: FSDP in mesh.shape, TENSOR: t, PIPE: False}
        )
        batch = self.batch_axes(mesh)
        if mesh.shape.get(PIPE, 1) > 1:
            # Outside the pipelined stack (the embedding, the head and the loss) every stage
            # would otherwise compute the same rows: split them over pipe as well. Inside the
            # stages pipe is manual and drops out of this rule. Measured (issue 13's small model,
            # pipe=2,fsdp=4 circular, bf16, interleaved): step 0.78x.
            rows.append(Rule("batch", batch + (PIPE,), if_divisible=True))
        if batch:
            rows.append(("batch", batch if len(batch) > 1 else batch[0]))
        if self.sequence_parallel:
            rows.append(("seq", TENSOR))
        if t:
            rows += [("heads", TENSOR), ("mlp", TENSOR), ("vocab", TENSOR)]
        # Explicit fallbacks: under sequence parallel, a tensor with both 'seq' and 'vocab'
        # (the logits) keeps the sequence split and replicates the vocabulary. The other names
        # are replicated on purpose (weights at the moment they are used lose their fsdp split).
        rows += [(name, None) for name in COMPUTE_NAMES]
        return _with_extra(self.extra_compute_rules, Rules.table(rows))

    def _weights(self, mesh: Mesh, *, shard_fsdp: bool, extra: Rules) -> Rules:
        self.check_mesh(mesh)
        t = TENSOR in mesh.shape
        f = shard_fsdp and FSDP in mesh.shape
        # A weight annotated with mesh-axis names gets tensor where the mesh has it and fsdp
        # only where this kind of state is ZeRO-sharded; data and pipe never split a weight.
        rows: list[tuple[str, MeshAxes] | Rule] = _axis_name_rows(
            mesh, {DATA: False, FSDP: f, TENSOR: t, PIPE: False}
        )
        if t:
            # Megatron: column-parallel in (heads, mlp), row-parallel out, vocab-parallel
            # (un)embedding. The same names on both matmuls make the pairing automatic.
            rows += [("vocab", TENSOR), ("heads", TENSOR), ("mlp", TENSOR)]
        if f:
            if not t:
                # An embedding table [vocab, embed] is split over its vocabulary where that
                # divides: its gradient (the lookup's scatter-add plus the tied unembedding's
                # dot) comes out vocab-major, and a split over embed made XLA:CPU transpose the
                # whole fp32 gradient before its reduce-scatter. Measured (issue 13's small
                # model, fsdp=8, bf16, interleaved): step 0.88x. With tensor, vocab is
                # tensor's and embed stays the fsdp dimension (a vocab split over both was 1.11x).
                rows.append(Rule("vocab", (FSDP,), if_divisible=True))
            # ZeRO/FSDP: split the model or the MLP dimension, whichever comes first in the
            # weight (major-most): a weight's gradient comes out of its matmul in the weight's
            # layout, and a split over a minor dimension made XLA:CPU copy it transposed into
            # the reduce-scatter's operand at every layer (the MLP's [mlp, embed] output
            # weight: 6% of the 20m preset's fsdp=8 op time, gone with the major split; the
            # step, interleaved A/B, bf16: 0.94-1.01x on 20m, 0.99x on the small preset).
            # Under tensor parallel mlp is tensor's, so that weight keeps fsdp on embed.
            rows += [Rule("embed", (FSDP,), major_first=True),
                     Rule("mlp", (FSDP,), major_first=True)]
        if PIPE in mesh.shape:
            # Pipelined stacks are stored [stages, layers/stage, ...] (see meshpar.train).
            rows.append(("stages", PIPE))
        # Explicit fallbacks for every name meshpar knows: replicated on purpose, not unmatched.
        rows += [(name, None) for name in PARAM_NAMES]
        return _with_extra(extra, Rules.table(rows))

    def describe(self, mesh: Mesh, /) -> str:
        """What this strategy does on ``mesh``, for run summaries: ``"name -> what applies"``.

        ``auto`` and the presets are resolved against the mesh (:meth:`for_mesh`), so the text
        says what actually runs: ZeRO over ``fsdp`` at its stage (DP over it at stage 0), TP over
        ``tensor`` (with sequence parallel: TP+SP), DP over ``data``, and a pipeline over
        ``pipe``; other axes where the user's rules name them. Axes of size 1 do nothing and are
        left out.

        Raises:
            StrategyError: the mesh lacks an axis this strategy needs.

        Example:
            >>> from meshpar.mesh import make_mesh
            >>> get_strategy("auto").describe(make_mesh(fsdp=4, tensor=2))
            'auto -> ZeRO-3 over fsdp + TP over tensor'
            >>> get_strategy("auto").describe(make_mesh(pipe=2, fsdp=4))
            'auto -> ZeRO-1 over fsdp (pipelined over pipe=2)'
        """
        applied = self.for_mesh(mesh)
        size = lambda axis: mesh.shape.get(axis, 1)  # noqa: E731
        parts = []
        dp = [DATA] if size(DATA) > 1 else []
        if size(FSDP) > 1:
            if applied.zero_stage:
                parts.append(f"ZeRO-{applied.zero_stage} over {FSDP}")
            else:
                dp.append(FSDP)
        if size(TENSOR) > 1:
            parts.append(f"{'TP+SP' if applied.sequence_parallel else 'TP'} over {TENSOR}")
        if dp:
            parts.append(f"DP over {' x '.join(dp)}")
        # Other axes do something only through the user's own rules.
        named = {a for rules in (self.extra_param_rules, self.extra_compute_rules)
                 for rule in rules.logical for a in rule.mesh_axes}
        parts += [f"user rules over {a}" for a, n in mesh.shape.items()
                  if n > 1 and a not in (DATA, FSDP, TENSOR, PIPE) and a in named]
        text = " + ".join(parts) or "no parallelism"
        if size(PIPE) > 1:
            text += f" (pipelined over {PIPE}={size(PIPE)})"
        return f"{self.name} -> {text}"


def _axis_name_rows(mesh: Mesh, split: dict[str, bool]) -> list[tuple[str, MeshAxes]]:
    """Rules for mesh-axis names used as logical names: ``(axis, axis)`` where ``split[axis]``
    (a mesh axis meshpar's strategies do not know always maps to itself), then ``(axis, None)``
    for each known axis, so that e.g. ``fsdp`` on a mesh without it is replicated, not unmatched."""
    rows: list[tuple[str, MeshAxes]] = []
    for axis in mesh.axis_names:
        if split.get(axis, True):
            rows.append((axis, axis))
    rows += [(axis, None) for axis in (DATA, FSDP, TENSOR, PIPE)]
    return rows


def _with_extra(extra: Rules, base: Rules) -> Rules:
    # User rules come first, so under first-free semantics they take precedence per name; the
    # merge raises if the user gave a different rule list for a name the base also maps. The
    # user's options (strict, on_indivisible) always apply, even with no rows of their own.
    names = {r.logical for r in extra.logical}
    base = dataclasses.replace(base, logical=tuple(r for r in base.logical if r.logical not in names))
    return extra.merge(dataclasses.replace(base, on_indivisible=extra.on_indivisible, strict=extra.strict))


PRESETS: dict[str, Strategy] = {
    "auto": Strategy("auto", zero_stage=3, pipeline_zero_stage=1),
    "dp": Strategy("dp", zero_stage=0),
    "zero1": Strategy("zero1", zero_stage=1, requires=(FSDP,)),
    "zero2": Strategy("zero2", zero_stage=2, requires=(FSDP,)),
    "zero3": Strategy("zero3", zero_stage=3, requires=(FSDP,)),
    "tp": Strategy("tp", zero_stage=0, requires=(TENSOR,)),
    "tp_sp": Strategy("tp_sp", zero_stage=0, sequence_parallel=True, requires=(TENSOR,)),
}


def get_strategy(
    strategy: str | Strategy = "auto", /, *, zero_stage: int | None = None,
    sequence_parallel: bool | None = None,
) -> Strategy:
    """A preset by name (or a Strategy), with optional overrides.

    ``zero_stage`` is the stage that runs, on a pipelined mesh too: it clears the strategy's
    :attr:`~Strategy.pipeline_zero_stage` (``auto`` alone lowers ZeRO-2/3 to ZeRO-1 on a
    pipelined mesh; ``auto`` with ``zero_stage=3``, ``meshpar train --zero 3``, is ZeRO-3 there).

    Raises:
        StrategyError: unknown preset name or ZeRO stage.

    Example:
        >>> from meshpar.mesh import make_mesh
        >>> get_strategy("tp", zero_stage=3).zero_stage
        3
        >>> get_strategy("auto", zero_stage=3).for_mesh(make_mesh(pipe=2, fsdp=4)).zero_stage
        3
    """
    if isinstance(strategy, str):
        if strategy not in PRESETS:
            raise StrategyError(
                f"unknown strategy {strategy!r}; presets are {', '.join(PRESETS)}"
            )
        strategy = PRESETS[strategy]
    elif not isinstance(strategy, Strategy):
        raise StrategyError(f"strategy must be a preset name or a Strategy, got {strategy!r}")
    changes = {}
    if zero_stage is not None:
        if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3):
            raise StrategyError(f"unknown ZeRO stage {zero_stage!r}; stages are 0, 1, 2 and 3")
        # An explicit stage is what the caller asked for: not lowered on a pipelined mesh (the
        # planner's z2/z3 pipelines, `--strategy auto --zero 3`, ran ZeRO-1 while it was).
        changes["zero_stage"] = zero_stage
        changes["pipeline_zero_stage"] = None
    if sequence_parallel is not None:
        changes["sequence_parallel"] = sequence_parallel
    return dataclasses.replace(strategy, **changes) if changes else strategy
