"""Pictures of a layout: parameter shardings, memory per strategy, pipeline schedules.

Every function draws on its own ``matplotlib.figure.Figure`` with an Agg canvas: no pyplot, so
no global figure registry to leak into and no display needed, whatever backend the process (or a
notebook) uses. Each returns the figure and, given ``path``, writes a PNG there.

* :func:`plot_param_sharding`: one panel per parameter, a grid of the blocks the mesh cuts it
  into, each block labelled with the devices that hold it.
* :func:`plot_strategy_memory`: stacked bars of parameters, gradients and optimizer state per
  device for several strategies (rows from :func:`strategy_memory`), optionally with the
  compiled program's figure beside each bar.
* :func:`plot_pipeline_schedule`: the stage x iteration table of
  :func:`meshpar.parallel.schedule.schedule_table`, cells labelled with the microbatch (and the repeat for
  the circular schedule), bubbles hatched grey.

Length: about 440 lines, one concept (the PNGs meshpar draws), one function per figure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import matplotlib
import numpy as np
import optax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from meshpar.parallel.schedule import onef1b_table, repeat_table, schedule_table
from meshpar.sharding.strategy import get_strategy
from meshpar.train.plan import plan_training

_BUBBLE = "#eeeeee"


def _figure(**kwargs) -> Figure:
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)  # attaches itself to the figure: savefig renders with Agg
    return fig


def _save(fig, path: str | os.PathLike | None):
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _device_text(ids: Sequence[int], total: int) -> str:
    ids = sorted(ids)
    if len(ids) == total and total > 1:
        return f"all {total}"
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def _blocks(entry) -> tuple[list[int], dict[tuple[int, ...], list[int]]]:
    """Sharded dims of a parameter and, per block (slice index per sharded dim), its devices."""
    index_map = entry.sharding.devices_indices_map(tuple(entry.shape))
    starts = [sorted({(idx[d].start or 0) for idx in index_map.values()})
              for d in range(len(entry.shape))]
    sharded = [d for d, s in enumerate(starts) if len(s) > 1]
    cells: dict[tuple[int, ...], list[int]] = {}
    for device, idx in index_map.items():
        key = tuple(starts[d].index(idx[d].start or 0) for d in sharded)
        cells.setdefault(key, []).append(device.id)
    return sharded, cells


def _dim_label(entry, dims: Sequence[int]) -> str:
    mesh_axes = {}
    for d, s in enumerate(entry.spec):
        if s:
            mesh_axes[d] = s if isinstance(s, str) else "x".join(s)
    parts = []
    for d in dims:
        name = entry.logical[d] if entry.logical and entry.logical[d] else f"dim {d}"
        parts.append(f"{name} {entry.shape[d]} / {mesh_axes.get(d, '?')}")
    return " x ".join(parts)


def _param_panel(ax, entry, total_devices: int) -> None:
    sharded, cells = _blocks(entry)
    rows_d, cols_d = (sharded[:1], sharded[1:]) if len(sharded) != 1 else (
        ([], sharded) if sharded[0] == len(entry.shape) - 1 else (sharded, []))
    n_slices = {d: 1 + max(k[sharded.index(d)] for k in cells) for d in sharded}
    n_rows = math.prod(n_slices[d] for d in rows_d)
    n_cols = math.prod(n_slices[d] for d in cols_d)
    cmap = matplotlib.colormaps["tab20" if len(cells) > 10 else "tab10"]
    font = 9 if n_rows * n_cols <= 8 else 7 if n_rows * n_cols <= 16 else 5.5

    def flat(key, dims):
        i = 0
        for d in dims:
            i = i * n_slices[d] + key[sharded.index(d)]
        return i

    for n, (key, devices) in enumerate(sorted(cells.items())):
        r, c = flat(key, rows_d), flat(key, cols_d)
        color = "#d9d9d9" if not sharded else cmap(n % cmap.N)
        ax.add_patch(Rectangle((c, n_rows - 1 - r), 1, 1, facecolor=color, edgecolor="white",
                               linewidth=1.5))
        ax.text(c + 0.5, n_rows - 0.5 - r, _device_text(devices, total_devices),
                ha="center", va="center", fontsize=font)
    ax.set_xlim(0, n_cols)
    ax.set_ylim(0, n_rows)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    spec = "P(" + ", ".join("None" if s is None else repr(s) for s in entry.spec) + ")"
    ax.set_title(f"{entry.path}\n{list(entry.shape)} {spec}", fontsize=8)
    if cols_d:
        ax.set_xlabel(_dim_label(entry, cols_d), fontsize=7)
    if rows_d:
        ax.set_ylabel(_dim_label(entry, rows_d), fontsize=7)
    if not sharded:
        ax.set_xlabel("replicated", fontsize=7)


def _id_formula(mesh) -> str:
    # Say how ids map to mesh coordinates when the mesh holds the devices in id order.
    ids = [d.id for d in mesh.devices.flat]
    if ids != sorted(ids) or ids[0] != 0 or mesh.devices.ndim < 2:
        return ""
    terms, stride = [], 1
    for name, size in reversed(list(mesh.shape.items())):
        if size > 1:
            terms.append(name if stride == 1 else f"{stride}·{name}")
        stride *= size
    return "\n(id = " + " + ".join(reversed(terms)) + ")"


def plot_param_sharding(plan: Any, /, path: str | os.PathLike | None = None, *,
                        columns: int = 4, title: str = ""):
    """One panel per parameter: the blocks the mesh cuts it into and the devices holding each.

    Rows and columns of a panel are the slices of the sharded dimensions (the first sharded
    dimension down, the others across); a label like ``0,4`` means devices 0 and 4 hold copies
    of that block. A grey panel is a replicated parameter.

    Args:
        plan: a :class:`meshpar.ShardingPlan` (``trainer.plan``, ``init_nnx(...)[1]``).
        path: where to write the PNG (optional).
        columns: panels per row.
        title: a figure title.

    Example:
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset
        >>> from meshpar.sharding.placement import init_nnx
        >>> from meshpar.sharding.strategy import get_strategy
        >>> mesh = make_mesh(fsdp=4, tensor=2)
        >>> _, plan = init_nnx(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)), mesh=mesh,
        ...                    rules=get_strategy("zero3").param_rules(mesh))
        >>> fig = plot_param_sharding(plan)          # plot_param_sharding(plan, "sharding.png")
        >>> len(fig.axes)                            # 16 parameters, 4 panels a row
        16
    """
    entries = list(plan.entries)
    rows = max(1, math.ceil(len(entries) / columns))
    fig = _figure(figsize=(3.2 * columns, 2.5 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, entry in zip(axes.flat, entries):
        _param_panel(ax, entry, plan.mesh.size)
    for ax in list(axes.flat)[len(entries):]:
        ax.axis("off")
    mesh = ", ".join(f"{k}={v}" for k, v in plan.mesh.shape.items())
    fig.suptitle(title or f"parameter blocks per device, mesh {mesh}: cell text = ids of the "
                 f"devices holding that block{_id_formula(plan.mesh)}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def strategy_memory(
    make_model: Callable[[], Any], /, layouts: Mapping[str, tuple[Any, Any]], *, tx: Any = None,
    microbatches: int = 1, schedule: str = "gpipe", repeats: int = 1,
    pipeline_remat: bool | None = None,
) -> list[dict[str, Any]]:
    """Per-device bytes of parameters, gradients and optimizer state for several layouts.

    Args:
        make_model: the model factory (nothing is allocated: abstract shapes only).
        layouts: ``{label: (mesh, strategy)}``.
        tx: the optimizer (default ``optax.adamw(1e-3)``).
        microbatches, schedule, repeats, pipeline_remat: used by pipelined meshes.

    Returns:
        One dict per layout: ``label``, ``mesh``, ``strategy``, ``params``, ``grads``,
        ``optimizer`` (bytes per device, from :func:`meshpar.train.plan.plan_training`).

    Example:
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset
        >>> make_model = lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0))
        >>> rows = strategy_memory(make_model, {"DP": (make_mesh(data=8), "dp"),
        ...                                     "ZeRO-3": (make_mesh(fsdp=8), "zero3")})
        >>> [(r["label"], r["params"], r["grads"], r["optimizer"]) for r in rows]
        [('DP', 472064, 472064, 944132), ('ZeRO-3', 59008, 59008, 118020)]
    """
    tx = tx if tx is not None else optax.adamw(1e-3)
    out = []
    for label, (mesh, strategy) in layouts.items():
        strategy = get_strategy(strategy)
        plan = plan_training(make_model, mesh=mesh, strategy=strategy, tx=tx,
                             microbatches=microbatches, schedule=schedule, repeats=repeats,
                             pipeline_remat=pipeline_remat)
        opt = sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                  for a, s in zip(jax.tree.leaves(plan.abs_opt_state),
                                  jax.tree.leaves(plan.opt_shardings)))
        out.append({"label": label, "mesh": dict(mesh.shape), "strategy": strategy.name,
                    "params": plan.params.bytes_per_device,
                    "grads": plan.gradients.bytes_per_device, "optimizer": int(opt)})
    return out


def plot_strategy_memory(rows: Iterable[Mapping[str, Any]], /,
                         path: str | os.PathLike | None = None, *, title: str = ""):
    """Stacked bars: parameters, gradients, optimizer state per device, one bar per layout.

    Args:
        rows: dicts with ``label``, ``params``, ``grads``, ``optimizer`` (bytes per device),
            optionally ``mesh`` (shown under the label) and ``compiled`` (bytes per device
            the compiled step holds for parameters + optimizer state, drawn as a marker).
        path: where to write the PNG (optional).
        title: the figure title.

    Example:
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset
        >>> make_model = lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0))
        >>> layouts = {"DP": (make_mesh(data=8), "dp"), "ZeRO-3": (make_mesh(fsdp=8), "zero3")}
        >>> fig = plot_strategy_memory(strategy_memory(make_model, layouts))   # or a path too
        >>> [label.get_text().split("\\n")[0] for label in fig.axes[0].get_xticklabels()]
        ['DP', 'ZeRO-3']
    """
    rows = list(rows)
    scale, unit = _unit(max(r["params"] + r["grads"] + r["optimizer"] for r in rows))
    fig = _figure(figsize=(1.5 * len(rows) + 2.5, 4.4))
    ax = fig.subplots()
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for key, color in (("params", "#4c72b0"), ("grads", "#dd8452"), ("optimizer", "#55a868")):
        values = np.array([r[key] for r in rows], dtype=float) / scale
        ax.bar(x, values, 0.6, bottom=bottom, color=color,
               label={"optimizer": "optimizer state"}.get(key, key))
        bottom += values
    for xi, total, r in zip(x, bottom, rows):
        ax.text(xi, total, f"{total:.3g} {unit}", ha="center", va="bottom", fontsize=8)
    compiled = [(xi, r["compiled"] / scale) for xi, r in zip(x, rows) if r.get("compiled")]
    if compiled:
        ax.scatter([c[0] + 0.38 for c in compiled], [c[1] for c in compiled], marker="<",
                   color="black", zorder=3, label="compiled: params + optimizer state")
    ax.set_xticks(x)
    ax.set_xticklabels([
        r["label"] + ("\n" + ",".join(f"{k}={v}" for k, v in r["mesh"].items()) if r.get("mesh") else "")
        for r in rows], fontsize=8)
    ax.set_ylabel(f"bytes per device ({unit})")
    ax.set_ylim(0, bottom.max() * 1.15)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or "model state per device by strategy", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def _unit(n: float) -> tuple[float, str]:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return float(scale), unit
    return 1.0, "B"


def _schedule_cells(config) -> tuple[int, list[list[tuple[str, int, int, str] | None]]]:
    # Per stage and slot: (kind "F"/"B", microbatch, repeat, label) or None for idle.
    if config.schedule.one_f_one_b:
        t = onef1b_table(config)
        rows = []
        for s in range(config.stages):
            row = []
            for k in range(t.ticks):
                if t.forward_mb[s, k] >= 0:
                    m, r, kind = int(t.forward_mb[s, k]), int(t.forward_rep[s, k]), "F"
                elif t.backward_mb[s, k] >= 0:
                    m, r, kind = int(t.backward_mb[s, k]), int(t.backward_rep[s, k]), "B"
                else:
                    row.append(None)
                    continue
                label = f"{kind}{m}" + (f"\nr{r}" if config.repeats > 1 else "")
                row.append((kind, m, r, label))
            rows.append(row)
        return t.ticks, rows
    micro, rep = schedule_table(config), repeat_table(config)
    rows = [[None if micro[s, k] < 0 else
             ("F", int(micro[s, k]), int(rep[s, k]),
              f"m{micro[s, k]}\nr{rep[s, k]}" if config.repeats > 1 else f"m{micro[s, k]}")
             for k in range(config.iterations)] for s in range(config.stages)]
    return config.iterations, rows


def _schedule_title(config) -> str:
    head = f"P={config.stages} stages, M={config.microbatches} microbatches"
    if config.schedule.one_f_one_b:
        kind = config.schedule.value + (f", v={config.repeats}" if config.repeats > 1 else "")
        backward = ("recomputing its forward" if config.remat
                    else "from its forward's residuals")
        kept = "" if config.remat else f" + {onef1b_table(config).res_slots} residual sets"
        return (f"{kind}: {head}; backward pass: {config.ticks} ticks, one forward (F) or one "
                f"backward (B, {backward}) per stage per tick, after a "
                f"{config.iterations}-iteration forward loop;\nidle {config.bubble_fraction:.3f}, "
                f"{config.activation_slots} activations{kept} kept (flat in M), + "
                f"{2 * onef1b_table(config).routes.block} of the stack's input and output "
                "gradient in blocks over the stages")
    kind = (f"circular, v={config.repeats} repeats (a cell runs 1/v of a stage's layers)"
            if config.repeats > 1 else config.schedule.value)
    return (f"{kind}: {head}, {config.iterations} iterations, bubble fraction (P-1)/(vM+P-1) = "
            f"{config.bubble_fraction:.3f}, {config.activation_slots} activations kept")


def plot_pipeline_schedule(configs: Any, /, path: str | os.PathLike | None = None, *,
                           title: str = ""):
    """The schedule of one or more pipelines: stage x iteration (or tick), microbatch per cell.

    Args:
        configs: a :class:`meshpar.parallel.schedule.PipelineConfig`, or a sequence of them (one panel
            each, e.g. GPipe above 1F1B).
        path: where to write the PNG (optional).
        title: the figure title.

    GPipe and circular: each cell is the microbatch that stage computes at that iteration (``m3``
    or, for the circular schedule, ``m3 r1``: microbatch 3 on its second trip round the stages,
    i.e. layer chunk ``r*stages + s``); autodiff runs the same table backwards. 1F1B schedules:
    the ticks of the backward loop (:func:`meshpar.parallel.schedule.onef1b_table`), ``F3`` a
    forward and ``B3`` a backward (hatched) of microbatch 3. Colours follow the microbatch, later
    repeats are lighter, and idle cells are hatched grey.

    Example:
        >>> import os, tempfile
        >>> from meshpar.parallel.schedule import PipelineConfig
        >>> tmp = tempfile.TemporaryDirectory()
        >>> gpipe = PipelineConfig(stages=4, microbatches=8)
        >>> onef1b = PipelineConfig(stages=4, microbatches=8, schedule="1f1b")
        >>> fig = plot_pipeline_schedule([gpipe, onef1b], os.path.join(tmp.name, "schedule.png"))
        >>> [ax.get_xlabel() for ax in fig.axes], os.listdir(tmp.name)
        (['iteration', 'tick'], ['schedule.png'])
        >>> tmp.cleanup()
    """
    configs = [configs] if not isinstance(configs, (list, tuple)) else list(configs)
    grids = [_schedule_cells(c) for c in configs]
    width = max(w for w, _ in grids)
    heights = [c.stages for c in configs]
    fig = _figure(figsize=(max(6.0, 0.55 * width + 1.5), sum(0.5 * h + 1.0 for h in heights)))
    axes = fig.subplots(len(configs), 1, squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, config, (slots, rows) in zip(axes[:, 0], configs, grids):
        cmap = matplotlib.colormaps["tab10" if config.microbatches <= 10 else "tab20"]
        for s, row in enumerate(rows):
            for t, cell in enumerate(row):
                y = config.stages - 1 - s
                if cell is None:
                    # Hatch lines take the edge colour: a grey hatch, then a white cell border.
                    ax.add_patch(Rectangle((t, y), 1, 1, facecolor=_BUBBLE, edgecolor="#9a9a9a",
                                           hatch="///", linewidth=0))
                    ax.add_patch(Rectangle((t, y), 1, 1, fill=False, edgecolor="white",
                                           linewidth=1.5))
                    continue
                kind, m, r, label = cell
                # Later trips round the ring: the same microbatch colour, lighter.
                ax.add_patch(Rectangle((t, y), 1, 1, facecolor=cmap(m % cmap.N),
                                       alpha=1.0 if r == 0 else 0.45, edgecolor="white",
                                       linewidth=1.5, hatch="..." if kind == "B" else None))
                ax.text(t + 0.5, y + 0.5, label, ha="center", va="center", fontsize=7,
                        fontweight="bold", color="white" if r == 0 else "black")
        ax.set_xlim(0, width)
        ax.set_ylim(0, config.stages)
        ax.set_yticks(np.arange(config.stages) + 0.5)
        ax.set_yticklabels([f"stage {s}" for s in reversed(range(config.stages))], fontsize=8)
        ax.set_xticks(np.arange(slots) + 0.5)
        ax.set_xticklabels([str(t) for t in range(slots)], fontsize=7)
        ax.set_xlabel("tick" if config.schedule.one_f_one_b else "iteration", fontsize=8)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_title(_schedule_title(config), fontsize=9)
    axes[-1, 0].legend(handles=[Patch(facecolor=_BUBBLE, edgecolor="#9a9a9a", hatch="///",
                                      label="bubble (idle)")],
                       loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]], /) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better), in
    increasing order of the first coordinate.

    Example:
        >>> pareto_front([(1, 5), (2, 3), (3, 4), (4, 1)])
        [0, 1, 3]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_plan(rows: Iterable[Mapping[str, Any]], /, path: str | os.PathLike | None = None, *,
              budget: float | None = None, title: str = "") -> Figure:
    """Predicted step time against memory per device for a planner's candidates.

    Args:
        rows: one mapping per candidate with ``step_s``, ``memory_bytes``, ``fits``,
            ``source`` (``"compiled"`` or ``"analytic"``) and ``layout`` (a label);
            :meth:`meshpar.planner.Candidate.as_dict` gives them.
        path: write a PNG here.
        budget: memory per device allowed (a vertical line).
        title: the figure's title.

    The Pareto front of the fitting candidates (no other is both faster and smaller) is joined
    by a line and its points labelled; compiled candidates are filled circles, analytic ones
    hollow, those that do not fit grey crosses.

    Example:
        >>> from meshpar.models import get_preset
        >>> from meshpar.planner.search import plan_gpt
        >>> result = plan_gpt(get_preset("tiny"), batch_size=16, devices=8, hardware="h100-sxm",
        ...                   compile_top=0, progress=False)
        >>> fig = plot_plan([c.as_dict() for c in result.candidates], budget=80 * 2**30)
        >>> fig.axes[0].get_ylabel()                 # plot_plan(rows, "plan.png", ...) saves it
        'predicted step time (ms)'
    """
    rows = list(rows)
    fig = _figure(figsize=(8, 5))
    ax = fig.add_subplot()
    top = max([r["memory_bytes"] for r in rows] + [1])
    # The budget is drawn when it is on the chart's scale; far above, it is named instead.
    show_budget = budget is not None and budget <= 2 * top
    scale, unit = _unit(max(top, budget) if show_budget else top)
    for r in rows:
        x, y = r["memory_bytes"] / scale, r["step_s"] * 1e3
        if not r["fits"]:
            ax.plot(x, y, "x", color="#999999")
        elif r["source"] == "compiled":
            ax.plot(x, y, "o", color="C0")
        else:
            ax.plot(x, y, "o", mfc="none", color="C0", alpha=0.6)
    fitting = [r for r in rows if r["fits"]]
    front = [fitting[i] for i in pareto_front([(r["memory_bytes"], r["step_s"]) for r in fitting])]
    if front:
        ax.plot([r["memory_bytes"] / scale for r in front], [r["step_s"] * 1e3 for r in front],
                "-", color="C3", lw=1.5, label="Pareto front")
        # Label the front's ends and a few points between (labels of a long front overlap).
        step = max(1, len(front) // 6)
        for r in front[::step] + ([front[-1]] if (len(front) - 1) % step else []):
            ax.annotate(r["layout"], (r["memory_bytes"] / scale, r["step_s"] * 1e3), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    if show_budget:
        ax.axvline(budget / scale, color="C1", ls="--", label="memory budget")
    elif budget is not None:
        s_, u_ = _unit(budget)
        ax.text(0.99, 0.98, f"memory budget {budget / s_:.0f} {u_} (off the chart)",
                transform=ax.transAxes, ha="right", va="top", fontsize=8, color="C1")
    ax.set_xlim(left=0)
    ax.set_xlabel(f"memory per device ({unit})")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title(title or "candidate layouts")
    ax.text(0.01, 0.01, "filled: compiled, hollow: formula only, x: does not fit",
            transform=ax.transAxes, fontsize=7, color="#555555")
    ax.legend(loc="upper center", fontsize=8)
    return _save(fig, path)
