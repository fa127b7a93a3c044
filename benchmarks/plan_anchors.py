"""The planner against published training runs (issue 15, "Published anchors").

For each published configuration (model, device count, global batch, hardware and the layout the
authors ran), it plans the same model, batch and device count with ``plan_gpt`` on the matching
hardware profile and prints: the published MFU, the planner's predicted MFU for the published
layout (expressed as a meshpar :class:`~meshpar.planner.Layout`), where that layout ranks among
the planner's candidates by predicted step time (and how many there are), whether the planner's
memory estimate fits it in the device's memory, and the planner's top pick with its MFU.

Device counts of 64 and 1024 are far above the 8 devices this machine emulates, and the models
(32B-175B parameters) far above what a 24 GiB machine compiles comfortably, so this runs the
planner's **analytic path only** (``compile_top=0``: the formulas of
:mod:`meshpar.inspect.costs` and :mod:`meshpar.planner.cost`, nothing compiled or allocated).
What the analytic path leaves out is listed with the table in ``benchmarks/README.md``
("Planner: published anchors").

Run ``python benchmarks/plan_anchors.py`` (about a minute on 2 cores; ``--json FILE`` keeps
every figure).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

GIB = 2**30


@dataclasses.dataclass(frozen=True, kw_only=True)
class Anchor:
    """One published run.

    Attributes:
        name: what the table calls it.
        source: where the figures come from.
        model: the :class:`~meshpar.models.GPTConfig` keyword arguments of the matching GPT.
        devices, batch_size, seq_len, hardware: the run's devices (GPUs or TPU chips), global
            batch (sequences), sequence length and meshpar hardware profile.
        layout: the published layout as :class:`~meshpar.planner.Layout` keyword arguments.
        published_mfu: the published model FLOPs utilisation (fraction), recompute excluded.
        published_note: how ``published_mfu`` was read or derived from the source.
        remats: the remat policies the planner tries (the published one among them).
        gaps: what the meshpar layout cannot express of the published one.
    """

    name: str
    source: str
    model: dict
    devices: int
    batch_size: int
    seq_len: int
    hardware: str
    layout: dict
    published_mfu: float
    published_note: str
    remats: tuple[str, ...]
    gaps: str


def _megatron_mfu(tflops: float, *, layers: int, hidden: int, seq: int, vocab: int,
                  peak: float) -> float:
    """Megatron-LM's per-GPU throughput counts FLOPs with activation recomputation (their
    Eq. 3, ``96 B s l h^2 (1 + s/6h + V/16lh)``); model FLOPs leave the recomputed forward out
    (``72 B s l h^2 (1 + s/6h + V/12lh)``). The MFU is the throughput times their ratio over the
    peak."""
    with_recompute = 96 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))
    model = 72 * (1 + seq / (6 * hidden) + vocab / (12 * layers * hidden))
    return tflops * model / with_recompute / peak


def _maxtext(scale: int) -> dict:
    """MaxText's ``global_parameter_scale`` applied to ``configs/base.yml`` (base_emb_dim 2048,
    16 heads of 128, base_mlp_dim 7168, 16 layers, vocab 32000, untied logits), as its
    ``pyconfig.get_individual_scales`` does. Its MLP is gated (SwiGLU: three ``d x mlp``
    matrices); meshpar's GPT has two, so ``mlp_dim`` is 1.5 x MaxText's: the same matmul
    parameters and FLOPs."""
    base, rem = divmod(scale.bit_length() - 1, 3)
    heads = 2 ** (base + (rem > 0))
    emb = 2 ** (base + (rem > 1))
    return dict(vocab_size=32000, seq_len=2048, layers=16 * 2**base, d_model=2048 * emb,
                heads=16 * heads, head_dim=128, mlp_dim=3 * 7168 * heads // 2,
                tie_embeddings=False)


MAXTEXT_SOURCE = ("MaxText README, 'Runtime Performance Results', TPU v5p table; layout from "
                  "MaxText/configs/v5p/{size}.sh (ici_fsdp_parallelism=-1, "
                  "ici_tensor_parallelism=4, per_device_batch_size={pdb}, remat_policy=minimal, "
                  "max_target_length=2048)")
MAXTEXT_GAPS = ("MaxText shards the batch over its tensor axis too (data_sharding includes "
                "'tensor'); meshpar's tensor axis is Megatron TP (activations replicated over it), "
                "so the batch is split 16 ways here, not 64; gated MLP as 1.5x mlp_dim; flash "
                "attention not modelled; remat 'minimal' as meshpar's 'dots'")

def _maxtext_anchor(scale: int, *, per_device_batch: int, published_mfu: float,
                    published_note: str) -> Anchor:
    """MaxText's ``global_parameter_scale`` ``scale`` on v5p-128 (64 chips) in its published
    layout."""
    return Anchor(
        name=f"MaxText {scale}B, v5p-128 (64 chips)",
        source=MAXTEXT_SOURCE.format(size=f"{scale}b", pdb=per_device_batch),
        model=_maxtext(scale), devices=64, batch_size=per_device_batch * 64, seq_len=2048,
        hardware="tpu-v5p",
        layout=dict(fsdp=16, tensor=4, zero_stage=3, remat="dots", precision="bf16"),
        published_mfu=published_mfu, published_note=published_note,
        remats=("full", "dots", "none"), gaps=MAXTEXT_GAPS,
    )


ANCHORS = (
    Anchor(
        name="GPT-3 175B, Megatron-LM, 1024 x A100",
        source=("Narayanan et al. 2021, 'Efficient Large-Scale Language Model Training on GPU "
                "Clusters Using Megatron-LM' (arXiv:2104.04473), section 5.1: GPT-3 175B on 1024 "
                "A100-80GB at batch 1536 and 140 TFLOP/s per GPU (their FLOP count includes "
                "activation recomputation); GPT-3 shape from Table 2 (96 layers, hidden 12288, "
                "96 heads, seq 2048, vocab 51200)"),
        model=dict(vocab_size=51200, seq_len=2048, layers=96, d_model=12288, heads=96,
                   mlp_dim=4 * 12288, tie_embeddings=True),
        devices=1024, batch_size=1536, seq_len=2048, hardware="a100-80g",
        layout=dict(pipe=8, data=16, tensor=8, microbatches=96, schedule="interleaved-1f1b",
                    repeats=2, remat="full", precision="bf16"),
        published_mfu=_megatron_mfu(140.0, layers=96, hidden=12288, seq=2048, vocab=51200,
                                    peak=312.0),
        published_note="140 TFLOP/s x model/hardware FLOPs (Eq. 3) / 312 TFLOP/s",
        remats=("full", "dots", "none"),
        gaps=("the 1024-GPU layout is not in the text retrieved: tensor 8 (one DGX node, the "
              "paper's rule) x pipe 8 x data 16, interleaved with 2 chunks per stage and "
              "microbatch size 1 (M = 96) assumed; Megatron's fp16 weights + fp32 master copy "
              "and its scatter/gather of pipeline sends are not meshpar's"),
    ),
    _maxtext_anchor(32, per_device_batch=7, published_mfu=0.6776,
                    published_note=("67.76% in the README's table (MaxText/configs/v5p/README.md "
                                    "gives 71.47% for 1x v5p-128)")),
    _maxtext_anchor(64, per_device_batch=3, published_mfu=0.7031,
                    published_note=("70.31% in the README's table and in "
                                    "MaxText/configs/v5p/README.md")),
)


def parse_args(argv: Sequence[str] | None = None):
    p = _common.parser(__doc__)
    p.add_argument("--only", default="", help="run the anchors whose name contains this")
    return _common.parse_args(p, argv)


def plan_anchor(anchor: Anchor) -> dict:
    """Plan one anchor analytically and place its published layout among the candidates."""
    from meshpar.models import GPTConfig
    from meshpar.planner import Layout, enumerate_layouts, load_profile, plan_gpt
    from meshpar.planner.layout import Dims

    config = GPTConfig(**anchor.model)
    hardware = load_profile(anchor.hardware)
    published = Layout(**anchor.layout)
    layouts, rejected = enumerate_layouts(
        anchor.devices, batch_size=anchor.batch_size,
        dims=Dims(layers=config.layers, heads=config.heads, mlp_dim=config.mlp_dim),
        devices_per_node=hardware.devices_per_node, remats=anchor.remats,
        precisions=(published.precision,))
    enumerated = published in layouts
    if not enumerated:
        # The enumeration's microbatch counts (P, 2P, 4P) need not hold the published one.
        layouts.append(published)
    result = plan_gpt(config, batch_size=anchor.batch_size, seq_len=anchor.seq_len,
                      devices=anchor.devices, hardware=hardware, layouts=layouts,
                      compile_top=0, progress=False)
    by_time = sorted(result.candidates, key=lambda c: c.time.step)
    mine = next(c for c in result.candidates if c.layout == published)
    fitting = [c for c in by_time if c.fits]
    top = fitting[0] if fitting else None

    def rank(among):
        # 1 + the candidates predicted strictly faster: layouts that tie (the same step time
        # under another ZeRO stage, say) share a rank.
        return 1 + sum(c.time.step < mine.time.step * (1 - 1e-9) for c in among)
    t = mine.time
    return {
        "name": anchor.name, "source": anchor.source, "gaps": anchor.gaps,
        "published_layout": published.label, "enumerated": enumerated,
        "published_mfu": anchor.published_mfu, "published_note": anchor.published_note,
        "predicted_mfu": t.mfu, "predicted_step_s": t.step,
        "parts_s": {"compute": t.compute, "exposed_comm": t.exposed, "bubble": t.bubble,
                    **{f"comm_{a}": s for a, s in t.comm_per_axis.items()}},
        "memory_gib": mine.memory / GIB, "budget_gib": mine.budget / GIB, "fits": mine.fits,
        "rank_by_time": rank(by_time), "candidates": len(by_time),
        "rank_among_fitting": rank(fitting) if mine.fits else None,
        "fitting": len(fitting), "rejected_before_costing": len(rejected),
        "top_pick": top.layout.label if top else None,
        "top_pick_mfu": top.time.mfu if top else None,
        "top_pick_memory_gib": top.memory / GIB if top else None,
        "fastest": by_time[0].layout.label, "fastest_mfu": by_time[0].time.mfu,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import meshpar as mp

    mp.emulate_devices(args.cpu_devices)
    bench = _common.Run(args, "plan_anchors.py")
    rows = [plan_anchor(a) for a in ANCHORS if args.only.lower() in a.name.lower()]
    head = (f"{'configuration':36s} {'published':>9s} {'predicted':>9s} {'mem/budget GiB':>15s} "
            f"{'rank (time)':>13s} {'rank (fit)':>11s}  top pick (MFU)")
    print(head)
    print("-" * len(head))
    for r in rows:
        fit = f"{r['rank_among_fitting']}/{r['fitting']}" if r["fits"] else f"-/{r['fitting']}"
        top = f"{r['top_pick']} ({r['top_pick_mfu']:.1%})" if r["top_pick"] else "nothing fits"
        print(f"{r['name'][:36]:36s} {r['published_mfu']:>9.1%} {r['predicted_mfu']:>9.1%} "
              f"{r['memory_gib']:>7.0f}/{r['budget_gib']:<7.0f} "
              f"{r['rank_by_time']:>6d}/{r['candidates']:<6d} {fit:>11s}  {top}")
    for r in rows:
        parts = ", ".join(f"{k} {v:.3g}" for k, v in r["parts_s"].items())
        print(f"\n{r['name']}: published layout {r['published_layout']}"
              f"{'' if r['enumerated'] else ' (added to the enumeration)'}; predicted step "
              f"{r['predicted_step_s']:.3g} s ({parts}); fastest regardless of memory: "
              f"{r['fastest']} ({r['fastest_mfu']:.1%})")
        print(f"  published MFU: {r['published_note']}")
        print(f"  source: {r['source']}")
        print(f"  not expressed: {r['gaps']}")
    report = {"rows": rows, "meta": bench.meta()}
    _common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
