"""Pipeline schedules as pure tables: which microbatch (and repeat) each stage runs when.

Everything here is plain Python and NumPy: no JAX, no devices. :func:`schedule_table` and
:func:`repeat_table` are what :func:`meshpar.parallel.pipeline.pipeline_apply` *executes* (it embeds them as
constants and looks up its slot each iteration), so a picture drawn from them is the loop.

The schedules, with ``P`` stages, ``M`` microbatches and ``v`` repeats (``v = 1`` for GPipe):

* Work items are numbered ``k = r*M + m`` (repeat ``r``, microbatch ``m``). Stage ``s`` runs item
  ``k = t - s`` at iteration ``t`` when ``0 <= k < v*M``; otherwise it idles (a *bubble*).
  That is ``v*M + P - 1`` iterations, of which each stage idles ``P - 1``.
* **gpipe** (``v = 1``): microbatch ``m`` enters stage 0 at iteration ``m`` and leaves the last
  stage at ``m + P - 1``.
* **circular** (``v > 1``, "interleaved"/looped): stage ``s`` holds ``v`` chunks of layers, chunk
  ``r`` being layers ``(r*P + s)*c ... (r*P + s)*c + c - 1``; a microbatch goes round the ring of
  stages ``v`` times. Microbatch ``m``, repeat ``r`` leaves the last stage at ``r*M + m + P - 1``
  and needs stage 0 again at ``(r+1)*M + m``, so the schedule needs ``M >= P`` (it waits in a
  buffer on stage 0 for ``M - P`` iterations). The bubble fraction falls from
  ``(P-1)/(M+P-1)`` to ``(P-1)/(v*M+P-1)``.
* **1f1b** and **interleaved-1f1b** use the gpipe and circular layouts; their forward loop
  (:func:`onef1b_forward`) is gpipe's table for 1f1b and Megatron-LM's interleaved order for
  interleaved-1f1b (groups of ``P`` microbatches through all chunks, so nothing waits on stage
  0), and their backward pass is its own loop (:mod:`meshpar.parallel.onef1b`), whose tick
  tables :func:`onef1b_table` builds by running each stage's action list (PipeDream-flush, or
  Megatron-LM's interleaved order) as early as its inputs arrive. Both loops carry the routes of
  the stack's boundary values (:mod:`meshpar.parallel.routes`). They need ``M >= P`` (and, for
  interleaved-1f1b, ``M`` a multiple of ``P``).

Activations a pipeline keeps per device, in microbatch activations ``|x|``
(:attr:`PipelineConfig.activation_slots`, :func:`activation_bound`): gpipe ``2M + P - 1``,
circular ``(v+1)M + P - 1`` (linear in ``M``); 1f1b ``P + 1``, interleaved-1f1b about
``(v+1)P`` (flat in ``M``).

Length: about 700 lines, one concept (pipeline schedules as pure tables): the config and its
checks, GPipe/circular tables, and the 1F1B forward and tick tables with their buffer allocation.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import numpy as np

from meshpar.axes import PIPE
from meshpar.errors import StrategyError, is_int
from meshpar.parallel.routes import BoundaryRoutes, boundary_routes


class Schedule(str, enum.Enum):
    """A pipeline schedule. ``str``-valued, so ``Schedule("1f1b")`` and the CLI strings work.

    Example:
        >>> Schedule("interleaved-1f1b").one_f_one_b, Schedule.GPIPE == "gpipe"
        (True, True)
    """

    GPIPE = "gpipe"
    CIRCULAR = "circular"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED_1F1B = "interleaved-1f1b"

    @property
    def one_f_one_b(self) -> bool:
        """Whether the backward pass runs the 1F1B loop (:mod:`meshpar.parallel.onef1b`)."""
        return self in (Schedule.ONE_F_ONE_B, Schedule.INTERLEAVED_1F1B)

    @property
    def interleaved(self) -> bool:
        """Whether each stage holds ``repeats`` chunks of layers (circular, interleaved-1f1b)."""
        return self in (Schedule.CIRCULAR, Schedule.INTERLEAVED_1F1B)

    def __str__(self) -> str:
        return self.value


SCHEDULES: tuple[str, ...] = tuple(s.value for s in Schedule)


def parse_schedule(value: object, *, what: str = "schedule") -> Schedule:
    """``value`` as a :class:`Schedule`.

    Raises:
        StrategyError: ``value`` names no schedule.

    Example:
        >>> parse_schedule("1f1b")
        <Schedule.ONE_F_ONE_B: '1f1b'>
    """
    try:
        return Schedule(value)
    except ValueError:
        raise StrategyError(f"{what}={value!r}; expected one of {SCHEDULES}") from None


def _check_int(name: str, value: object, minimum: int) -> int:
    if not is_int(value, minimum=minimum):
        raise StrategyError(f"PipelineConfig.{name}={value!r} must be an int >= {minimum}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How layers are split into stages and how microbatches flow through them.

    Attributes:
        stages: pipeline stages ``P``; the size of the ``axis`` mesh axis.
        microbatches: microbatches ``M`` the batch is split into.
        schedule: a :class:`Schedule` (or its string): ``"gpipe"``, ``"circular"`` (each stage
            holds ``repeats`` chunks of layers and microbatches go round the ring ``repeats``
            times), ``"1f1b"`` or ``"interleaved-1f1b"`` (the same layouts, the backward pass run
            as a one-forward-one-backward loop whose memory is flat in ``M``; see
            :mod:`meshpar.parallel.onef1b`).
        repeats: ``v``, chunks per stage; 1 for gpipe and 1f1b, >= 2 for interleaved-1f1b.
        axis: the mesh axis the stages live on.
        remat: recompute each stage during the backward pass, keeping only its input per
            iteration (see :mod:`meshpar.parallel.pipeline`). For the 1F1B schedules:
            ``True`` stashes each chunk's input and recomputes its forward in its backward tick;
            ``False`` stashes the residuals of each forward tick's ``jax.vjp`` instead (one
            forward less per chunk; :attr:`OneFOneBTable.res_slots` sets of them, flat in
            ``M``; see :mod:`meshpar.parallel.onef1b`).
        batch_axes: mesh axes that split each microbatch's batch dimension while *replicating*
            the stage weights (data parallelism). The pipeline runs them as manual axes too, so
            that the weight gradient is summed over them once, after the loop, instead of being
            all-reduced in every backward iteration. Leave out axes that shard weights (``fsdp``,
            ``tensor``): they stay automatic inside each stage.

    Raises:
        StrategyError: a field out of range, an unknown schedule, ``repeats != 1`` for gpipe or
            1f1b, ``repeats < 2`` for interleaved-1f1b, fewer microbatches than stages for a
            circular schedule with ``repeats > 1`` or for a 1F1B schedule, or, for
            interleaved-1f1b, microbatches not a multiple of stages.

    Example:
        >>> cfg = PipelineConfig(stages=4, microbatches=8, schedule="circular", repeats=2)
        >>> cfg.iterations, round(cfg.bubble_fraction, 3)
        (19, 0.158)
    """

    stages: int
    microbatches: int
    schedule: Schedule = Schedule.GPIPE
    repeats: int = 1
    axis: str = PIPE
    remat: bool = True
    batch_axes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_int("stages", self.stages, 1)
        _check_int("microbatches", self.microbatches, 1)
        _check_int("repeats", self.repeats, 1)
        schedule = parse_schedule(self.schedule, what="PipelineConfig.schedule")
        object.__setattr__(self, "schedule", schedule)
        name = schedule.value
        if schedule in (Schedule.GPIPE, Schedule.ONE_F_ONE_B) and self.repeats != 1:
            other = "circular" if schedule is Schedule.GPIPE else "interleaved-1f1b"
            raise StrategyError(
                f"PipelineConfig: schedule='{name}' runs each stage's layers once, so repeats must "
                f"be 1, got repeats={self.repeats}; use schedule='{other}' for repeats > 1"
            )
        if schedule is Schedule.INTERLEAVED_1F1B and self.repeats < 2:
            raise StrategyError(
                f"PipelineConfig: schedule='interleaved-1f1b' needs repeats >= 2 chunks per stage, "
                f"got repeats={self.repeats}; use schedule='1f1b' for one chunk per stage"
            )
        if schedule is Schedule.CIRCULAR and self.repeats > 1 and self.microbatches < self.stages:
            raise StrategyError(
                f"PipelineConfig: the circular schedule needs microbatches >= stages (a "
                f"microbatch leaving the last stage must find stage 0 free of the first pass), "
                f"got microbatches={self.microbatches} < stages={self.stages}; use at least "
                f"{self.stages} microbatches or the gpipe schedule"
            )
        if schedule.one_f_one_b and self.microbatches < self.stages:
            raise StrategyError(
                f"PipelineConfig: schedule='{name}' needs microbatches >= stages (its warm-up "
                f"fills the pipeline with one microbatch per stage), got microbatches="
                f"{self.microbatches} < stages={self.stages}; use at least {self.stages} "
                f"microbatches, or the gpipe schedule"
            )
        if schedule is Schedule.INTERLEAVED_1F1B and self.microbatches % self.stages:
            raise StrategyError(
                f"PipelineConfig: schedule='interleaved-1f1b' runs microbatches in groups of "
                f"stages={self.stages}, so microbatches must be a multiple of it, got "
                f"microbatches={self.microbatches}"
            )
        if not isinstance(self.axis, str) or not self.axis:
            raise StrategyError(f"PipelineConfig.axis={self.axis!r} must be a mesh axis name")
        if isinstance(self.batch_axes, str):
            # A bare string would iterate as characters; accept it as one axis name.
            object.__setattr__(self, "batch_axes", (self.batch_axes,))
        object.__setattr__(self, "batch_axes", tuple(self.batch_axes))
        if self.axis in self.batch_axes or len(set(self.batch_axes)) != len(self.batch_axes):
            raise StrategyError(
                f"PipelineConfig.batch_axes={self.batch_axes} must be distinct mesh axes other "
                f"than the stage axis {self.axis!r}"
            )

    @property
    def iterations(self) -> int:
        """Iterations of the forward loop: ``v*M + P - 1`` (``M + P - 1`` for gpipe and 1f1b).

        For the 1F1B schedules this is the forward pass (:func:`onef1b_forward`, a few more where
        ``M`` is not a multiple of ``P``); the backward pass is the 1F1B loop of :attr:`ticks`
        ticks.
        """
        if self.schedule.one_f_one_b:
            return onef1b_forward(self).iterations
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def ticks(self) -> int | None:
        """Ticks of the 1F1B backward loop (one forward or one backward per stage per tick), or
        ``None`` for gpipe and circular."""
        return onef1b_table(self).ticks if self.schedule.one_f_one_b else None

    @property
    def bubble_fraction(self) -> float:
        """Fraction of stage-slots that idle.

        gpipe and circular: ``(P-1) / (v*M + P - 1)`` of the loop's iterations (forward and, by
        autodiff, backward). 1F1B schedules: the idle stage-ticks of the backward loop
        (:func:`onef1b_table`), whose forward ticks skip the last chunk (its backward recomputes
        it).
        """
        if self.schedule.one_f_one_b:
            return onef1b_table(self).bubble_fraction
        return (self.stages - 1) / self.iterations

    @property
    def activation_slots(self) -> int:
        """Stage activations of one microbatch (``[mb, ...]``) the loop keeps per device.

        gpipe and circular, with ``remat``: one per iteration plus the ``M`` buffer,
        ``(v+1)*M + P - 1``: linear in ``M``. 1F1B schedules: the stage-input stash and the
        cotangent buffer of :func:`onef1b_table`, bounded by the warm-up depth and independent of
        ``M`` (about ``P`` for 1f1b, ``(v+1)*P`` for interleaved-1f1b). Neither counts the stack's
        input and output (``M`` activations each, the model's own batch) nor, without ``remat``,
        each stage's intermediates (gpipe and circular: one set per iteration; 1F1B:
        :attr:`OneFOneBTable.res_slots` sets, flat in ``M`` too).

        Example:
            >>> PipelineConfig(4, 32, "1f1b").activation_slots, PipelineConfig(4, 32).activation_slots
            (5, 67)
        """
        if self.schedule.one_f_one_b:
            table = onef1b_table(self)
            return table.stash_slots + table.cot_slots
        return (self.repeats + 1) * self.microbatches + self.stages - 1

    def layers_per_chunk(self, num_layers: int) -> int:
        """Layers in one stage chunk: ``num_layers / (stages * repeats)``.

        Raises:
            StrategyError: ``num_layers`` is not divisible by ``stages * repeats``.
        """
        chunks = self.stages * self.repeats
        if not is_int(num_layers, minimum=1) or num_layers % chunks:
            raise StrategyError(
                f"pipeline: {num_layers!r} layers cannot be split into stages={self.stages} x "
                f"repeats={self.repeats} = {chunks} equal chunks; use a layer count divisible "
                f"by {chunks}"
            )
        return num_layers // chunks

    def validate(self, num_layers: int, global_batch: int, mesh) -> None:
        """Check that this pipeline fits a model, a batch and a mesh.

        Args:
            num_layers: layers in the stacked layer tree.
            global_batch: examples per step, split into ``microbatches``.
            mesh: the :class:`jax.sharding.Mesh` (anything with a ``shape`` mapping).

        Raises:
            StrategyError: layers not divisible by ``stages * repeats``; ``microbatches`` not
                dividing ``global_batch``; the microbatch size not divisible by the
                ``batch_axes``; the stage axis or a batch axis missing from the mesh, or the
                stage axis's size differing from ``stages``.

        Example:
            >>> from meshpar.mesh import make_mesh
            >>> PipelineConfig(stages=2, microbatches=4).validate(8, 32, make_mesh(pipe=2, data=4))
        """
        self.layers_per_chunk(num_layers)
        shape = dict(mesh.shape)
        if self.axis not in shape:
            raise StrategyError(
                f"pipeline: stage axis {self.axis!r} is not in the mesh {shape}; build the mesh "
                f"with {self.axis}={self.stages}"
            )
        if shape[self.axis] != self.stages:
            raise StrategyError(
                f"pipeline: stages={self.stages} but mesh axis {self.axis!r} has size "
                f"{shape[self.axis]}; they must be equal"
            )
        for axis in self.batch_axes:
            if axis not in shape:
                raise StrategyError(
                    f"pipeline: batch axis {axis!r} is not in the mesh {shape}"
                )
        if not is_int(global_batch, minimum=1) or global_batch % self.microbatches:
            raise StrategyError(
                f"pipeline: microbatches={self.microbatches} does not divide the global batch "
                f"{global_batch!r}; pick a batch size that is a multiple of {self.microbatches}"
            )
        micro = global_batch // self.microbatches
        ways = int(np.prod([shape[a] for a in self.batch_axes], dtype=np.int64))
        if micro % ways:
            raise StrategyError(
                f"pipeline: microbatch size {micro} (global batch {global_batch} / "
                f"{self.microbatches} microbatches) is not divisible by batch axes "
                f"{self.batch_axes} of size {ways}"
            )


