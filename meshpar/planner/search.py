"""The planner: enumerate layouts, prune them by formula, compile the promising ones, rank.

:func:`plan` works for any Flax NNX model (``make_model``, ``loss_fn``, an example batch);
:func:`plan_gpt` for the built-in GPT, whose dimensions, FLOPs, activations and remat policies
the planner knows by formula. Both return a :class:`PlanResult`: every candidate with its
per-device memory against the budget, its predicted step time split into compute, communication
per axis and bubble (:mod:`meshpar.planner.cost`), its MFU and a ready ``meshpar train`` command.

How a candidate is judged:

1. **pre-filter, by formula** (nothing compiled): :func:`meshpar.train.plan.plan_training` places
   every parameter, gradient and optimizer-state leaf from abstract shapes (per-device bytes
   exactly, an indivisible layout is rejected with its error); the GPT's temporaries (gradient
   buffers, activations, the head, ZeRO-3's gathered layer) come from
   :func:`meshpar.inspect.costs.gpt_step_memory_bytes`, within 10% of ``memory_analysis`` on
   all 145 layouts sampled (of the tiny, small and 20m presets; 0.910-1.098x of it), and on
   all 506 drawn afresh (``benchmarks/README.md``). A candidate whose
   estimate, less the bytes it counts that XLA may fuse away, is over the budget by more than
   :data:`PREFILTER_SLACK` is not compiled (it stays an analytic candidate over the budget).
2. **compile** the ``compile_top`` fastest survivors by the analytic time (their step on this
   machine's emulated devices at the target count, from abstract shapes: nothing allocated) and
   read ``memory_analysis`` (the memory then reported), the trip-weighted matmul FLOPs and the
   collectives per kind and mesh axis (:func:`meshpar.inspect.measure.measure`); the time is
   predicted again from what the program does.
3. **rank**: the uncompiled candidates' compute scaled by the least compiled/analytic ratio
   (:attr:`PlanResult.analytic_scale`), and while one of them ranks first it is compiled too, up
   to ``compile_top`` more, so that the top pick is a compiled layout.

Device counts above what this process emulates (``plan_gpt``): the shortlist is compiled as
:func:`proxy_layout` s (``data``/``fsdp`` shrunk to fit, per-device shapes kept) and
extrapolated per mesh axis; ``benchmarks/plan_extrapolation.py`` measures how far that is from
full compiles.

Length: about 690 lines, one concept (the search: prune, compile, rank, extrapolate); the
candidate and result types and their errors live with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from meshpar.axes import DATA, FSDP
from meshpar.backend.bf16 import bf16_dots_as
from meshpar.errors import MeshparError, PlanError
from meshpar.inspect.costs import (gpt_local_param_bytes, gpt_step_memory_bytes,
                                   gpt_train_flops, zero_state_bytes)
from meshpar.inspect.measure import measure
from meshpar.mesh import make_mesh
from meshpar.models import GPT, GPTConfig, lm_loss
from meshpar.parallel.schedule import PipelineConfig, default_remat, onef1b_table
from meshpar.planner.cost import (Collective, StepTime, analytic_gpt_collectives,
                                  measured_collectives, parameter_collectives, step_time)
from meshpar.planner.hardware import HardwareProfile, load_profile
from meshpar.planner.layout import Dims, Layout, enumerate_layouts
from meshpar.train import Trainer
from meshpar.train.plan import plan_training

MIB = 2**20

#: How far the pre-filter lets the analytic memory exceed the budget before it rejects a layout
#: without compiling it. On the 145 sampled layouts of ``benchmarks/README.md`` (tiny, small and
#: 20m presets, every schedule; 2026-12-04) the pre-filter's figure
#: (:attr:`Candidate.memory_prefilter`) was at most 1.098x ``memory_analysis``, as on the 506
#: drawn afresh. The margin above that is kept: with the formula of 2026-12-03's morning,
#: fitted on 87 of them, one of the 44 drawn afterwards reached 1.156x, and a 20m ZeRO-3 GPipe
#: layout 1.325x once it compiled as ZeRO-3.
PREFILTER_SLACK = 1.15


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    """One layout, judged.

    Attributes:
        layout: the layout.
        memory: predicted bytes per device: the compiled program's ``memory_analysis`` total
            when compiled, else the analytic estimate.
        memory_analytic: the pre-filter's estimate (state from the plan + activations + batch).
        memory_compiled: ``memory_analysis`` total (arguments + outputs + temporaries -
            aliased), or ``None``.
        memory_prefilter: what the pre-filter held against ``budget x PREFILTER_SLACK``: the
            analytic estimate less the bytes it counts that XLA may fuse away (equal to it
            for most layouts).
        budget: memory per device allowed.
        time: the predicted step (:class:`~meshpar.planner.cost.StepTime`).
        source: ``"compiled"`` or ``"analytic"``: where memory and collectives come from.
        command: the ``meshpar train`` command line (``None`` for a model of your own).
    """

    layout: Layout
    memory: float
    memory_analytic: float
    memory_compiled: float | None
    budget: float
    time: StepTime
    source: str
    command: str | None = None
    memory_prefilter: float | None = None

    @property
    def fits(self) -> bool:
        return self.memory <= self.budget

    @property
    def margin(self) -> float:
        """Budget minus memory (negative: over by that much)."""
        return self.budget - self.memory

    def as_dict(self) -> dict[str, Any]:
        t = self.time
        return {
            "layout": self.layout.label, "mesh": self.layout.mesh_shape,
            **{f.name: getattr(self.layout, f.name) for f in dataclasses.fields(Layout)},
            # The enum's value: a plain string in the dict as in the JSON.
            "schedule": self.layout.schedule.value,
            "fits": self.fits, "memory_bytes": self.memory,
            "memory_analytic_bytes": self.memory_analytic,
            "memory_compiled_bytes": self.memory_compiled,
            "memory_prefilter_bytes": self.memory_prefilter, "budget_bytes": self.budget,
            "margin_bytes": self.margin, "source": self.source,
            "compute_s": t.compute, "comm_s_per_axis": t.comm_per_axis, "exposed_comm_s": t.exposed,
            "bubble_s": t.bubble, "step_s": t.step, "mfu": t.mfu, "command": self.command,
            "trainer": self.layout.trainer_code(),
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanResult:
    """What :func:`plan` found: candidates best first (fitting ones by predicted step time, then
    those that do not fit by memory), the layouts rejected before costing and why, and the
    profile. ``analytic_scale`` is the factor the uncompiled candidates' compute was scaled by:
    the least compiled/analytic compute ratio of the compiled ones (1 when none was)."""

    candidates: tuple[Candidate, ...]
    rejected: tuple[str, ...]
    hardware: HardwareProfile
    devices: int
    notes: tuple[str, ...] = ()
    analytic_scale: float = 1.0

    @property
    def fitting(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.fits)

    @property
    def best(self) -> Candidate:
        """The top pick.

        Raises:
            PlanError: no candidate fits; the message states the least memory found and what
                would fit.
        """
        if self.fitting:
            return self.fitting[0]
        raise no_fit_error(self)

    def to_json(self) -> str:
        """The candidates, best first, as a JSON list (each with its ``command``)."""
        return json.dumps([c.as_dict() for c in self.candidates], indent=1)


def no_fit_error(result: PlanResult) -> PlanError:
    """The :class:`PlanError` for a plan where nothing fits the memory."""
    if not result.candidates:
        return PlanError(
            f"no layout of {result.devices} devices is valid for this model: "
            + "; ".join(result.rejected[:8]))
    least = min(result.candidates, key=lambda c: c.memory)
    need = least.memory / least.budget
    return PlanError(
        f"no candidate fits {result.hardware.name}'s {least.budget / MIB:.1f} MiB per device: the "
        f"least memory found is {least.memory / MIB:.1f} MiB ({least.layout.label}, over by "
        f"{-least.margin / MIB:.1f} MiB). What would fit: about {math.ceil(need * result.devices)}"
        " devices (more ZeRO-3 / tensor / pipeline sharding of the state), remat='full', "
        "smaller microbatches (more of them) or a smaller batch, or a device with more memory")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm  # only a plan that draws a progress bar needs it

    return tqdm(total=total, desc=desc, unit="layout", file=sys.stderr, dynamic_ncols=True)


@dataclasses.dataclass(frozen=True)
class _Model:
    """What the search needs of a model (the GPT's or your own)."""

    make_model: Callable[[Layout], Callable[[], nnx.Module]]
    loss_fn: Callable
    batch: Mapping[str, jax.ShapeDtypeStruct]
    row_separable: bool
    # layout, plan, global batch rows -> (activation bytes, analytic collectives, FLOPs per
    # device, model FLOPs)
    analytic: Callable[[Layout, Any, int], tuple[dict, list[Collective], float, float | None]]
    # layout, measured -> FLOPs per device from the compiled program
    compiled_flops: Callable[[Layout, dict], float]
    command: Callable[[Layout], str | None]


def _bubble(layout: Layout) -> float:
    if layout.pipe == 1:
        return 0.0
    return PipelineConfig(stages=layout.pipe, microbatches=layout.microbatches,
                          schedule=layout.schedule, repeats=layout.repeats).bubble_fraction


def _state_bytes(tplan: Any) -> float:
    opt = 0
    for leaf, sharding in zip(jax.tree.leaves(tplan.abs_opt_state), jax.tree.leaves(tplan.opt_shardings)):
        shard = sharding.shard_shape(leaf.shape) if leaf.shape else ()
        opt += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return float(tplan.params.bytes_per_device + tplan.gradients.bytes_per_device + opt)


def _batch_bytes(batch: Mapping, layout: Layout) -> float:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(batch)) / (layout.data * layout.fsdp)


