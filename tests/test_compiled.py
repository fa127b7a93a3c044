"""What XLA actually compiled: ZeRO memory formulas, Megatron reductions, collectives in loops."""

import optax
import pytest
from flax import nnx

import meshpar as mp
from meshpar.inspect.hlo import collectives
from meshpar.models import GPT, get_preset, lm_loss
from meshpar.train.data import TokenBatches

CFG = get_preset("tiny").replace(layers=3)
BATCH = TokenBatches(batch_size=16, seq_len=32, seed=0).batch(0)
PSI = CFG.param_count()


def _trainer(mesh_text, strategy, microbatches=1, cfg=CFG):
    # Every test here reads the compiled step and never runs it: an abstract state
    # (allocate=False) lowers to the same program without compiling the initialiser.
    return mp.Trainer(
        lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-3), lm_loss,
        mesh=mp.make_mesh(mesh_text), strategy=strategy,
        config=mp.TrainConfig(microbatches=microbatches, row_separable=True), allocate=False,
    )


# Bytes per device of parameters + gradients + Adam moments in fp32 (ZeRO paper, K = 8):
# DP 16Ψ; ZeRO-1 4Ψ + 4Ψ + 8Ψ/N; ZeRO-2 4Ψ + 12Ψ/N; ZeRO-3 16Ψ/N.
ZERO_FORMULAS = {
    "dp": lambda n: 16 * PSI,
    "zero1": lambda n: 8 * PSI + 8 * PSI / n,
    "zero2": lambda n: 4 * PSI + 12 * PSI / n,
    "zero3": lambda n: 16 * PSI / n,
}


@pytest.mark.parametrize("strategy", ["dp", "zero1", "zero2", "zero3"])
def test_model_state_bytes_per_device_follow_the_zero_formulas(strategy):
    mesh_text = "data=8" if strategy == "dp" else "fsdp=8"
    trainer = _trainer(mesh_text, strategy)
    mem = trainer.lower(BATCH).compile().memory_analysis()
    batch_bytes = sum(v.nbytes for v in BATCH.values()) / 8
    # Arguments are the donated state (params + Adam state + step) and this device's batch rows.
    state_bytes = mem.argument_size_in_bytes - batch_bytes
    grad_bytes = trainer.grad_plan.bytes_per_device
    measured = state_bytes + grad_bytes
    expected = ZERO_FORMULAS[strategy](8)
    assert measured == pytest.approx(expected, rel=0.05), (strategy, measured, expected)
    # And the state is donated: outputs alias the arguments instead of needing new buffers.
    assert mem.alias_size_in_bytes >= 0.95 * (state_bytes)


def test_tensor_parallel_layer_forward_has_two_reductions_and_nothing_else():
    trainer = _trainer("data=2,tensor=4", "tp")
    mesh = trainer.mesh
    ops = collectives(trainer.lower_loss(BATCH).compile().as_text(), mesh=mesh)
    in_loop = [op for op in ops if op.in_loop]
    # Megatron: one all-reduce after attention's row-parallel projection, one after the MLP's,
    # per layer, over the tensor axis only, and nothing else inside the layer scan.
    assert sorted((op.kind, op.mesh_axes, op.trip_count) for op in in_loop) == [
        ("all-reduce", ("tensor",), CFG.layers)] * 2
    activation_bytes = 16 // 2 * 32 * CFG.d_model * 4  # B/data x T x D, fp32
    assert all(op.result_bytes == activation_bytes for op in in_loop)
    # Outside the loop: only tensor-axis reductions (vocab-parallel embedding and softmax) and
    # the scalar loss mean over data.
    for op in ops:
        if not op.in_loop:
            assert op.kind == "all-reduce" and op.mesh_axes in (("tensor",), ("data",)), op


