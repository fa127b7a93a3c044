"""What a layout should cost, by formula: FLOPs, collective bytes and ZeRO model state.

Pure arithmetic (no JAX, no compiled program): the analytic side that
:mod:`meshpar.inspect.explain` sets beside the compiled program, and that the benchmarks
(``benchmarks/bench_strategies.py``, ``benchmarks/bench_peers.py``) import, so each formula is
written once. Ring algorithms throughout: an all-reduce of ``X`` bytes over ``n`` devices sends
``2 (n-1)/n X`` per device, an all-gather of an ``X``-byte result (or a reduce-scatter of an
``X``-byte input) ``(n-1)/n X``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from meshpar.axes import BATCH_AXES, DATA, FSDP, TENSOR
from meshpar.parallel.schedule import PipelineConfig, Schedule


def zero_state_bytes(grad_bytes: float, *, fsdp: int, zero_stage: int,
                     optimizer_k: float) -> dict[str, float]:
    """Per-device bytes of parameters, gradients and optimizer state under ZeRO.

    ``G`` (``grad_bytes``) is the fp32 size one device holds before ZeRO (the parameters split
    only by the model-parallel axes); ZeRO splits, over ``fsdp`` devices, the optimizer state
    (``K x G``, ``K = 2`` for Adam) from stage 1, the gradients from stage 2 and the parameters
    from stage 3: ``16Ψ/N``-style, as in the ZeRO paper.

    Example:
        >>> zero_state_bytes(4000, fsdp=4, zero_stage=3, optimizer_k=2)
        {'params': 1000.0, 'grads': 1000.0, 'optimizer': 2000.0}
    """
    n = fsdp
    return {"params": grad_bytes / (n if zero_stage >= 3 else 1),
            "grads": grad_bytes / (n if zero_stage >= 2 else 1),
            "optimizer": optimizer_k * grad_bytes / (n if zero_stage >= 1 else 1)}


def model_flops(*, layers: int, d_model: int, matmul_params: int, batch: int, seq: int) -> dict:
    """Training FLOPs of one step of a GPT: forward + backward, no recompute.

    ``matmul = 6 * tokens * matmul_params`` (2 forward, 4 backward per parameter and token) and
    ``attention = 12 * layers * batch * seq**2 * d_model``: per layer the forward computes
    ``Q K^T`` and ``P V``, each ``2 * batch * seq**2 * d_model`` FLOPs over all heads, and the
    backward twice that. The full ``seq x seq`` score matrix is counted (the model computes it
    and masks it; a causal kernel that skips the masked half would do half of this).
    """
    tokens = batch * seq
    matmul = 6 * tokens * matmul_params
    attention = 12 * layers * batch * seq * seq * d_model
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def ring_all_reduce(nbytes: float, n: int) -> float:
    """Bytes each device sends in a ring all-reduce of ``nbytes`` over ``n`` devices."""
    return 2 * (n - 1) / n * nbytes if n > 1 else 0.0


def ring_all_gather(full_bytes: float, n: int) -> float:
    """Bytes each device sends to all-gather a ``full_bytes`` result over ``n`` devices (the
    same as a reduce-scatter of a ``full_bytes`` input)."""
    return (n - 1) / n * full_bytes if n > 1 else 0.0


def dp_gradient_bytes(grad_bytes: float, n: int) -> float:
    """DP: one ring all-reduce of the gradients, ``2 (n-1)/n * grad_bytes`` per device."""
    return ring_all_reduce(grad_bytes, n)


def zero3_bytes(param_bytes: float, n: int) -> float:
    """ZeRO-3: all-gather the parameters forward and again backward, reduce-scatter the
    gradients; each ``(n-1)/n * param_bytes``, so ``3 (n-1)/n * param_bytes`` per device."""
    return 3 * ring_all_gather(param_bytes, n)


def megatron_tp_bytes(*, layers: int, activation_bytes: float, n: int,
                      recompute_per_layer: int = 0, embedding: int = 2) -> float:
    """Megatron tensor parallel over ``n`` devices: per layer 2 all-reduces of the ``[B, T, D]``
    activation forward (attention and MLP outputs) and 2 backward (their inputs' gradients),
    ``recompute_per_layer`` more for a rematerialised forward, plus ``embedding`` for the
    vocab-parallel embedding (forward) and unembedding (backward). Each is a ring all-reduce of
    ``activation_bytes`` (the per-device ``B_local x T x D`` activation)."""
    count = (4 + recompute_per_layer) * layers + embedding
    return count * ring_all_reduce(activation_bytes, n)


def _axis_factors(spec: Any, mesh_shape: dict[str, int]) -> dict[str, int]:
    """How many ways each mesh axis splits a tensor with PartitionSpec ``spec``."""
    out: dict[str, int] = defaultdict(lambda: 1)
    for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            if axis is not None:
                out[axis] *= mesh_shape[axis]
    return out


def analytic_collectives(*, mesh_shape: dict[str, int], zero_stage: int,
                         params: Sequence[tuple[int, Any, Any]], layers: int, batch: int,
                         seq: int, d_model: int, act_itemsize: int = 4, remat: str = "full",
                         batch_axes: Sequence[str] = BATCH_AXES) -> dict[str, dict]:
    """Analytic per-step traffic per device, for each mesh axis of the mesh.

    Args:
        mesh_shape: axis name -> size.
        zero_stage: the strategy's ZeRO stage (acts on ``fsdp``).
        params: ``(bytes_total, param_spec, optimizer_spec)`` of every parameter.
        layers, batch, seq, d_model: the GPT's sizes (for the tensor-parallel activations).
        remat: the layer remat policy; ``"full"`` recomputes the forward in the backward pass,
            which repeats the attention-output all-reduce (the recomputed MLP output is dead: the
            backward never needs a block's own output), i.e. 1 more all-reduce per layer.

    Returns:
        ``{axis: {"min": bytes, "remat": bytes, "kinds": {kind: bytes}, "formula": str}}``;
        ``min`` is the textbook minimum, ``remat`` adds what the configured recompute needs and
        ``kinds`` splits ``remat`` into ``gather`` (all-gathers: ZeRO parameters) and
        ``reduce`` (gradient reduce-scatters for parameters split over the axis, all-reduces for
        the others and for Megatron activations).
    """
    out: dict[str, dict] = {}
    for axis, n in mesh_shape.items():
        if n == 1:
            continue
        if axis == DATA:
            grad = 0.0
            for total, spec, _ in params:
                f = _axis_factors(spec, mesh_shape)
                grad += total / math.prod(f.values())
            b = dp_gradient_bytes(grad, n)
            out[axis] = {"min": b, "remat": b, "kinds": {"reduce": b},
                         "formula": f"2(N-1)/N x grad B/device = 2*{n - 1}/{n} x {grad:.0f}"}
        elif axis == FSDP:
            sharded = unsharded = 0.0
            for total, spec, opt_spec in params:
                f = _axis_factors(spec if zero_stage >= 3 else opt_spec, mesh_shape)
                local = total / math.prod(v for a, v in f.items() if a != FSDP)
                if f[FSDP] > 1 and zero_stage >= 1:
                    sharded += local
                else:
                    unsharded += local
            gathers = 2 if zero_stage >= 3 else 1  # ZeRO-3: forward and backward; 1/2: update
            kinds = {"gather": gathers * ring_all_gather(sharded, n),
                     "reduce": ring_all_gather(sharded, n) + ring_all_reduce(unsharded, n)}
            b = sum(kinds.values())
            out[axis] = {"min": b, "remat": b, "kinds": kinds,
                         "formula": f"{gathers + 1}(N-1)/N x {sharded:.0f} B split over fsdp "
                                    f"+ 2(N-1)/N x {unsharded:.0f} B not split"}
        elif axis == TENSOR:
            ways = math.prod(mesh_shape.get(a, 1) for a in batch_axes)
            act = batch // ways * seq * d_model * act_itemsize
            recompute = 1 if remat == "full" else 0
            lo = megatron_tp_bytes(layers=layers, activation_bytes=act, n=n)
            hi = megatron_tp_bytes(layers=layers, activation_bytes=act, n=n,
                                   recompute_per_layer=recompute)
            out[axis] = {"min": lo, "remat": hi, "kinds": {"reduce": hi},
                         "formula": f"(4L+2+{recompute}L) x 2(N-1)/N x B_loc*T*D*4 B "
                                    f"= {4 * layers + 2 + recompute * layers} x AR({act:.0f} B)"}
    return out


def gpt_train_flops(config: Any, /, *, batch_size: int, seq_len: int,
                    pipelined: bool = False) -> float:
    """Analytic FLOPs of one training step of :class:`meshpar.models.GPT`, over all devices.

    Forward: ``2 x matmul params x tokens`` plus attention ``4·B·T²·H·K`` per layer (scores and
    values, the full causal square); backward twice the forward. Each ``"full"`` remat recomputes
    the layers' forward once more (the layer scan's, and the pipeline's stage remat when
    pipelined). Other remat policies save matmul results and are counted as no recompute.

    Example:
        >>> from meshpar.models import get_preset
        >>> gpt_train_flops(get_preset("tiny"), batch_size=16, seq_len=32)
        486539264.0
    """
    tokens = batch_size * seq_len
    h, k, d, m = config.heads, config.head_size, config.d_model, config.mlp_dim
    attention = config.layers * 4.0 * batch_size * seq_len**2 * h * k
    forward = 2.0 * config.matmul_param_count() * tokens + attention
    layer_forward = 2.0 * config.layers * (4 * d * h * k + 2 * d * m) * tokens + attention
    recomputes = (config.remat == "full") + bool(pipelined)
    return 3 * forward + recomputes * layer_forward


def zero3_working_bytes(layer_param_bytes: float, *, fsdp: int) -> float:
    """What ZeRO-3 holds beyond its shards while a layer runs: that layer's gathered parameters
    and its whole gradient before the reduce-scatter, ``2 (N-1)/N x layer bytes`` (the shard a
    device already holds is not counted twice). A lower estimate: XLA may prefetch the next
    layer's gather too.

    Example:
        >>> zero3_working_bytes(1000.0, fsdp=4)
        1500.0
    """
    return 2 * (fsdp - 1) / fsdp * layer_param_bytes if fsdp > 1 else 0.0


def gpt_layer_residual_bytes(config: Any, /, *, rows: int, seq_len: int, tensor: int = 1,
                             itemsize: int = 4) -> float:
    """Bytes autodiff saves for the backward pass of one GPT block (per device), as
    ``jax.ad_checkpoint.saved_residuals`` lists them for :class:`meshpar.models.gpt.Block`.

    ``itemsize`` is the compute dtype's (4 fp32, 2 bf16); LayerNorm statistics, the attention
    scores and the softmax run in fp32 whatever it is. Per row, with ``T`` tokens, ``D`` width,
    ``H K`` the heads and head width and ``M`` the MLP width (``H`` and ``M`` split by
    ``tensor``):

    * each of the 2 LayerNorms: ``x - mean``, the normalised ``x`` and its scaled copy in fp32
      (``3 T D x 4``) and the result in the compute dtype (``T D x a``);
    * attention: ``q``, ``k``, the scaled ``q`` and the heads' output (``4 T H K x a``); the
      causal mask (1 byte), the masked scores and their ``exp`` in fp32 and the probabilities
      in the compute dtype (``H T T x (1 + 8 + a)``);
    * the tanh-GELU MLP: the hidden layer and the 5 intermediates of the GELU (``6 T M x a``);
    * the stacked ``q k v`` weight (``3 D H K x a``, not per row).

    Checked against ``saved_residuals`` of the ``small`` preset's block (fp32 and bf16: equal
    to the byte, the ``[T, 1]`` statistics aside). Since the block runs the GELU in fp32
    between its bf16 matmuls (2026-12-02), bf16's jaxpr saves the 5 GELU intermediates in fp32:
    ``5 T M x 2`` more than counted here (small preset, one row: 5.91 MB saved, 4.59 counted).
    Not changed yet: the planner's phases were fitted with this count, its remat-none ``stored``
    term already counts fp32 sizes, and the compiled steps' temporaries under remat ``full``
    did not move (XLA fuses those intermediates; issue 15).

    Example:
        >>> from meshpar.models import get_preset
        >>> gpt_layer_residual_bytes(get_preset("tiny"), rows=1, seq_len=32)
        397312.0
    """
    t, d, a = seq_len, config.d_model, itemsize
    h, k, m = config.heads / tensor, config.head_size, config.mlp_dim / tensor
    per_row = (2 * (3 * t * d * 4 + t * d * a) + 4 * t * h * k * a + h * t * t * (9 + a)
               + 6 * t * m * a)
    return float(rows * per_row + 3 * d * h * k * a)


def gpt_local_param_bytes(config: Any, /, *, tensor: int = 1, pipe: int = 1) -> float:
    """fp32 bytes of the GPT parameters one device holds before ZeRO: the blocks' matmul
    weights and ``b_in`` split by ``tensor``, the layers by ``pipe``, the token embedding by
    ``tensor`` (vocab), the rest (positions, LayerNorms, ``b_out``) whole.

    Example:
        >>> from meshpar.models import get_preset
        >>> gpt_local_param_bytes(get_preset("tiny")) == 4 * get_preset("tiny").param_count()
        True
    """
    d = config.d_model
    embed = config.vocab_size * d / tensor + config.seq_len * d + 2 * d
    if not config.tie_embeddings:
        embed += config.vocab_size * d / tensor
    return 4.0 * embed + config.layers / pipe * _block_param_bytes(config, tensor)


def _block_param_bytes(config: Any, tensor: int) -> float:
    """fp32 bytes of one block's parameters on a device (matmul weights and ``b_in`` split by
    ``tensor``; the LayerNorms and ``b_out`` whole)."""
    d, h, k, m = config.d_model, config.heads, config.head_size, config.mlp_dim
    return 4.0 * ((4 * d * h * k + 2 * d * m + m) / tensor + 5 * d)


def gpt_step_memory_bytes(config: Any, /, *, rows: int, seq_len: int, grad_local: float,
                          grad_kept: float, tensor: int = 1, pipe: int = 1, fsdp: int = 1,
                          zero_stage: int = 0, microbatches: int = 1,
                          schedule: Schedule | str = Schedule.GPIPE,
                          repeats: int = 1, activation_slots: int | None = None,
                          residual_slots: int = 0,
                          precision: str = "fp32") -> dict[str, float]:
    """Per-device bytes a compiled GPT train step holds at its peak beyond the state
    (parameters, the kept gradient ``grad_kept`` and the optimizer state) and the batch.

    ``rows`` is the per-device rows of the whole step, ``grad_local`` the fp32 gradient one device
    builds before any ZeRO reduction (:func:`gpt_local_param_bytes`), ``grad_kept`` what the
    state keeps of it (sharded from ZeRO-2), ``activation_slots`` a pipeline's stage
    activations per device (:attr:`meshpar.parallel.schedule.PipelineConfig.activation_slots`),
    ``residual_slots`` the chunk forwards whose residuals a 1F1B pipeline without stage remat
    keeps (``res_slots`` of :class:`meshpar.parallel.schedule.OneFOneBTable`).
    Each term is one mechanism of the compiled program (measured on the ``small`` and ``tiny``
    presets, 8 emulated devices, ``memory_analysis`` and XLA's buffer-assignment dumps); the
    step's temporaries are the largest of three phases: the backward pass, the gradient
    reduction + update, and (ZeRO-2 with ``tensor``) the reduce-scatter of tensor-split
    gradients:

    * ``grads``: the whole local gradient, built before it is reduced (ZeRO-2 scatters it
      after the backward pass; ZeRO-3 reduce-scatters each layer's inside the layer loop; a
      ZeRO-3 pipeline's iteration: one chunk's shard beside the embedding's whole gradient;
      an interleaved 1F1B tick with ``fsdp``: one chunk's, whole);
    * ``accumulator``: with microbatches, the sum of the earlier microbatches' gradients
      beside the current one's (ZeRO-2: the shard); a pipeline's loop carry of the stage's
      layer gradients, in the compute dtype, whole (ZeRO-3: the shard);
    * ``reduced``: the reduction's result, a new buffer beside its input (all-reduce: the whole
      gradient; reduce-scatter: the shard) (``data=8``, 1 row: the peak is exactly 2 gradients);
    * ``bf16_params``: the bf16 copy of the parameters the step computes with;
    * ``saved``: what the backward pass needs of the forward: remat ``full`` each layer's input
      ``[rows, T, D]`` (in float32, whatever the compute dtype); remat ``none`` every layer's
      autodiff residuals (:func:`gpt_layer_residual_bytes`) and a copy of the stacked weights
      the layer scan saves with them; a pipeline one stage input per activation slot (and,
      GPipe and circular, the stage's weights among its ``lax.cond``'s outputs from two
      layers a stage (interleaved 1F1B with ``fsdp``: a copy of them in its chunk-major
      layout), and in bf16 the stage inputs in float32 (beside the bf16 slots from two layers
      a chunk, in their stead at one) and, from two layers a chunk, float32 copies of the
      weights (ZeRO-3: the shards, except 1F1B's, converted after the gather); 1F1B, its
      blocks of the stack's boundary values and the messages its permutes carry);
    * ``working``: what the stack's backward pass holds of one layer or chunk: one layer's
      recompute and backward pass at its peak, the MLP's backward or the LayerNorms' (remat
      full, and the last layer of a 1F1B tick's ``vjp``; a GPipe or circular chunk's
      recompute also saves its layers' inputs); a rematerialised pipeline chunk under remat
      none, its layers' stacked residuals and the last layer's intermediates in flight;
    * ``head``: the fp32 logits ``[rows, T, V/t]``, their log-softmax and their gradient, or
      in a pipeline the final LayerNorm's backward (five float32 ``[rows, T, D]``) where
      larger. The
      head's backward runs before the stack's and its buffers are dead by then, so the
      backward phase holds the larger of ``working`` and ``head``, not both (``pipe=2``,
      ``fsdp=4``, tiny: no logits live at the peak inside the pipeline's backward loop); a
      pipeline's head phase holds no gradient of the stack (``grads`` less the stack's);
    * ``zero3``: ZeRO-3's gathered weights of the layer in use and its whole gradient (in a
      GPipe or circular stage in the compute dtype; in a pipeline under a layer remat, one of
      the two; in bf16 with microbatches, the gathered bf16 layer, the float32 copies the
      accumulation loop keeps, and the larger of the recompute and the layer's gradient
      assembled twice in float32);
    * ``tensor_gather``: ZeRO-2 with ``tensor``: the local gradient gathered over ``tensor``
      before GSPMD reduce-scatters it over ``fsdp`` (in bf16 beside a float32 copy of the
      weights);
    * ``slices``: remat none, the backward layer loop's copies of one layer's residuals sliced
      out of the stacks and their cotangents, beside the stacks (in [T, D] buffers a
      microbatch, measured: outside a pipeline with ``tensor``; a GPipe or circular chunk of
      two layers or more);
    * ``fusible`` (not in ``temp``): bytes counted above that XLA may fuse away, the in-flight
      intermediates of a rematerialised remat-none chunk; the planner's pre-filter holds the
      estimate less these against the budget, so that it rejects no layout that fits for
      their sake.

    XLA packs its temporary allocation tightly: at its busiest program point the values live
    fill 98-100% of it (five dumps, tiny to 20m, pipelined and not). That point is not the
    one the live-range dump marks "(peak)"; read from the marked one, the allocation seemed
    8-30% larger than the bytes live. What the terms miss is buffers, not packing.

    Example:
        >>> from meshpar.models import get_preset
        >>> cfg = get_preset("small")
        >>> gpt_step_memory_bytes(cfg, rows=4, seq_len=128, grad_local=13015040.0,
        ...                       grad_kept=13015040.0)["total"] > 0
        True
    """
    a = 2 if precision == "bf16" else 4
    micro = rows // microbatches
    t, d, v = seq_len, config.d_model, config.vocab_size
    h, m = config.heads / tensor, config.mlp_dim / tensor
    layers = config.layers // pipe
    residuals = gpt_layer_residual_bytes(config, rows=micro, seq_len=t, tensor=tensor, itemsize=a)
    carry = micro * t * d * a
    block = _block_param_bytes(config, tensor)
    # Weights the step computes with, in the compute dtype: the layer scan (remat none) and a
    # GPipe or circular pipeline stage's backward keep them among their residuals.
    layer_weights = layers * block / 4 * a
    zero3 = zero_stage >= 3 and fsdp > 1
    # What a device holds of them: the ZeRO-3 shard (the stages gather a layer at a time).
    stage_weights = layer_weights / (fsdp if zero3 else 1)
    # An iteration runs one chunk of the stage: layers / repeats of them (circular and
    # interleaved schedules).
    chunk = max(1, layers // max(1, repeats))
    chunk_weights = layer_weights * chunk / layers
    # The float32 bytes of the weights outside the stack (embeddings, the final LayerNorm).
    outside = grad_local - layers * block
    one_f_one_b = Schedule(schedule).one_f_one_b
    out: dict[str, float] = {"fusible": 0.0, "slices": 0.0}
    # ZeRO-3 reduce-scatters each layer's gradient inside the backward layer loop (fsdp=8: the
    # 1-row peak is the shards plus one layer's gradient and weights); the others build the whole
    # local gradient first (ZeRO-2: fsdp=8's peak equals ZeRO-1's).
    out["grads"] = grad_local / fsdp if zero3 else grad_local
    # Gradient accumulation over microbatches keeps the earlier microbatches' sum beside the
    # current one's: whole under DP and ZeRO-1; ZeRO-2 reduce-scatters each microbatch's
    # gradient into a sharded accumulator (meshpar.train.paths; fsdp=8, z2, mb2, bf16, small:
    # counting it whole put the formula 1.21x over memory_analysis).
    if microbatches == 1:
        out["accumulator"] = 0.0
    elif zero_stage >= 2 and fsdp > 1:
        out["accumulator"] = grad_local / fsdp
    else:
        out["accumulator"] = out["grads"]
    if pipe > 1:
        # A pipeline's microbatches are not an accumulation loop: the transpose of its loop
        # carries the sum of the stage's layer gradients, in the compute dtype (the weights
        # enter the loop converted), beside the current iteration's (``grads``); the
        # embedding's gradient is not in the carry (pipe=2, data=4, small, fp32: the carry is
        # the stage's 6 MiB; pipe=2, fsdp=4, tiny, bf16: the carry's buffers are bf16; counting
        # the whole fp32 gradient put the tiny pipelines 1.19-1.35x over). Whole below ZeRO-3
        # (fsdp is manual inside the stages: the gradients are reduced after the loop); under
        # ZeRO-3 the shard (pipe=2, data=2, fsdp=2, z3, circular x2, small: f32[2, 1, 128,
        # 1024] ... carried, half of w_in's [2, 1, 256, 1024]).
        out["accumulator"] = stage_weights
        if zero3:
            # ZeRO-3 reduce-scatters each layer's gradient as its backward pass ends, so the
            # current iteration holds one chunk's shard (the cond's outputs), beside the
            # embedding's and the head's whole gradient (same layout: one layer's shards, and
            # f32[256, 256], the vocabulary's; the ZeRO-3 shard of the whole local gradient put
            # the small preset's ZeRO-3 pipelines 1.08-1.11x over).
            out["grads"] = outside + chunk * block / fsdp
    if pipe > 1 and not zero3 and one_f_one_b and repeats > 1 and fsdp > 1:
        # The interleaved 1F1B schedule with fsdp keeps its gradient carry in the chunk-major
        # layout (``saved``'s copy of the stage's weights, below): a tick's vjp returns one
        # chunk's gradient, added in, not the stage's (pipe=2, fsdp=4, z2, mb8, interleaved x 2,
        # remat full, small: at the peak, beside the f32[2, 1, 256, 1024] ... carry, one
        # layer's gradient in the making; the stage's counted, 1.15x of memory_analysis, 1.05x
        # so; the 10 other such layouts 0.92-1.02x). With data alone the whole stage's is live
        # (pipe=2, data=2, tensor=2, mb8, interleaved x 2, tiny at 4 layers: 0.88x so).
        out["grads"] = outside + chunk * block
    out["reduced"] = grad_local if zero_stage <= 1 or fsdp == 1 else grad_local / fsdp
    out["bf16_params"] = grad_local / 2 / (fsdp if zero3 else 1) if a == 2 else 0.0
    if pipe > 1 and a == 2 and not zero3 and not one_f_one_b:
        # Below ZeRO-3 a GPipe or circular loop takes the stage's weights in float32 and
        # converts one layer at a time inside (pipe=2, data=2, fsdp=2, z2, mb4, circular x2,
        # remat none, small: f32[2, 1, 256, 1024] ... into the loop, bf16[1, 256, 1024] ...
        # converted in it): no bf16 copy of the stage, only of the weights outside the stack.
        # With the stage's copy counted, 11 of 36 bf16 GPipe and circular layouts below ZeRO-3
        # (tiny, small, 20m) were 1.10-1.16x of memory_analysis.
        out["bf16_params"] = outside / 2
    # One layer's recompute and backward pass are one XLA loop body (remat full, and the last
    # layer of a 1F1B tick's vjp), read from the buffers live at its peak: the attention's q,
    # k, v and heads' output (compute dtype), its scores and probabilities [H, T, T]
    # (float32), the stacked q k v weight, and [T, D] and [T, M] buffers (the LayerNorms'
    # residuals and cotangents, the layer's input, the hidden layer, its GELU and their
    # cotangents), whose count depends on the phase that peaks. ``phases`` holds each phase's
    # bytes per token of the [T, D] and the [T, M] ones:
    # * the MLP's backward: 8 [T, D] and 4 [T, M] in float32 (20m at 32 x 256, fsdp=8, z3:
    #   four f32[4, 256, 2048], seven [4, 256, 512] and the layer input; small, 1F1B, pipe=2,
    #   fsdp=2, tensor=2 the same); in bf16 4 + 6 bf16 and 3 + 1 bf16 (20m, fsdp=8, z3, bf16);
    # * the LayerNorms' backward: 8 [T, D] and 3 [T, M] (small, tensor=8, 24 rows); from 4096
    #   tokens a microbatch XLA:CPU runs their reductions as YNNPACK fusions with their inputs
    #   materialised, 11 (small, tensor=8, 32 rows: ``ynn_fusion`` reduce_sums f32[32, 128,
    #   256]; 20m: 3840 tokens 8, 4096 tokens 11); in bf16 6 + 5 bf16 and one [T, M], from
    #   4096 tokens 9 + 3 bf16 and 3.
    # The count this replaced (every residual, and the [T, M] and [H, T, T] cotangents as if
    # one phase held them all) was 15% over at tensor=1 and 20-30% under at tensor=8: 20m at
    # 32 x 256 came out 0.83-1.11x of memory_analysis, 0.94-1.03x with this (the 12 layouts of
    # benchmarks/bench_plan.py), small and 20m tensor=8 in bf16 0.71-0.85x, now 0.97-0.98x.
    ynn_reductions = micro * t >= 4096  # the LayerNorms' YNNPACK reductions (above)
    if a == 4:
        phases = ((32, 16), (44 if ynn_reductions else 32, 12))
    else:
        phases = ((28, 14), (42, 12) if ynn_reductions else (34, 4))
    one_layer = 3 * d * h * config.head_size * a + micro * t * (
        4 * h * config.head_size * a + 2 * h * t * 4 + max(pd * d + pm * m for pd, pm in phases))
    # Remat none keeps every layer's residuals as the layer scan's outputs: fp32-sized even in
    # bf16 (XLA:CPU normalises bf16 elementwise work to fp32; data=8, small, bf16: 6.1 MiB a
    # layer and row, as fp32's 6.1), with the scan's copy of the stacked weights.
    stored = gpt_layer_residual_bytes(config, rows=micro, seq_len=t, tensor=tensor, itemsize=4)
    if pipe > 1:
        # meshpar's pipeline rematerialises each stage iteration: its backward recomputes the
        # stage's layers under their own remat policy (pipe=2, data=4, small, 1-8 rows a
        # microbatch: one layer's residuals a row); the loop keeps
        # one stage input per activation slot (the stack's input and output are among them:
        # counting them again overshot pipe=2 by their size); the head runs on the whole batch
        # split over pipe (rows / pipe).
        slots = activation_slots if activation_slots is not None else 2 * microbatches + pipe - 1
        # GPipe and circular: autodiff through the loop's lax.cond keeps the stage's weights
        # among the recompute's outputs (a conditional's results are new buffers: pipe=2,
        # data=4, small, fp32: 6 MiB of weight-shaped cond outputs at the peak). The 1F1B
        # schedules take a jax.vjp inside the tick and return gradients only (pipe=4, 1f1b,
        # small: no such copy; counting it put the formula 1.15x over).
        # Not at one layer a stage: pipe=2, fsdp=4, z2, mb4, tiny, fp32 has no weight-shaped
        # buffer of the stage live at the peak (its weights are the parameters' own buffers),
        # and the bf16 z1 mb2 one only the step's bf16 copy (``bf16_params``) beside the bf16
        # gradient accumulators; with the copy counted the tiny preset's pipe=2 layouts came
        # out 1.10-1.16x over, and small's pipe=4 ones 1.08-1.15x.
        copied = not one_f_one_b and layers > 1
        # The interleaved 1F1B schedule with fsdp inside the stages copies the stage's
        # weights into its chunk-major layout (pipe=2, fsdp=2, tensor=2, z2, mb4, interleaved
        # x 2, small: f32[2, 1, 256, 512] ... twice beside the parameters, one of them the
        # gradient; without the copy 0.89x of memory_analysis, the interleaved layouts of the
        # development samples 0.86-1.0x, with it 0.94-1.04x). Not with data alone (pipe=2,
        # data=4, mb4, interleaved x 2, small, bf16: 1.10x with it counted, 1.03x without).
        copied = copied or (one_f_one_b and repeats > 1 and fsdp > 1)
        # (Under ZeRO-3 the weights are the stage's shards, and so is their copy: pipe=2, data=2,
        # fsdp=2, z3, circular x2, small: f32[2, 1, 128, 1024] ...)
        out["saved"] = slots * carry + (stage_weights if copied else 0.0)
        # A chunk's recompute under remat none stacks its layers' residuals (pipe=2, circular x2,
        # small: one layer's, the formula with the stage's two was 1.25-1.33 over
        # memory_analysis).
        if a == 2 and chunk > 1:
            # In bf16 XLA:CPU runs a chunk's layer scan on float32 copies (its bf16
            # normalisation), made once and live through the loop that runs it: the stage's
            # weights (pipe=2, data=4, mb8, small: f32[2, 256, 1024] ...; the tiny preset at 4
            # layers: f32[2, 64, 256] ...; the 1F1B loops too: pipe=2, data=2, fsdp=2, z3, mb2,
            # 1f1b, small) and, GPipe and circular, the loop's stage inputs (below). Without
            # them the small preset's pipe=2 bf16 pipelines were 0.80-0.96x of memory_analysis,
            # and tiny's at two layers a stage 0.88x. Under ZeRO-3, GPipe and circular convert
            # the stage's shards (pipe=2, fsdp=4, z3, mb2, 20m: f32[3, 128, 2048] ..., a quarter
            # of w_in's [3, 512, 2048]; counting the whole stage put the 20m ZeRO-3 GPipe layouts
            # 1.15-1.33x over); a 1F1B tick's vjp converts the gathered layers (pipe=2, fsdp=4,
            # z3, mb4, 1f1b, tiny at 4 layers: f32[2, 256, 64] ..., whole; 0.87x with the shards),
            # unless tensor splits them too: then it converts the shards (pipe=2, fsdp=2,
            # tensor=2, z3, mb4, 1f1b, small: f32[2, 128, 512] ..., half of w_in's [2, 256,
            # 512]; counted whole, the 20m preset's was 1.10x of memory_analysis, 0.98x so).
            gathered_f32 = one_f_one_b and tensor == 1
            out["saved"] += 2 * (layer_weights if gathered_f32 else stage_weights)
        if zero3 and not one_f_one_b and config.remat == "none":
            # Under remat none a GPipe or circular chunk's recompute returns its layers' residuals,
            # the gathered weights among them: the cond's outputs hold the chunk's layers whole
            # in the compute dtype, not the stage's shards, and in bf16 (from two layers a chunk)
            # float32 copies of them (pipe=2, fsdp=4, z3, mb8, small, bf16: bf16[2, 1024, 256]
            # ... and f32[2, 1024, 256] ... live through the backward iteration, w_in whole).
            # Counted as shards, the ZeRO-3 GPipe and circular remat-none layouts were 0.83-0.98x
            # of memory_analysis, with this 0.94-1.10x.
            out["saved"] += chunk_weights - (stage_weights if copied else 0.0)
            if a == 2 and chunk > 1:
                out["saved"] += 2 * (chunk_weights - stage_weights)
        if a == 2 and not one_f_one_b:
            # GPipe and circular in bf16 save the iterations' stage inputs in float32: from two
            # layers a chunk a copy beside the bf16 slots (f32[9, 1, 128, 256] at pipe=2,
            # data=4, mb8, small, two layers a chunk); at one layer a chunk in their stead
            # (pipe=2, tensor=4, mb4, circular x2, small: f32[9, 8, 128, 256] beside the M
            # buffer bf16[4, 8, 128, 256]: one bf16 set more than the slots count; without it
            # that layout was 0.88x of memory_analysis, the tiny preset's tensor=4 ones 0.90x).
            iterations = PipelineConfig(pipe, microbatches, schedule, repeats=repeats).iterations
            out["saved"] += iterations * carry * (2 if chunk > 1 else 1)
        # 1F1B without stage remat: each in-flight chunk forward's vjp residuals, its layers'
        # inputs (the layer scan's own remat) or all their residuals (remat none, in the
        # compute dtype: they are the vjp's own values); its weights are not copied. One more
        # set beside the slots: the forward tick's new one, its cond's outputs (remat none:
        # tiny pipe=2, data=4 0.82 of memory_analysis with the slots alone; small pipe=4,
        # fsdp=2, bf16 1.21 with two more sets, 1.08 with one). The dots policies also keep
        # each layer's saved matmul outputs in a set: not counted, the formula takes them as
        # full here as everywhere (the planner searches full and none).
        if one_f_one_b:
            # The backward loop's other carries (meshpar.parallel.onef1b): this stage's blocks
            # of the stack's input (overwritten by its gradient) and of the output's gradient,
            # ceil(M/P) microbatch activations each, and the five messages the two permutes
            # bring every tick (activation, gradient, and the xs, dys and dxs channels) (pipe=2,
            # tensor=4, mb4, 1f1b, tiny, bf16: 13 activation-sized carries in the loop at the
            # peak; 0.83x memory_analysis without these, 0.98x with).
            out["saved"] += (2 * -(-microbatches // pipe) + 5) * carry
        if residual_slots:
            # (Less the stacked q k v weight of gpt_layer_residual_bytes: made from the weights
            # alone, so recomputed, not kept: meshpar.parallel.residuals.)
            qkv = 3 * d * h * config.head_size * a
            # A set holds two float32 [H, T, T] arrays a row, not gpt_layer_residual_bytes'
            # mask and probabilities besides (pipe=2, data=4, mb4, 1f1b, remat none, small:
            # f32[2, 2, 2, 8, 128, 128] x 2 among the slots; with those counted the small
            # preset's fp32 1F1B remat-none layouts were 1.12-1.13x of memory_analysis).
            scores = micro * h * t * t * (1 + a)
            per_set = chunk * (residuals - qkv - scores if config.remat == "none" else carry)
            out["saved"] += (residual_slots + 1) * per_set
            # The backward tick's set read out of the slots, two sets' worth:
            # * bf16: XLA:CPU reads it as float32 (``convert`` then ``dynamic-slice``: its bf16
            #   normalisation), one set at twice the size (pipe=2, fsdp=4, mb2, 1f1b, remat
            #   none, tiny, bf16: 0.92 MB of f32 slices of the slots live in the tick at the
            #   peak; 0.78x without, 1.03x with; small, pipe=4, tensor=2, mb8, remat none:
            #   0.83x without, 1.06x with);
            # * fp32, from two layers a chunk: two copies of a set sliced out
            #   (``dynamic-slice``s of every stacked residual, live through the loop: pipe=2,
            #   data=2, tensor=2, mb8, remat none, small. Without them: 0.81x of
            #   memory_analysis there, 0.78-0.82x at tiny with 4 layers and 20m; with them
            #   1.11x, 1.02x and 0.98x. Under remat full the layer inputs the same way:
            #   pipe=2, fsdp=2, tensor=2, z1, mb2, small: f32[1, 2, 8, 128, 256] and f32[2, 8,
            #   128, 256] sliced out of the f32[2, 2, 8, 128, 256] slots; 0.90x without).
            # At one layer a chunk the fp32 program slices the two copies too (pipe=2, tensor=4,
            # mb4, 1f1b, remat none, tiny: f32[1, 1, 4, 32, 64] ... and f32[1, 4, 32, 64] ...),
            # but with both counted the formula was 1.17-1.26x of memory_analysis there, with
            # one 0.95-1.08x, with none 0.84-0.91x: the tick's working set (``one_layer``)
            # overlaps them; which buffers XLA shares was not traced.
            if a == 2 or chunk > 1:
                out["saved"] += 2 * per_set
            elif config.remat == "none":
                out["saved"] += per_set
        # While the recompute runs the chunk's last layer, that layer's widest intermediates,
        # the [H, T, T] scores and the [T, M] hidden, are live twice (computed, and their
        # elementwise successors) before they join the stack (pipe=2, data=4, small, fp32, 4
        # rows a microbatch: 10.5 MiB in flight beside the 50 MiB stack, this count 8). Float32
        # whatever the compute dtype from two layers a chunk (the chunk's layer scan runs on
        # float32 copies, above), in the compute dtype at one layer a chunk (counted at
        # float32's there, the bf16 remat-none GPipe and circular layouts were up to 1.12x of
        # memory_analysis; at the compute dtype's from two layers a chunk, down to 0.885x).
        in_flight = micro * t * (a if chunk == 1 else 4.0) * 2 * (h * t + m)
        if config.remat != "none":
            out["working"] = one_layer
            if not one_f_one_b:
                # GPipe and circular: the recompute's layer scan saves its layers' inputs, the
                # cond's first output (pipe=2, tensor=4, mb2, 20m at 32 x 256: f32[3, 16, 256,
                # 512], the chunk's three; 0.83x of memory_analysis without them). 1F1B's are in
                # its residual sets (``per_set``).
                out["working"] += chunk * carry
        elif one_f_one_b:
            # The 1F1B schedules take a jax.vjp of the chunk per backward tick: XLA runs the
            # last layer's forward and backward as one region, as under remat full, and keeps
            # only the earlier layers' residuals whole (pipe=4, 1f1b, remat none, small, one
            # layer a chunk: 8.8 MiB at the peak where the stacked count put 17).
            out["working"] = (chunk - 1) * stored + one_layer
            if a == 4 and chunk > 1:
                # In float32 from two layers a chunk the backward tick's vjp reads the earlier
                # layers' residuals from the set sliced out of the slots (counted in ``saved``),
                # not a whole copy of its own; what it holds beside the last layer's working set
                # is the chunk's weights twice, among its forward's outputs and sliced per layer
                # (20m, pipe=2, fsdp=4, z2, mb4, 1f1b, 16 x 128: f32[3, 512, 2048] ... among the
                # jvp while's outputs, f32[2048, 512] ... dynamic-slices; 32 x 256, data=2,
                # fsdp=2, mb2: the same weights, and 302 MiB of the forward's new set where the
                # count above put 277 more). With the layers' residuals counted, the 20m
                # layouts at 32 x 256 and 2 microbatches were 1.11-1.13x of memory_analysis,
                # 0.98-0.99x so.
                out["working"] = one_layer + 2 * chunk_weights
        else:
            out["working"] = chunk * stored + in_flight
            if chunk > 1:
                # The chunk's backward layer loop, beside the stacks: the layer's residuals
                # sliced out of them (``dynamic-slice`` copies) and their cotangents, about 8
                # float32 [T, D] buffers a microbatch, 10 in bf16 (its float32 reads) (pipe=2,
                # tensor=4, mb2, small, bf16: five f32[1, 16, 128, 256] slices, four [16, 128,
                # 256] cotangents and the scores' at the peak). Without them the pipe=2 GPipe
                # remat-none layouts of the small and 20m presets were 0.80-1.01x of
                # memory_analysis, the furthest at the widest microbatches (0.80x at 4096
                # tokens), with them 0.97-1.05x.
                out["slices"] = (10 if a == 2 else 8) * micro * t * d * 4.0
            # XLA fuses part of the in-flight intermediates where the tensors are small (the
            # tiny preset: pipe=2, data=2, tensor=2, mb4, bf16 came out 1.12x over with them,
            # 1.04x without): the pre-filter's floor leaves them out.
            out["fusible"] = in_flight
        head_rows = rows / pipe
    elif config.remat == "none":
        # In bf16 with microbatches the stacked weights the layer scan saves are a float32
        # copy (made once before the accumulation loop, live through it: fsdp=4, tensor=2, z1,
        # mb2, tiny: f32[2, 64, 128] ...), not the bf16 copy one microbatch saves (data=8,
        # tiny: bf16[2, 64, 256] ...); counted in bf16 the microbatched bf16 layouts were
        # 0.88-0.95x of memory_analysis, 0.93-1.02x in float32 (tiny, small and 20m).
        f32_weights = a == 2 and microbatches > 1
        out["saved"] = layers * stored + layer_weights * (2 if f32_weights else 1)
        out["working"] = 0.0
        head_rows = micro
        # The step's peak is the backward layer loop's first iterations: beside the stacks, the
        # layer's residuals sliced out of them (``dynamic-slice`` copies) and their cotangents,
        # [T, D] buffers whatever the tensor split. With tensor parallelism memory_analysis
        # exceeds the terms above by about six float32 [T, D] buffers a microbatch, four in
        # bf16 from tensor=4 (fsdp=2, tensor=4, z3, tiny: four f32[1, 8, 32, 64] slices, three
        # more dynamic-slices and the cotangents; data=2, tensor=4: 6-8 buffers short in
        # float32 at the tiny, small and 20m presets, 4-6 in bf16 except 20m's 0; tensor=2: 6-8
        # in float32, 0-1.6 in bf16). At tensor=1 the count above needs none (not traced).
        # Without them these layouts were 0.84-1.00x of memory_analysis, with them 0.96-1.03x
        # (24 layouts of the three presets), and 0.96-1.03x on 14 not used to fit the count
        # (small at 16 x 256 with tensor=8, 20m at 32 x 256).
        if tensor > 1 and (a == 4 or tensor >= 4):
            out["slices"] = (6 if a == 4 else 4) * micro * t * d * 4.0
    else:
        # Each layer's input, float32 whatever the compute dtype: XLA:CPU converts the bf16
        # stack the forward scan saved before the backward loop reads it (20m, fsdp=8, z3,
        # bf16: f32[6, 4, 256, 512]; small, tensor=8, bf16: f32[4, 32, 128, 256]).
        out["saved"] = layers * micro * t * d * 4.0
        if a == 2 and microbatches > 1 and zero_stage == 2 and fsdp > 1:
            # In bf16 with microbatches the layer scan computes with a float32 copy of the
            # stack's bf16-rounded weights, made before the accumulation loop and live through
            # it, not with the bf16 copy ``bf16_params`` counts (20m at 32 x 256: f32[6, 512,
            # 2048] ... ``convert_convert``, 72 MiB). Below ZeRO-2 the microbatch's stack
            # gradient is bf16 in its stead (fsdp=8, z1, mb2: bf16[6, 512, 2048] ..., 36 MiB),
            # which ``grads`` counts in float32: the two cancel (0.98-0.99x of memory_analysis
            # on six layouts). ZeRO-2 reduce-scatters each microbatch's gradient and converts
            # it to float32 (transposed) for that, beside its bf16 pieces (data=2, fsdp=4, z2,
            # mb4: f32[512, 6, 2048] ... beside bf16[6, 2048, 512] ...), so the copy counts:
            # these layouts were 0.89-0.96x without it, 1.01-1.10x with it.
            out["saved"] += layers * block / 2
        out["working"] = one_layer
        head_rows = micro
    # The fp32 logits [rows, T, V/t], their log-softmax and their gradient. In a pipeline,
    # whose head runs on all the microbatches at once in a phase of its own, after them the
    # final LayerNorm's backward, five float32 [rows, T, D] buffers (its residuals and
    # cotangents), the larger where V/t is under 5/3 of D (pipe=2, tensor=4, mb8, 1f1b, tiny,
    # bf16: five f32[8, 32, 64] at the peak, the logits dead; 0.885x of memory_analysis with
    # the logits alone, 0.975x so). Not without a pipeline: there the head's buffers overlap
    # the stack's backward (small and 20m at tensor=4 and 8, remat none: 1.02-1.07x with the
    # LayerNorm's counted, 0.96-1.03x without).
    final_norm = 5 * d if pipe > 1 else 0
    out["head"] = head_rows * t * 4.0 * max(3 * v / tensor, final_norm)
    if zero3:
        # The layer in use gathered and its whole gradient. The weights outside the stack,
        # gathered once for the step, are not added: with them fsdp=8 (small) and the tiny
        # preset's ZeRO-3 layouts came out further above memory_analysis (XLA overlaps them
        # with buffers this count already has).
        out["zero3"] = zero3_working_bytes(block, fsdp=fsdp)
        if pipe == 1 and tensor > 1:
            # With tensor parallelism the layer's gathered buffer is dead at the peak, only the
            # weights copied out of it live, and its gradient not yet whole (fsdp=4, tensor=2,
            # z3, tiny and 20m: the slices of w_in, q k v and w_o, 0.65 of the tensor shard
            # of a layer; 1.03-1.06x of memory_analysis counted at 0.75 of the two, 1.10-1.11x
            # at both); with microbatches more of it (fsdp=4, tensor=2, z3, mb4, tiny: 0.98x
            # at 0.75, 0.93x at 0.5). (fsdp=8, z3, 20m: the gathered f32[8, 393792] and its
            # slices, both counted.)
            out["zero3"] *= 0.75
        elif pipe == 1 and a == 2 and microbatches > 1 and config.remat != "none":
            # In bf16 with microbatches the accumulation loop holds, beside its accumulator:
            # the layer gathered in bf16 (``u16[8, 393792]``, 20m, fsdp=8, z3, mb2), a float32
            # copy of the stack's shards made before the loop (f32[6, 64, 2048] ...), the
            # weights outside the stack gathered in float32 with a float32 and a bf16 copy
            # beside them (f32[256, 512] x 2, bf16[256, 512] x 2), and no gradient shards of
            # the microbatch apart from the accumulator (``grads`` taken back). Its peak is
            # the larger of the layer's recompute (``working``) and the layer's gradient
            # assembled for its reduce-scatter, twice in float32 (pieces and their
            # concatenation f32[8, 393792]); 20m and tiny peak there, small in the recompute.
            # Counted as the gathered float32 layer and its gradient, tiny's layouts were 0.89x
            # of memory_analysis and small's 1.08x; with this 0.96-1.01x, and 0.97-1.00x on 7
            # held out (data=4, fsdp=2, mb2; mb4; 20m at 32 x 256; 0.87-1.09x before).
            out["zero3"] = (block / 2 + layers * block / fsdp + 3 * outside
                            + max(0.0, 2 * block - out["working"]) - out["grads"])
        if pipe > 1:
            # Inside a GPipe or circular stage the gathers are of the weights in the compute
            # dtype (they enter the loop converted: pipe=2, fsdp=4, z3, mb2, tiny, bf16:
            # bf16[192, 64] ... gathered; a 1F1B tick gathers float32 and converts after:
            # pipe=2, fsdp=4, z3, mb8, interleaved-1f1b x2, small, bf16: f32[256, 1024] ...,
            # 0.86x counted in bf16), and under a layer remat the layer's gathered weights and
            # its whole gradient are not live together: the recompute's peak holds the gathered
            # weights (pipe=2, data=2, fsdp=2, z3, circular x2, small: f32[256, 1024], no
            # weight-sized gradient), the backward's the whole gradient (pipe=2, fsdp=4, z3, mb4,
            # tiny, fp32: f32[256, 64] x 2, w_in's and w_out's, gathered copies of them dead).
            # Both counted, the ZeRO-3 pipelines with remat full were 1.06-1.19x of
            # memory_analysis, one of them above the pre-filter's slack; remat none keeps both
            # (0.84-0.89x with one).
            dtype = 1.0 if one_f_one_b else a / 4
            out["zero3"] *= dtype / (1 if config.remat == "none" else 2)
    else:
        out["zero3"] = 0.0
    # The head's backward runs before the stack's and its logits are dead by the time the
    # stack's working set is live: the larger of the two, not their sum (pipe=2, fsdp=4, tiny:
    # no logits among the buffers live at the peak inside the pipeline's backward loop).
    # A pipeline runs the head between its forward and backward loops, before the stack has a
    # gradient: its phase holds the gradients outside the stack only, beside the loop carry's
    # zeros (``accumulator``) (pipe=2, fsdp=2, tensor=2, z2, mb8, 1f1b, tiny, bf16: the peak is
    # the head's forward, f32[128, 128] logits and their exp, no layer gradient; 1.108x of
    # memory_analysis with the stack's counted, 1.05x so). Without a pipeline the stack's are
    # counted in both phases: dropping them there put tiny's remat-none layouts at 0.88-0.89x
    # (which buffers XLA allocates early was not traced).
    head_grads = outside if pipe > 1 else out["grads"]
    backward = (out["accumulator"] + out["bf16_params"] + out["saved"] + out["zero3"]
                + out["slices"] + max(out["grads"] + out["working"], head_grads + out["head"]))
    # The update phase: the activations are gone, the bf16 copy too (data=8, 1 row, bf16: the
    # peak is the 2 gradients, as in fp32).
    update = out["grads"] + out["reduced"]
    # ZeRO-2 over fsdp with tensor parallel: GSPMD reduce-scatters a tensor-split gradient over
    # fsdp only after gathering it over tensor, so each microbatch's reduction holds the local
    # gradient whole over tensor beside its input and the accumulator (fsdp=2, tensor=4, z2,
    # mb4, tiny: all-gathers f32[64,2,256] before the reduce-scatters, 0.5 MiB live for a
    # 0.12 MiB local gradient; the formula was 0.86x of memory_analysis without them).
    out["tensor_gather"] = grad_local * tensor if (zero_stage == 2 and fsdp > 1 and tensor > 1
                                                   and pipe == 1) else 0.0
    gather_phase = out["grads"] + out["accumulator"] + out["tensor_gather"]
    if out["tensor_gather"] and a == 2:
        # In bf16 XLA:CPU keeps a float32 copy of the (bf16-rounded) weights the step computes
        # with through the reduction (fsdp=2, tensor=4, z2, mb2, bf16, 20m at 32 x 256:
        # f32[6, 512, 512] ... ``convert_convert`` beside the gathered f32[512, 6, 2048]
        # gradients; 0.89x of memory_analysis without it, 0.93x with).
        gather_phase += 2 * out["bf16_params"]
    out["temp"] = max(backward, update, gather_phase)
    out["total"] = out["temp"] - grad_kept
    return out