def proxy_layout(layout: Layout, limit: int, /) -> Layout | None:
    """The layout compiled in place of one with more devices than ``limit``: the same
    ``tensor`` and ``pipe`` (per-device weight and activation shapes), ``data`` shrunk first
    and then ``fsdp`` (each kept >= 2 where it was > 1, so every collective still appears), the
    per-device rows kept (the batch shrinks with ``data x fsdp``). ``None`` when none fits.

    Example:
        >>> proxy = proxy_layout(Layout(data=64, tensor=4), 8)
        >>> proxy.data, proxy.fsdp, proxy.tensor, proxy.pipe
        (2, 1, 4, 1)
    """
    if layout.devices <= limit:
        return None
    base = layout.tensor * layout.pipe
    best = None
    for f in sorted(d for d in range(1, layout.fsdp + 1) if layout.fsdp % d == 0):
        for d in sorted(x for x in range(1, layout.data + 1) if layout.data % x == 0):
            if (layout.fsdp > 1 and f < 2) or (layout.data > 1 and d < 2):
                continue
            # Prefer keeping fsdp whole (ZeRO shards keep their size), then the most devices.
            if base * d * f <= limit and (best is None or (f, d) > best):
                best = (f, d)
    if best is None:
        return None
    return dataclasses.replace(layout, fsdp=best[0], data=best[1])


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def extrapolate_collectives(collectives: Sequence[Collective], *, proxy: Layout,
                            target: Layout) -> list[Collective]:
    """The proxy's collectives at the target's sizes, per axis: a ring collective over the batch
    axes sends ``(n-1)/n`` of its volume, so traffic scales by ``ring(n_target) / ring(n_proxy)``;
    (``n`` the product of all the group's axes: one over ``data`` and ``tensor`` spans both);
    a tensor shrunk over a smaller ``fsdp`` (ZeRO shards reduced over ``data``) by
    ``fsdp_proxy / fsdp_target``; collectives over ``tensor`` and ``pipe`` alone move per-device
    activations, which the proxy keeps, and are unchanged."""
    out = []
    for c in collectives:
        axes = set(c.axes)
        if not axes & {DATA, FSDP}:
            out.append(c)  # tensor / pipe only: per-device activations, which the proxy keeps
            continue
        n_p = math.prod(getattr(proxy, a, 1) for a in axes)
        n_t = math.prod(getattr(target, a, 1) for a in axes)
        factor = _ring(n_t) / _ring(n_p) if _ring(n_p) else 1.0
        if FSDP not in axes and target.zero_stage >= 2 and proxy.fsdp != target.fsdp:
            factor *= proxy.fsdp / target.fsdp
        out.append(dataclasses.replace(c, traffic=c.traffic * factor))
    return out