@pytest.mark.parametrize("strategy, mesh_text, microbatches", [
    ("dp", "data=8", 2), ("zero1", "data=2,fsdp=4", 2),
    # One microbatch on CPU devices: one reduction after the backward pass, not GSPMD's
    # all-reduce per layer inside the scan and one per use of the tied embedding
    # (meshpar.train.paths.reduce_once_pays); "auto" without an fsdp axis is DP.
    ("dp", "data=8", 1), ("zero1", "data=2,fsdp=4", 1), ("auto", "data=8", 1),
])
def test_accumulation_reduces_gradients_once_after_the_loop(strategy, mesh_text, microbatches):
    trainer = _trainer(mesh_text, strategy, microbatches=microbatches)
    ops = collectives(trainer.lower(BATCH).compile().as_text(), mesh=trainer.mesh)
    grad_reductions = [op for op in ops if op.kind == "all-reduce"]
    assert grad_reductions and not any(op.in_loop for op in grad_reductions), grad_reductions
    total = sum(op.result_bytes * op.trip_count for op in grad_reductions)
    assert total == pytest.approx(4 * PSI, rel=0.01)  # every gradient reduced exactly once


def test_zero3_gathers_inside_the_layer_loop_and_keeps_only_one_layer_whole():
    trainer = _trainer("fsdp=8", "zero3")
    compiled = trainer.lower(BATCH).compile()
    ops = collectives(compiled.as_text(), mesh=trainer.mesh)
    gathers = [op for op in ops if op.kind == "all-gather" and op.in_loop]
    assert gathers and all(op.trip_count == CFG.layers for op in gathers)
    assert all(op.mesh_axes == ("fsdp",) for op in ops)
    # Forward + backward (remat regathers) => each layer's weights are gathered twice per step.
    layer_params = sum(e.bytes_total for e in trainer.plan.entries if e.path.startswith("blocks/"))
    gathered = sum(op.result_bytes * op.trip_count for op in gathers)
    assert gathered == pytest.approx(2 * layer_params, rel=0.02)
    # The backward's per-layer reduce-scatter takes its [fsdp, layer] operand from one
    # concatenation of the leaves' gradients, not from each gradient padded to the whole buffer
    # and added up (autodiff's transpose of the gather's slices: 9.5% of the small preset's op
    # time). Compare meshpar.parallel.zero._scatter_flat.
    scatters = [op for op in ops if op.kind == "reduce-scatter" and op.in_loop]
    flat_shapes = {f"[{op.group_size},{op.result_bytes // 4}]" for op in scatters}
    padded = [line for line in compiled.as_text().splitlines()
              if " pad(" in line and any(f"f32{shape}" in line for shape in flat_shapes)]
    assert scatters and not padded, padded[:2]
    # Up front, the leaves outside the layer stack (the tiny preset's tables and final layer
    # norm, each at most JOINT_GATHER_BYTES a device) are gathered as one and their gradients
    # reduce-scattered as one: on emulated devices a collective costs its rendezvous (issue 13's
    # small model, bf16, fsdp=8: step 0.96x with the one gather). One by one it was 4 and 4.
    outside = [op for op in ops if not op.in_loop and op.kind in ("all-gather", "reduce-scatter")]
    assert sorted(op.kind for op in outside) == ["all-gather", "reduce-scatter"], outside
    upfront = sum(e.bytes_total for e in trainer.plan.entries if not e.path.startswith("blocks/"))
    gather = next(op for op in outside if op.kind == "all-gather")
    assert gather.result_bytes == pytest.approx(upfront, rel=0.01)


def _zero3_temp_growth_per_layer(remat):
    temps = []
    for layers in (3, 6):
        trainer = _trainer("fsdp=8", "zero3", cfg=CFG.replace(layers=layers, remat=remat))
        temps.append(trainer.lower(BATCH).compile().memory_analysis().temp_size_in_bytes)
    layer_bytes = sum(e.bytes_total for e in trainer.plan.entries if e.path.startswith("blocks/")) / 6
    return (temps[1] - temps[0]) / 3 / layer_bytes


def test_zero3_with_remat_does_not_keep_gathered_layers_alive():
    # design.md: without remat, autodiff saves every gathered layer for the backward pass and
    # the whole model lives unsharded. Each extra layer must cost far less than its weights.
    assert _zero3_temp_growth_per_layer("full") < 0.5
    assert _zero3_temp_growth_per_layer("none") > 1.0  # the failure this guards against