def _item_table(config: PipelineConfig) -> np.ndarray:
    # Work item k = t - s run by stage s at iteration t, or -1 for a bubble.
    s = np.arange(config.stages)[:, None]
    t = np.arange(config.iterations)[None, :]
    k = t - s
    return np.where((k >= 0) & (k < config.repeats * config.microbatches), k, -1)


def schedule_table(config: PipelineConfig, /) -> np.ndarray:
    """The microbatch each stage runs at each iteration.

    Args:
        config: the pipeline.

    Returns:
        ``int32[stages, iterations]``: the microbatch index stage ``s`` computes at iteration
        ``t``, or ``-1`` for a bubble. For the circular schedule each microbatch appears once per
        repeat on every stage; :func:`repeat_table` says which repeat. For the 1F1B schedules,
        the forward loop's (:func:`onef1b_forward`).

    Example:
        >>> schedule_table(PipelineConfig(stages=2, microbatches=3))
        array([[ 0,  1,  2, -1],
               [-1,  0,  1,  2]], dtype=int32)
    """
    if config.schedule.one_f_one_b:
        return onef1b_forward(config).microbatch.copy()
    k = _item_table(config)
    return np.where(k >= 0, k % config.microbatches, -1).astype(np.int32)


def repeat_table(config: PipelineConfig, /) -> np.ndarray:
    """The repeat (chunk of layers on that stage) each stage runs at each iteration.

    Args:
        config: the pipeline.

    Returns:
        ``int32[stages, iterations]``: the repeat ``r`` of the work item stage ``s`` runs at
        iteration ``t`` (always 0 for gpipe), or ``-1`` for a bubble. Stage ``s`` running repeat
        ``r`` applies layer chunk ``r*stages + s``.

    Example:
        >>> repeat_table(PipelineConfig(stages=2, microbatches=2, schedule="circular", repeats=2))
        array([[ 0,  0,  1,  1, -1],
               [-1,  0,  0,  1,  1]], dtype=int32)
    """
    if config.schedule.one_f_one_b:
        return onef1b_forward(config).repeat.copy()
    k = _item_table(config)
    return np.where(k >= 0, k // config.microbatches, -1).astype(np.int32)


# --- 1F1B -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class OneFOneBTable:
    """What each stage does at each tick of the 1F1B backward loop (all ``int32[stages, ticks]``).

    Chunk ``g = r*P + s`` (repeat ``r`` on stage ``s``). ``-1`` marks "none" in every table.

    Attributes:
        forward_mb, forward_rep: the forward this stage runs (microbatch, repeat), or ``-1``.
        forward_slot: the stash slot holding its input, ``-1`` for chunk 0 (the stack's input).
        forward_res: the residual slot its ``jax.vjp`` residuals go to (tables of a pipeline
            without ``remat`` only; ``-1`` otherwise and for the last chunk, whose forward its
            backward runs).
        backward_mb, backward_rep: the backward this stage runs, or ``-1``: from the residuals
            of its forward tick, or (with ``remat``, and always for the last chunk) recomputing
            the chunk's forward from its input first.
        backward_slot: the stash slot holding its input where it recomputes, ``-1`` for chunk 0
            and where it reads residuals.
        backward_res: the residual slot it reads, or ``-1`` where it recomputes.
        backward_cot: the cotangent slot holding the gradient of its output, ``-1`` for the last
            chunk (the cotangent of the stack's output).
        recv_forward: the stash slot the activation arriving from stage ``s-1`` at the start of
            this tick goes to (sent by its forward at the tick before), or ``-1``.
        recv_backward: the cotangent slot the gradient arriving from stage ``s+1`` goes to.
        stash_slots, cot_slots, res_slots: buffer sizes (the largest number live on any stage;
            ``res_slots`` is 0 with ``remat``).
        routes: where the stack's input, output gradient and input gradient are kept (``1/P``
            of them per device) and how they reach the stage that needs them
            (:mod:`meshpar.parallel.routes`).
        ticks: loop length (``routes.ticks``: one or more idle ticks at the end where the last
            input gradients are still on their way, only where ``M`` is not a multiple of ``P``).
        bubble_fraction: idle stage-ticks over all stage-ticks.
    """

    forward_mb: np.ndarray
    forward_rep: np.ndarray
    forward_slot: np.ndarray
    forward_res: np.ndarray
    backward_mb: np.ndarray
    backward_rep: np.ndarray
    backward_slot: np.ndarray
    backward_res: np.ndarray
    backward_cot: np.ndarray
    recv_forward: np.ndarray
    recv_backward: np.ndarray
    stash_slots: int
    cot_slots: int
    res_slots: int
    routes: BoundaryRoutes
    ticks: int
    bubble_fraction: float


def _action_lists(stages: int, micro: int, repeats: int) -> list[list[tuple[str, int, int]]]:
    # Per stage, its (kind, microbatch, repeat) actions in order: PipeDream-flush (1F1B) for
    # repeats == 1, Megatron-LM's interleaved order otherwise (microbatches in groups of P; forward
    # over the chunks in increasing order, backward in decreasing order). A warm-up of forwards,
    # then one forward and one backward alternately, then the remaining backwards.
    n = repeats * micro
    if repeats == 1:
        fwd = [(m, 0) for m in range(micro)]
        bwd = fwd
    else:
        def item(k, reverse):
            r = (k // stages) % repeats
            return ((k // (stages * repeats)) * stages + k % stages,
                    repeats - 1 - r if reverse else r)
        fwd = [item(k, False) for k in range(n)]
        bwd = [item(k, True) for k in range(n)]
    out = []
    for s in range(stages):
        if repeats == 1:
            warm = min(n, stages - s - 1)
        else:
            warm = min(n, (stages - s - 1) * 2 + (repeats - 1) * stages)
        acts = [("F", *fwd[i]) for i in range(warm)]
        for i in range(warm, n):
            acts += [("F", *fwd[i]), ("B", *bwd[i - warm])]
        acts += [("B", *b) for b in bwd[n - warm:]]
        out.append(acts)
    return out


def _allocate(intervals: list[tuple[int, int, object]]) -> tuple[dict, int]:
    # Slots for values live from tick `start` (written at its beginning) to tick `end` (read
    # during it, free from end + 1). Greedy by start tick; returns {key: slot}, slot count.
    free: list[int] = []
    busy: list[tuple[int, int]] = []          # (end, slot)
    slots, count = {}, 0
    for start, end, key in sorted(intervals, key=lambda i: (i[0], i[1])):
        for item in sorted(b for b in busy if b[0] < start):
            busy.remove(item)
            free.append(item[1])
        free.sort()
        if free:
            slot = free.pop(0)
        else:
            slot, count = count, count + 1
        slots[key] = slot
        busy.append((end, slot))
    return slots, count


@functools.lru_cache(maxsize=64)
def _onef1b_table(stages: int, micro: int, repeats: int, residuals: bool) -> OneFOneBTable:
    P, V = stages, stages * repeats
    acts = _action_lists(stages, micro, repeats)
    inf = 1 << 30
    done_f: dict[tuple[int, int], int] = {}
    done_b: dict[tuple[int, int], int] = {}
    runs: list[tuple[str, int, int, int, int]] = []     # (kind, stage, tick, m, r)
    pos = [0] * P
    t = 0
    limit = 4 * (repeats * micro + P) * 2 + 8
    while any(pos[s] < len(acts[s]) for s in range(P)):
        if t > limit:   # cannot happen for the orders above; a bug, not a user error
            raise RuntimeError(f"1F1B schedule P={P} M={micro} v={repeats} does not finish")
        for s in range(P):
            acted = False
            while pos[s] < len(acts[s]):
                kind, m, r = acts[s][pos[s]]
                g = r * P + s
                if kind == "F":
                    if g > 0 and done_f.get((m, g - 1), inf) > t - 1:
                        break
                    if g == V - 1:
                        # The last chunk's forward is recomputed by its backward: nothing to run,
                        # its input waits in the stash.
                        done_f[(m, g)] = t
                        pos[s] += 1
                        continue
                    if acted:
                        break
                    done_f[(m, g)] = t
                else:
                    if acted or done_f.get((m, g), inf) > t:
                        break
                    if g < V - 1 and done_b.get((m, g + 1), inf) > t - 1:
                        break
                    done_b[(m, g)] = t
                runs.append((kind, s, t, m, r))
                pos[s] += 1
                acted = True
        t += 1
    ticks = t

    def table():
        return np.full((P, ticks), -1, np.int32)

    f_mb, f_rep, f_slot, f_res = table(), table(), table(), table()
    b_mb, b_rep, b_slot, b_res, b_cot = table(), table(), table(), table(), table()
    recv_f, recv_b = table(), table()

    def from_residuals(g):
        # The last chunk's forward is run by its backward (no forward tick), so it recomputes.
        return residuals and g < V - 1

    # Stash: the input of chunk g > 0 of microbatch m on its stage, from its arrival (the tick
    # after chunk g-1's forward) to its last read: its backward, which recomputes the forward
    # from it, or, where the backward reads residuals instead, its forward. Residuals: those of
    # chunk g's forward tick of m, to its backward. Cotangent: the gradient of chunk g < V-1's
    # output, from the tick after chunk g+1's backward to chunk g's backward.
    stash_slots = cot_slots = res_slots = 0
    stash, cot, res = {}, {}, {}
    for s in range(P):
        chunks = [r * P + s for r in range(repeats)]
        st = [(done_f[(m, g - 1)] + 1, done_f[(m, g)] if from_residuals(g) else done_b[(m, g)],
               (m, g)) for g in chunks if g > 0 for m in range(micro)]
        ct = [(done_b[(m, g + 1)] + 1, done_b[(m, g)], (m, g))
              for g in chunks if g < V - 1 for m in range(micro)]
        rt = [(done_f[(m, g)], done_b[(m, g)], (m, g))
              for g in chunks if from_residuals(g) for m in range(micro)]
        a, na = _allocate(st)
        b, nb = _allocate(ct)
        c, nc = _allocate(rt)
        stash.update(a)
        cot.update(b)
        res.update(c)
        stash_slots, cot_slots = max(stash_slots, na), max(cot_slots, nb)
        res_slots = max(res_slots, nc)
        for start, _, key in st:
            recv_f[s, start] = a[key]
        for start, _, key in ct:
            recv_b[s, start] = b[key]
    for kind, s, t, m, r in runs:
        g = r * P + s
        if kind == "F":
            f_mb[s, t], f_rep[s, t] = m, r
            f_slot[s, t] = stash[(m, g)] if g > 0 else -1
            f_res[s, t] = res[(m, g)] if from_residuals(g) else -1
        else:
            b_mb[s, t], b_rep[s, t] = m, r
            b_slot[s, t] = stash[(m, g)] if g > 0 and not from_residuals(g) else -1
            b_res[s, t] = res[(m, g)] if from_residuals(g) else -1
            b_cot[s, t] = cot[(m, g)] if g < V - 1 else -1
    # Where stage 0 reads the stack's input (chunk 0's forward; its backward where that
    # recomputes) and makes its input gradient, and stage P-1 reads the output gradient.
    xs_reads, dys_reads, dxs_made = [], [], []
    for kind, s, t, m, r in runs:
        g = r * P + s
        if kind == "F" and g == 0:
            xs_reads.append((t, m))
        elif kind == "B" and g == 0:
            if not from_residuals(g):
                xs_reads.append((t, m))
            dxs_made.append((t, m))
        if kind == "B" and g == V - 1:
            dys_reads.append((t, m))
    routes = boundary_routes(P, micro, ticks,
                             inbound={"xs": (0, -1, xs_reads), "dys": (P - 1, +1, dys_reads)},
                             outbound={"dxs": (0, -1, True, dxs_made)})
    tables = [f_mb, f_rep, f_slot, f_res, b_mb, b_rep, b_slot, b_res, b_cot, recv_f, recv_b]
    # Idle ticks at the end while the last input gradients travel to their stages.
    tables = [np.pad(a, ((0, 0), (0, routes.ticks - ticks)), constant_values=-1) for a in tables]
    f_mb, f_rep, f_slot, f_res, b_mb, b_rep, b_slot, b_res, b_cot, recv_f, recv_b = tables
    busy = (f_mb >= 0) | (b_mb >= 0)
    for a in tables:
        a.setflags(write=False)
    return OneFOneBTable(
        forward_mb=f_mb, forward_rep=f_rep, forward_slot=f_slot, forward_res=f_res,
        backward_mb=b_mb, backward_rep=b_rep, backward_slot=b_slot, backward_res=b_res,
        backward_cot=b_cot, recv_forward=recv_f, recv_backward=recv_b,
        stash_slots=max(stash_slots, 1), cot_slots=max(cot_slots, 1), res_slots=res_slots,
        routes=routes, ticks=routes.ticks, bubble_fraction=float(1.0 - busy.mean()),
    )


def onef1b_table(config: PipelineConfig, /) -> OneFOneBTable:
    """The tick tables of a 1F1B schedule's backward loop (:mod:`meshpar.parallel.onef1b`).

    The action order is PipeDream-flush for ``1f1b`` (stage ``s`` runs ``P - s - 1`` forwards,
    then alternates one forward and one backward) and Megatron-LM's for ``interleaved-1f1b``;
    each action runs at the first tick its inputs have arrived (one tick per hop). At most
    :attr:`OneFOneBTable.stash_slots` stage inputs are live on a stage, however large ``M``.

    Args:
        config: a pipeline with a 1F1B schedule.

    Returns:
        The :class:`OneFOneBTable` (cached; its arrays are read-only).

    Raises:
        StrategyError: ``config`` has no 1F1B schedule.

    Example:
        >>> t = onef1b_table(PipelineConfig(stages=2, microbatches=4, schedule="1f1b"))
        >>> t.forward_mb
        array([[ 0,  1, -1,  2, -1,  3, -1, -1],
               [-1, -1, -1, -1, -1, -1, -1, -1]], dtype=int32)
    """
    if not config.schedule.one_f_one_b:
        raise StrategyError(f"onef1b_table: schedule={config.schedule.value!r} is not a 1F1B "
                            "schedule")
    return _onef1b_table(config.stages, config.microbatches, config.repeats, not config.remat)


@dataclasses.dataclass(frozen=True, eq=False)
class OneFOneBForward:
    """The forward loop of a 1F1B schedule (all ``int32[stages, iterations]``, ``-1`` for idle).

    Stage ``s`` runs work item ``k = t - s`` at iteration ``t``, as in gpipe and circular, but the
    items are numbered in Megatron-LM's interleaved order (microbatches in groups of ``P``, each
    group through all ``v`` chunks before the next): item ``k`` is microbatch
    ``(k // (P*v))*P + k % P``, repeat ``(k // P) % v``. So a microbatch leaving the last stage
    after repeat ``r`` is what stage 0 runs next (repeat ``r + 1``): nothing waits on stage 0,
    where circular's order keeps ``M - P`` microbatches waiting. For ``v = 1`` it is gpipe's
    table. Every chunk still sees the microbatches in order ``0 .. M-1``.

    Attributes:
        microbatch, repeat: what each stage runs at each iteration.
        routes: the stack's input to stage 0 and its output from stage ``P - 1`` to the stages
            that keep them (:mod:`meshpar.parallel.routes`; ``"xs"`` and ``"ys"``).
        iterations: loop length (``v*M + P - 1``, longer where the last outputs are still on
            their way).
    """

    microbatch: np.ndarray
    repeat: np.ndarray
    routes: BoundaryRoutes
    iterations: int


@functools.lru_cache(maxsize=64)
def _onef1b_forward(stages: int, micro: int, repeats: int) -> OneFOneBForward:
    P, v = stages, repeats
    iterations = v * micro + P - 1
    k = np.arange(iterations)[None, :] - np.arange(P)[:, None]
    valid = (k >= 0) & (k < v * micro)
    mb = np.where(valid, (k // (P * v)) * P + k % P, -1).astype(np.int32)
    rep = np.where(valid, (k // P) % v, -1).astype(np.int32)
    reads = [(t, int(mb[0, t])) for t in range(iterations) if rep[0, t] == 0]
    made = [(t, int(mb[P - 1, t])) for t in range(iterations) if rep[P - 1, t] == v - 1]
    routes = boundary_routes(P, micro, iterations, inbound={"xs": (0, -1, reads)},
                             outbound={"ys": (P - 1, -1, False, made)})
    pad = ((0, 0), (0, routes.ticks - iterations))
    mb, rep = (np.pad(a, pad, constant_values=-1) for a in (mb, rep))
    for a in (mb, rep):
        a.setflags(write=False)
    return OneFOneBForward(microbatch=mb, repeat=rep, routes=routes, iterations=routes.ticks)


def onef1b_forward(config: PipelineConfig, /) -> OneFOneBForward:
    """The forward loop of a 1F1B schedule (:class:`OneFOneBForward`; cached, read-only).

    Raises:
        StrategyError: ``config`` has no 1F1B schedule.

    Example:
        >>> f = onef1b_forward(PipelineConfig(stages=2, microbatches=4, schedule="interleaved-1f1b",
        ...                                   repeats=2))
        >>> f.microbatch[0].tolist(), f.repeat[0].tolist()
        ([0, 1, 0, 1, 2, 3, 2, 3, -1], [0, 0, 1, 1, 0, 0, 1, 1, -1])
    """
    if not config.schedule.one_f_one_b:
        raise StrategyError(f"onef1b_forward: schedule={config.schedule.value!r} is not a 1F1B "
                            "schedule")
    return _onef1b_forward(config.stages, config.microbatches, config.repeats)


def default_remat(schedule: Schedule | str, /) -> bool:
    """:attr:`PipelineConfig.remat` where the user leaves it to the schedule.

    gpipe and circular recompute each stage (without it their loop keeps every intermediate of
    every microbatch, linear in ``M``); the 1F1B schedules keep each forward tick's residuals
    instead (bounded by the stages, not by ``M``, and one forward per chunk less).

    Example:
        >>> default_remat("gpipe"), default_remat("1f1b")
        (True, False)
    """
    return not parse_schedule(schedule).one_f_one_b


def activation_bound(config: PipelineConfig, /) -> str:
    """The formula behind :attr:`PipelineConfig.activation_slots`, in words, for reports.

    Example:
        >>> activation_bound(PipelineConfig(stages=4, microbatches=8))
        '(v+1)*M + P - 1 = 2*8 + 3 = 19, linear in M'
    """
    if config.schedule.one_f_one_b:
        t = onef1b_table(config)
        kept = f" + residuals of {t.res_slots} chunk forwards" if t.res_slots else ""
        return (f"stash {t.stash_slots} + cotangent buffer {t.cot_slots}{kept}, set by "
                f"P={config.stages} and v={config.repeats}, flat in M; and the stack's input "
                f"and output gradient in blocks over the stages, 2*ceil(M/P) = "
                f"{2 * t.routes.block}")
    v, m, p = config.repeats, config.microbatches, config.stages
    return f"(v+1)*M + P - 1 = {v + 1}*{m} + {p - 1} = {config.activation_slots}, linear in M"