def _compiled_bytes(measured: Mapping, flops: float) -> tuple[float, float]:
    """The compiled program's matmul bytes and its other memory traffic, per device and step,
    for the memory-bound terms of :func:`~meshpar.planner.cost.step_time`.

    A pipelined program's loop runs its bubble iterations too, their work skipped by a
    ``lax.cond`` at run time, and the HLO's trip counts include them: the matmul bytes and the
    traffic inside loops are scaled like the FLOPs, by the FLOPs that run (``flops``) over the
    program's trip-weighted dot FLOPs (at most 1: elsewhere the two counts differ by the
    formula's rounding only).
    """
    f = measured["flops"]
    runs = min(1.0, flops / f["dots_weighted"]) if f.get("dots_weighted") else 1.0
    outside = f["memory_traffic"] - f["memory_traffic_in_loops"]
    return f["dots_bytes"] * runs, outside + f["memory_traffic_in_loops"] * runs


def _scaled_batch(batch: Mapping, rows: int) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows, *x.shape[1:]), x.dtype), batch)


def _compile(model: _Model, layout: Layout, tx, batch) -> dict:
    mesh = make_mesh(layout.mesh_shape, devices=jax.devices()[:layout.devices])
    trainer = Trainer(model.make_model(layout), tx, model.loss_fn, mesh=mesh,
                      strategy=layout.strategy(),
                      config=layout.train_config(row_separable=model.row_separable),
                      allocate=False)
    return measure(trainer.lower(batch).compile(), mesh=mesh)


