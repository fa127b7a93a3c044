"""Text from a trained language model, on any mesh: greedy or sampled, token by token.

There is no KV cache: each new token re-runs the whole forward pass on a fixed window of
``seq_len`` tokens (the prompt and what was written so far, the last ``seq_len`` of them, padded
on the right; causal attention keeps the padding out of the position read). One program is
compiled for all steps, and it is the trainer's own forward layout (any mesh, ZeRO-3, tensor
parallel, bf16). A cache would need a second forward path through the GPT's scanned layer
stack (``scan_layers``, and pipeline stages on a ``pipe`` axis) carrying per-layer key/value
state, sharded like the activations; for the short models meshpar trains the recomputation
costs ``max_tokens`` forward passes of one ``seq_len`` window, which is what this module pays.

The window is repeated over the smallest number of rows the mesh's batch axes accept (the same
prompt in each, row 0 is read), so sampling runs on the same mesh as training.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from meshpar.errors import StrategyError, UsageError
from meshpar.train.trainer import Trainer


def _next_logits(model, batch):
    logits_BTV = model(batch["tokens"])
    rows = jnp.arange(logits_BTV.shape[0])
    return logits_BTV[rows, batch["position"]].astype(jnp.float32)


def _rows_for(trainer: Trainer) -> int:
    for rows in range(1, 4097):
        try:
            trainer.check_batch(rows)
        except StrategyError:
            continue
        return rows
    raise StrategyError("no batch of up to 4096 rows divides over this mesh's batch axes")


def choose_token(logits: np.ndarray, *, temperature: float, top_k: int | None,
                 rng: np.random.Generator) -> int:
    """One token id from ``logits[V]``: the argmax at ``temperature == 0``, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest (all if ``None``).

    Example:
        >>> choose_token(np.array([0.0, 3.0, 1.0]), temperature=0, top_k=None,
        ...              rng=np.random.default_rng(0))
        1
    """
    if temperature == 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, np.float64) / temperature
    if top_k is not None and top_k < len(z):
        cutoff = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cutoff, z, -np.inf)
    p = np.exp(z - z.max())
    return int(rng.choice(len(z), p=p / p.sum()))


def generate(trainer: Trainer, prompt: Sequence[int], *, max_tokens: int, seq_len: int,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             local_rows=None) -> list[int]:
    """``max_tokens`` new token ids after ``prompt`` from the trainer's model.

    Args:
        trainer: holds the model (e.g. restored from a checkpoint) and its mesh.
        prompt: token ids, at least one.
        max_tokens: how many to write.
        seq_len: the model's window; the context is the last ``seq_len`` tokens.
        temperature: 0 for greedy decoding (deterministic), > 0 to sample.
        top_k: sample among the ``top_k`` most likely tokens only.
        seed: the sampling seed (unused at temperature 0).
        local_rows: in a multi-process job, the function that cuts a global batch to this
            process's rows (every process then gets the same tokens).

    Returns:
        The new token ids.

    Raises:
        UsageError: an empty prompt, ``max_tokens < 0``, ``temperature < 0`` or ``top_k < 1``.

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> from meshpar.mesh import make_mesh
        >>> from meshpar.models import GPT, get_preset, lm_loss
        >>> from meshpar.train import Trainer
        >>> from meshpar.train.tokenizer import Tokenizer
        >>> trainer = Trainer(lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0)),
        ...                   optax.adamw(3e-4), lm_loss, mesh=make_mesh(data=8))
        >>> tokenizer = Tokenizer()                        # bytes
        >>> ids = generate(trainer, tokenizer.encode("def "), max_tokens=8, seq_len=32)
        >>> len(ids), all(0 <= i < 256 for i in ids)
        (8, True)
        >>> generate(trainer, tokenizer.encode("def "), max_tokens=8, seq_len=32) == ids  # greedy
        True
    """
    if len(prompt) == 0:
        raise UsageError("--prompt is empty: the model needs at least one token to continue")
    if max_tokens < 0:
        raise UsageError(f"--max-tokens {max_tokens}: must be >= 0")
    if not temperature >= 0:
        raise UsageError(f"--temperature {temperature}: must be >= 0 (0: greedy)")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k {top_k}: must be >= 1")
    rows = _rows_for(trainer)
    rng = np.random.default_rng(seed)
    tokens = [int(t) for t in prompt]
    out = []
    for _ in range(max_tokens):
        context = tokens[-seq_len:]
        window = np.zeros((rows, seq_len), np.int32)
        window[:, :len(context)] = context
        batch = {"tokens": window, "position": np.full((rows,), len(context) - 1, np.int32)}
        if local_rows is not None:
            batch = local_rows(batch)
        logits = trainer.evaluate(_next_logits, batch)[0]
        token = choose_token(logits, temperature=temperature, top_k=top_k, rng=rng)
        tokens.append(token)
        out.append(token)
    return out