def _formula_memory(model: _Model, layout: Layout, batch) -> float:
    act, _, _, _ = model.analytic(layout, None, jax.tree.leaves(batch)[0].shape[0])
    return act["state"] + act["total"] + _batch_bytes(batch, layout)


def _search(model: _Model, layouts: Sequence[Layout], rejected: list[str], *, devices: int,
            hardware: HardwareProfile, tx: optax.GradientTransformation, budget: float,
            compile_top: int, progress: bool, compile_devices: int | None = None) -> PlanResult:
    limit = min(compile_devices or jax.device_count(), jax.device_count())
    can_compile = devices <= limit
    notes = []
    if not can_compile:
        notes.append(
            f"{devices} devices is more than the {limit} compiled here: the shortlist is "
            f"extrapolated from compiles of the same layout with data/fsdp shrunk to {limit} "
            "devices (source 'extrap'); the rest is analytic")
    analytic: list[_Entry] = []
    plans: dict[tuple, Any] = {}
    bar = _progress(len(layouts), "plan (formulas)", progress)
    for layout in layouts:
        if bar is not None:
            bar.update(1)
        # The placements depend on the mesh, the ZeRO stage and the stage layout only (not on
        # the remat policy, the precision or the microbatches, which the enumeration checked;
        # nor on 1F1B, which keeps the gpipe and circular stage layouts).
        key = (layout.mesh_text, layout.zero_stage, layout.schedule.interleaved, layout.repeats)
        if key not in plans:
            try:
                mesh = make_mesh(layout.mesh_shape, devices=jax.devices()[:devices]) \
                    if can_compile else None
                plans[key] = plan_training(
                    model.make_model(layout), mesh=mesh, strategy=layout.strategy(), tx=tx,
                    microbatches=layout.microbatches, schedule=layout.schedule,
                    repeats=layout.repeats) if mesh is not None else None
            except MeshparError as err:
                plans[key] = err
        tplan = plans[key]
        if isinstance(tplan, MeshparError):
            rejected.append(f"{layout.label}: {tplan}")
            continue
        act, colls, flops, model_flops = model.analytic(
            layout, tplan, jax.tree.leaves(model.batch)[0].shape[0])
        state = _state_bytes(tplan) if tplan is not None else act["state"]
        memory = state + act["total"] + _batch_bytes(model.batch, layout)
        # What the pre-filter holds against the budget: the estimate less the bytes the formula
        # counts that XLA may fuse away (gpt_step_memory_bytes' ``fusible``), so that a layout
        # rejected unseen is over the budget even where the formula overshoots.
        floor = memory - act.get("fusible", 0.0)
        t = step_time(flops_per_device=flops, collectives=colls, mesh_shape=layout.mesh_shape,
                      hardware=hardware, precision=layout.precision,
                      bubble_fraction=_bubble(layout), model_flops=model_flops)
        analytic.append(_Entry(layout, memory, floor, t, model_flops, flops, tuple(colls)))
    if bar is not None:
        bar.close()
    analytic.sort(key=lambda x: (x.floor > budget * PREFILTER_SLACK, x.time.step))

    def target_of(x: _Entry) -> Layout | None:
        # What is compiled for x: itself, its proxy beyond the emulated devices, or nothing.
        if x.floor > budget * PREFILTER_SLACK:
            return None
        return x.layout if can_compile else proxy_layout(x.layout, limit)

    compiled: dict[int, Candidate] = {}
    compiled_flops: dict[int, float] = {}  # per device and step, by id(layout)

    def compile_one(x: _Entry, target: Layout) -> None:
        if bar is not None:
            bar.set_postfix_str(x.layout.label)
        try:
            compiled[id(x.layout)], compiled_flops[id(x.layout)] = _compiled_candidate(
                x, target, model=model, tx=tx, hardware=hardware, budget=budget)
        except MeshparError as err:  # among the rejected, not the candidates
            rejected.append(f"{x.layout.label}: {err}")
            analytic.remove(x)
        if bar is not None:
            bar.update(1)

    shortlist = [(x, t) for x in analytic if (t := target_of(x)) is not None][:compile_top]
    bar = _progress(len(shortlist), "plan (compile)", progress)
    for x, target in shortlist:
        compile_one(x, target)
    # The analytic time (FLOPs over the peak, the formulas' collectives) leaves out what only
    # the compiled program shows (on the cpu profile its memory traffic: 20m, 8 devices, 3.2 s
    # by formula, 8.5-12 s compiled), so an uncompiled candidate would outrank every compiled
    # one. Each analytic compute is scaled by the least compiled/analytic ratio of the compiled
    # candidates (optimistic: a layout that might beat the best compiled one still ranks above
    # it), and while an uncompiled candidate ranks first it is compiled too, up to compile_top
    # more compiles.
    more = compile_top
    while True:
        analytic[:] = _with_compiled_compute(analytic, compiled_flops, hardware=hardware)
        scale = _analytic_scale(compiled, analytic)
        out = _ranked(analytic, compiled, scale, model=model, hardware=hardware, budget=budget)
        best = next((c for c in out if c.fits), None)
        if best is None or best.source != "analytic" or more <= 0:
            break
        entry = next(x for x in analytic if x.layout is best.layout)
        target = target_of(entry)
        if target is None:
            notes.append(f"the best candidate, {best.layout.label}, cannot be compiled here (no "
                         "proxy of it fits the emulated devices): its figures are the formulas'")
            break
        if bar is not None:
            bar.total += 1
            bar.refresh()
        compile_one(entry, target)
        more -= 1
    if bar is not None:
        bar.close()
    if compiled and abs(scale - 1.0) > 0.01:
        notes.append(f"analytic compute scaled by {scale:.2f}, the least compiled/analytic "
                     f"ratio of the {len(compiled)} compiled candidates")
    if best is not None and best.source == "analytic" and more <= 0:
        notes.append(f"the best candidate, {best.layout.label}, is analytic (not compiled): "
                     "raise compile_top (--compile-top) to compile it")
    return PlanResult(candidates=tuple(out), rejected=tuple(rejected), hardware=hardware,
                      devices=devices, notes=tuple(notes), analytic_scale=scale)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A candidate as the formulas cost it."""

    layout: Layout
    memory: float
    floor: float  # the pre-filter's figure (Candidate.memory_prefilter)
    time: StepTime
    model_flops: float | None
    flops: float
    collectives: tuple[Collective, ...]


def _compiled_candidate(x: _Entry, target: Layout, *, model: _Model, tx,
                        hardware: HardwareProfile, budget: float) -> tuple[Candidate, float]:
    """``x`` compiled as ``target`` (itself, or its :func:`proxy_layout`, extrapolated), and the
    compiled program's FLOPs per device and step (a proxy keeps the per-device shapes).

    Raises:
        MeshparError: the layout does not build or compile.
    """
    layout = x.layout
    proxy = None if target is layout else target
    rows = jax.tree.leaves(model.batch)[0].shape[0]
    batch = model.batch if proxy is None else _scaled_batch(
        model.batch, rows // (layout.data * layout.fsdp) * proxy.data * proxy.fsdp)
    # Traced in the target's bf16 matmul form: on an AVX2 host the GPT widens bf16 operands to
    # fp32 for its dots, fp32 copies a GPU's or TPU's program does not hold (small, fsdp=8 z2
    # remat=full bf16: memory_analysis 61.0 MB with them, 56.0 MB without; the formula's
    # estimate 0.89x and 0.97x of them).
    with bf16_dots_as(hardware.bf16_dots):
        measured = _compile(model, target, tx, batch)
    colls = measured_collectives(measured)
    mem = float(measured["memory"]["total"])
    source = "compiled"
    if proxy is not None:
        colls = extrapolate_collectives(colls, proxy=proxy, target=layout)
        # What the formulas leave out (XLA's temporaries) is taken from the proxy; what they
        # count is recomputed at the target's sizes.
        mem += _formula_memory(model, layout, model.batch) - _formula_memory(model, proxy, batch)
        source = f"extrapolated from {proxy.mesh_text}"
    flops = model.compiled_flops(layout, measured)
    matmul_bytes, memory_bytes = _compiled_bytes(measured, flops)
    t = step_time(flops_per_device=flops, collectives=colls, mesh_shape=layout.mesh_shape,
                  hardware=hardware, precision=layout.precision, bubble_fraction=_bubble(layout),
                  model_flops=x.model_flops, matmul_bytes=matmul_bytes, memory_bytes=memory_bytes)
    return Candidate(layout=layout, memory=mem, memory_analytic=x.memory,
                     memory_compiled=mem if proxy is None else None, budget=budget, time=t,
                     source=source, command=model.command(layout),
                     memory_prefilter=x.floor), flops


def _with_compiled_compute(analytic: Sequence[_Entry], compiled_flops: Mapping[int, float], *,
                           hardware: HardwareProfile) -> list[_Entry]:
    """The analytic candidates, those without a compute term (a model of your own planned
    without ``model_flops``) given the compiled programs' least FLOPs per device.

    Without it an uncompiled candidate costs communication only and outranks every compiled
    one, whose compute is counted (tiny GPT through :func:`plan`, ``h100-sxm``: the top pick
    stayed uncompiled whatever ``compile_top``). Every layout splits the same step over the
    same devices; the least of the compiled programs' shares is the one with the least work
    repeated (tensor parallelism repeats the LayerNorms on each device), an optimistic figure
    for a layout not compiled, as the GPT's analytic compute is.
    """
    if not compiled_flops:
        return list(analytic)
    flops = min(compiled_flops.values())
    out = []
    for x in analytic:
        if x.model_flops is not None:  # the formulas' own compute (the GPT's, model_flops)
            out.append(x)
            continue
        t = step_time(flops_per_device=flops, collectives=x.collectives,
                      mesh_shape=x.layout.mesh_shape, hardware=hardware,
                      precision=x.layout.precision, bubble_fraction=_bubble(x.layout))
        out.append(dataclasses.replace(x, flops=flops, time=t))
    return out


def _analytic_scale(compiled: Mapping[int, Candidate], analytic: Sequence[_Entry]) -> float:
    by_id = {id(x.layout): x for x in analytic}
    ratios = [c.time.compute / by_id[k].time.compute for k, c in compiled.items()
              if k in by_id and by_id[k].time.compute > 0]
    return min(ratios) if ratios else 1.0


def _ranked(analytic: Sequence[_Entry], compiled: Mapping[int, Candidate], scale: float, *,
            model: _Model, hardware: HardwareProfile, budget: float) -> list[Candidate]:
    out = list(compiled.values())
    for x in analytic:
        if id(x.layout) in compiled:
            continue
        t = x.time if scale == 1.0 else step_time(
            flops_per_device=x.flops * scale, collectives=x.collectives,
            mesh_shape=x.layout.mesh_shape, hardware=hardware, precision=x.layout.precision,
            bubble_fraction=_bubble(x.layout), model_flops=x.model_flops)
        out.append(Candidate(layout=x.layout, memory=x.memory, memory_analytic=x.memory,
                             memory_compiled=None, budget=budget, time=t, source="analytic",
                             command=model.command(x.layout), memory_prefilter=x.floor))
    out.sort(key=lambda c: (not c.fits, c.time.step if c.fits else c.memory,
                            c.source == "analytic"))
    return out


def _profile(hardware: str | HardwareProfile) -> HardwareProfile:
    return hardware if isinstance(hardware, HardwareProfile) else load_profile(hardware)


def _abstract_batch(batch: Mapping) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                        if not isinstance(x, jax.ShapeDtypeStruct) else x, batch)


def plan(make_model: Callable[[], nnx.Module], loss_fn: Callable, *, batch: Mapping[str, Any],
         devices: int | None = None, hardware: str | HardwareProfile = "cpu",
         tx: optax.GradientTransformation | None = None, layouts: Sequence[Layout] | None = None,
         precisions: Sequence[str] = ("fp32",), memory_budget: float | None = None,
         model_flops: float | None = None, row_separable: bool = False, compile_top: int = 8,
         progress: bool = True) -> PlanResult:
    """Plan the layout of any Flax NNX model.

    Args:
        make_model: the model factory (as :class:`~meshpar.Trainer` takes it).
        loss_fn: ``loss_fn(model, batch)``.
        batch: the global batch: arrays or ``jax.ShapeDtypeStruct``s (only shapes are used).
        devices: the device count (default: this process's devices).
        hardware: a profile name (``cpu``, ``a100-80g``, ``h100-sxm``, ``tpu-v5e``,
            ``tpu-v5p``), a ``.toml`` path or a :class:`HardwareProfile`.
        tx: the optimizer (default ``optax.adamw(1e-3)``); its state counts in the memory.
        layouts: the candidates (default: :func:`enumerate_layouts` of ``devices``, without a
            pipeline: a model of your own may have no ``layers`` stack).
        precisions: compute precisions to try.
        memory_budget: bytes per device (default: the profile's memory).
        model_flops: useful training FLOPs of one step over all devices, if known: the compute
            term before compiling and the MFU (else the shortlist to compile is ranked by the
            parameters' collectives only, and once candidates are compiled, each one not
            compiled takes the least of their matmul FLOPs per device; no MFU). Before
            compiling, a layout's communication is the parameters' (:func:`~meshpar.planner.
            cost.parameter_collectives`): tensor parallelism's activation collectives are not
            known, so such a layout ranks optimistically until compiled.
        row_separable: :class:`~meshpar.TrainConfig`'s ``row_separable`` for the compiled steps.
        compile_top: how many of the best candidates by formula to compile.
        progress: draw a progress bar on stderr.

    Raises:
        PlanError: no layout is valid for the model (each factorisation's reason is listed).

    Example:
        >>> from flax import nnx
        >>> import meshpar as mp
        >>> from meshpar.models import GPT, get_preset, lm_loss
        >>> from meshpar.train.data import TokenBatches
        >>> make_model = lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0))
        >>> batch = TokenBatches(batch_size=16, seq_len=32).batch(0)
        >>> result = mp.plan(make_model, lm_loss, batch=batch, hardware="h100-sxm",
        ...                  compile_top=0, progress=False)   # formulas only: nothing compiled
        >>> result.best.fits, result.best.source
        (True, 'analytic')
        >>> result.best.layout.trainer_code().startswith("mp.Trainer(make_model, tx, loss_fn, ")
        True
    """
    hardware = _profile(hardware)
    devices = devices or jax.device_count()
    if devices > jax.device_count():
        raise PlanError(
            f"plan(devices={devices}): a model of your own is planned by compiling it at the "
            f"target count, and this process has {jax.device_count()} devices; emulate them "
            f"first (mp.emulate_devices({devices})) or use plan_gpt, whose formulas extrapolate")
    batch = _abstract_batch(batch)
    rows = jax.tree.leaves(batch)[0].shape[0]
    rejected: list[str] = []
    if layouts is None:
        layouts, rejected = enumerate_layouts(
            devices, batch_size=rows, devices_per_node=hardware.devices_per_node,
            precisions=precisions, pipeline=False)
    tx = tx if tx is not None else optax.adamw(1e-3)

    def analytic(layout, tplan, batch_rows):
        flops = (model_flops or 0.0) / devices
        # Before compiling, a lower bound: the collectives the parameters fix (data's
        # all-reduce, fsdp's gathers and reduce-scatter), each counted once for its latency
        # (XLA combines some of the per-array collectives, how many is seen only compiled:
        # one per array put this encoder's fsdp=8 at 2.7x its compiled communication); a
        # model's activation collectives (tensor's) need its shapes. An uncompiled layout is
        # costed optimistically, and compiled while it ranks first (_search).
        colls = [] if tplan is None else parameter_collectives(
            mesh_shape=layout.mesh_shape, zero_stage=layout.zero_stage,
            param_bytes=tplan.params.bytes_total / layout.tensor,
            microbatches=layout.microbatches)
        return {"total": 0.0}, colls, flops, model_flops

    def compiled_flops(layout, measured):
        return measured["flops"]["dots_weighted"] * (1 - _bubble(layout))

    model = _Model(lambda layout: make_model, loss_fn, batch, row_separable, analytic,
                   compiled_flops, lambda layout: None)
    result = _search(model, layouts, rejected, devices=devices, hardware=hardware, tx=tx,
                     budget=memory_budget or hardware.memory_bytes, compile_top=compile_top,
                     progress=progress)
    if not result.candidates:
        raise no_fit_error(result)
    return result


def plan_gpt(config: GPTConfig, /, *, batch_size: int, seq_len: int | None = None,
             devices: int | None = None, hardware: str | HardwareProfile = "cpu",
             remats: Sequence[str] = ("full", "none"), precisions: Sequence[str] = ("fp32", "bf16"),
             memory_budget: float | None = None, compile_top: int = 8,
             model_args: Sequence[str] = (), layouts: Sequence[Layout] | None = None,
             compile_devices: int | None = None, progress: bool = True) -> PlanResult:
    """Plan the layout of the built-in GPT (``meshpar plan``).

    Args:
        config: the :class:`~meshpar.models.GPTConfig` (its ``remat`` is replaced by each of
            ``remats``).
        batch_size, seq_len: the global batch (``seq_len`` defaults to the config's).
        devices, hardware, memory_budget, compile_top, progress: as :func:`plan`.
        remats, precisions: the remat policies and compute precisions to try.
        model_args: the ``meshpar train`` model flags for the ``command`` field (e.g.
            ``["--preset", "20m"]``).
        layouts: the candidates (default: every layout :func:`enumerate_layouts` allows).
        compile_devices: the most devices a compile may use (default: this process's). A
            layout with more is compiled as its :func:`proxy_layout` (``data``/``fsdp`` shrunk,
            per-device shapes kept) and extrapolated per mesh axis
            (:func:`extrapolate_collectives`; memory: the proxy's compiled bytes less its formula
            plus the target's formula).

    Raises:
        PlanError: no factorisation of ``devices`` suits the model (each reason listed).
        ProfileError: an unknown or malformed hardware profile.

    Example:
        >>> from meshpar.models import get_preset
        >>> result = plan_gpt(get_preset("20m"), batch_size=32, devices=8, hardware="h100-sxm",
        ...                   compile_top=0, progress=False)   # formulas only: nothing compiled
        >>> result.best.command.split(" --mesh ")[0]
        'meshpar train --seq-len 256'
    """
    hardware = _profile(hardware)
    devices = devices or jax.device_count()
    seq_len = seq_len or config.seq_len
    config = config.replace(seq_len=seq_len)
    rejected: list[str] = []
    if layouts is None:
        layouts, rejected = enumerate_layouts(
            devices, batch_size=batch_size,
            dims=Dims(layers=config.layers, heads=config.heads, mlp_dim=config.mlp_dim),
            devices_per_node=hardware.devices_per_node, remats=remats, precisions=precisions)
    if not layouts:
        raise PlanError(f"no factorisation of {devices} devices into pipe x data x fsdp x tensor"
                        f" suits this model and batch: " + "; ".join(rejected))
    if "--seq-len" not in model_args:
        # meshpar train's own default (64) is not the preset's: the command names the plan's.
        model_args = [*model_args, "--seq-len", str(seq_len)]
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), np.int32)
             for k in ("inputs", "targets")}
    param_bytes = 4.0 * config.param_count()

    def cfg(layout):
        return config.replace(remat=layout.remat or config.remat)

    def analytic(layout, tplan, batch_rows):
        c = cfg(layout)
        rows = batch_rows // (layout.data * layout.fsdp)
        # The state (ZeRO over fsdp of the weights split by tensor and pipe) by formula; where
        # there is a plan its exact bytes replace it (_search), and its gradient bytes here.
        local = gpt_local_param_bytes(c, tensor=layout.tensor, pipe=layout.pipe)
        state = zero_state_bytes(local, fsdp=layout.fsdp, zero_stage=layout.zero_stage,
                                 optimizer_k=2)
        kept = float(tplan.gradients.bytes_per_device) if tplan is not None else state["grads"]
        slots, kept_slots = None, 0
        if layout.pipe > 1:
            # The pipeline meshpar train runs for this layout: the schedule's default remat.
            pipeline = PipelineConfig(stages=layout.pipe, microbatches=layout.microbatches,
                                      schedule=layout.schedule, repeats=layout.repeats,
                                      remat=default_remat(layout.schedule))
            slots = pipeline.activation_slots
            if pipeline.schedule.one_f_one_b:
                kept_slots = onef1b_table(pipeline).res_slots
        act = gpt_step_memory_bytes(
            c, rows=rows, seq_len=seq_len, grad_local=local, grad_kept=kept,
            tensor=layout.tensor, pipe=layout.pipe, fsdp=layout.fsdp,
            zero_stage=layout.zero_stage, microbatches=layout.microbatches,
            schedule=layout.schedule, repeats=layout.repeats, activation_slots=slots,
            residual_slots=kept_slots, precision=layout.precision)
        act["state"] = sum(state.values())
        colls = analytic_gpt_collectives(
            mesh_shape=layout.mesh_shape, zero_stage=layout.zero_stage,
            param_bytes=param_bytes / (layout.tensor * layout.pipe), layers=c.layers // layout.pipe,
            rows=rows, seq_len=seq_len, d_model=c.d_model, remat=c.remat,
            microbatches=layout.microbatches, pipelined=layout.pipe > 1,
            schedule=layout.schedule, repeats=layout.repeats)
        # A pipeline runs the stack's forward twice: GPipe and circular recompute each stage in
        # its backward; 1F1B (pipeline_remat off, its default) in its forward ticks, whose
        # residuals its backward ticks apply.
        flops = gpt_train_flops(c, batch_size=batch_size, seq_len=seq_len,
                                pipelined=layout.pipe > 1) / devices
        useful = gpt_train_flops(c.replace(remat="none"), batch_size=batch_size, seq_len=seq_len)
        return act, colls, flops, useful

    def compiled_flops(layout, measured):
        # The GPT's FLOPs by formula: the pipelined program's dot count includes the bubble
        # iterations lax.cond skips (the bubble term counts them).
        return gpt_train_flops(cfg(layout), batch_size=batch_size, seq_len=seq_len,
                               pipelined=layout.pipe > 1) / devices

    def make(layout):
        c = cfg(layout)
        return lambda: GPT(c, rngs=nnx.Rngs(0))

    model = _Model(make, lm_loss, batch, True, analytic, compiled_flops,
                   lambda layout: layout.command(model_args, batch_size=batch_size))
    return _search(model, layouts, rejected, devices=devices, hardware=hardware,
                   tx=optax.adamw(1e-3), budget=memory_budget or hardware.memory_bytes,
                   compile_top=compile_top, progress=progress, compile_devices=compile_devices)
