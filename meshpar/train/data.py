"""A small built-in byte-level corpus and a resumable batch source over it.

meshpar's examples, tests and benchmarks need real text without a download. Python ships one:
``pydoc_data.topics.topics``, the text of the language reference topics that ``help()`` shows
(about 0.5 MB of English prose and code). Bytes are the tokens (vocabulary 256), so no tokenizer
is needed either.

:class:`TokenBatches` makes each batch a pure function of ``(seed, step)``. The data-iterator
position is then just the step number: resuming a run at step ``s`` reproduces exactly the
batches it would have seen, and a checkpoint needs no iterator state.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

from meshpar.errors import MeshparError, is_int

#: Byte-level tokens: every byte value is a token.
VOCAB_SIZE = 256


@functools.lru_cache(maxsize=1)
def _corpus_bytes() -> bytes:
    from pydoc_data.topics import topics  # lazy: a large module, read only to build the corpus

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def load_corpus() -> np.ndarray:
    """The built-in corpus as byte tokens.

    The values of ``pydoc_data.topics.topics`` in sorted-key order, joined by ``"\\n\\n"`` and
    encoded as UTF-8. The text is read once per process and cached.

    Returns:
        A read-only ``uint8`` array of shape ``[N]`` (N is about 466,000 on CPython 3.11; it
        varies a little between Python versions).

    Example:
        >>> tokens = load_corpus()
        >>> tokens.dtype, tokens.ndim
        (dtype('uint8'), 1)
        >>> bytes(tokens[:22]).decode()   # the reference's topics, "assert" first
        'The "assert" statement'
    """
    array = np.frombuffer(_corpus_bytes(), dtype=np.uint8)
    array.flags.writeable = False  # frombuffer over bytes is read-only already; be explicit
    return array


def unigram_entropy(tokens: np.ndarray, /) -> float:
    """The entropy of the empirical unigram (byte) distribution of ``tokens``, in nats.

    This is the loss a model reaches by learning only token frequencies: a useful yardstick for a
    language model's first steps (``ln 256 ≈ 5.55`` nats is the loss of a uniform guess).

    Args:
        tokens: a 1-D (or any shape) array of non-negative integer tokens.

    Returns:
        ``-sum(p * ln p)`` over the tokens that occur.

    Raises:
        MeshparError: ``tokens`` is empty or not of an integer dtype.

    Example:
        >>> round(unigram_entropy(np.array([0, 1, 0, 1])), 4)   # ln 2
        0.6931
        >>> 3.0 < unigram_entropy(load_corpus()) < 3.6
        True
    """
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        raise MeshparError("unigram_entropy: tokens is empty")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise MeshparError(f"unigram_entropy: tokens must be integers, got dtype {tokens.dtype}")
    counts = np.bincount(tokens.ravel().astype(np.int64))
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


@dataclasses.dataclass(frozen=True)
class TokenBatches:
    """Random windows of the built-in corpus, one batch per step, reproducible from the step.

    Each row of a batch is a window of ``seq_len + 1`` consecutive corpus bytes starting at an
    offset drawn with ``np.random.default_rng((seed, step))``; ``inputs`` is the window without its
    last byte and ``targets`` the window without its first (next-byte prediction).

    Attributes:
        batch_size: rows per batch (the global batch; meshpar shards it over the mesh).
        seq_len: tokens per row.
        seed: selects the sequence of batches.

    Raises:
        MeshparError: ``batch_size < 1``, ``seq_len < 1``, or ``seq_len`` too long for the corpus.

    Example:
        >>> data = TokenBatches(batch_size=8, seq_len=32, seed=0)
        >>> batch = data.batch(0)
        >>> batch["inputs"].shape, batch["inputs"].dtype
        ((8, 32), dtype('int32'))
        >>> bool((data.batch(5)["inputs"] == data.batch(5)["inputs"]).all())   # pure in step
        True
        >>> for step, batch in data.iterate(start_step=100):   # resume at step 100
        ...     break
    """

    batch_size: int
    seq_len: int
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("batch_size", "seq_len", "seed"):
            value = getattr(self, field)
            if not is_int(value):
                raise MeshparError(f"TokenBatches: {field}={value!r} must be an int")
        if self.batch_size < 1:
            raise MeshparError(f"TokenBatches: batch_size={self.batch_size} must be >= 1")
        if self.seq_len < 1:
            raise MeshparError(f"TokenBatches: seq_len={self.seq_len} must be >= 1")
        if self.seed < 0:
            raise MeshparError(f"TokenBatches: seed={self.seed} must be >= 0")
        corpus_len = len(load_corpus())
        if self.seq_len >= corpus_len:
            raise MeshparError(
                f"TokenBatches: seq_len={self.seq_len} must be smaller than the corpus, which has "
                f"{corpus_len} tokens (each row needs seq_len + 1 consecutive tokens)"
            )

    def batch(self, step: int, /) -> dict[str, np.ndarray]:
        """The batch of ``step``: a pure function of ``(seed, step)``.

        Args:
            step: the training step (>= 0).

        Returns:
            ``{"inputs": int32[batch_size, seq_len], "targets": int32[batch_size, seq_len]}``
            with ``targets[:, t] == inputs[:, t + 1]`` for ``t < seq_len - 1``.

        Raises:
            MeshparError: a negative or non-integer step.

        Example:
            >>> b = TokenBatches(batch_size=2, seq_len=16, seed=1).batch(3)
            >>> bool((b["targets"][:, :-1] == b["inputs"][:, 1:]).all())
            True
        """
        if not is_int(step, minimum=0):
            raise MeshparError(f"TokenBatches.batch: step={step!r} must be an int >= 0")
        corpus = load_corpus()
        rng = np.random.default_rng((self.seed, int(step)))
        starts = rng.integers(0, len(corpus) - self.seq_len, size=self.batch_size)
        windows = corpus[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

    def iterate(self, start_step: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Endless ``(step, batch)`` pairs from ``start_step`` on.

        Args:
            start_step: the first step; pass the restored step to resume exactly.

        Yields:
            ``(step, self.batch(step))`` for ``step = start_step, start_step + 1, ...``.

        Example:
            >>> it = TokenBatches(batch_size=2, seq_len=8).iterate(start_step=10)
            >>> next(it)[0], next(it)[0]
            (10, 11)
        """
        if not is_int(start_step, minimum=0):
            raise MeshparError(f"TokenBatches.iterate: start_step={start_step!r} must be an int >= 0")
        step = int(start_step)
        while True:
            yield step, self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches from step 0 (use :meth:`iterate` to resume or to get step numbers).

        Example:
            >>> first = next(iter(TokenBatches(batch_size=2, seq_len=8)))
            >>> sorted(first)
            ['inputs', 'targets']
        """
        return (batch for _, batch in self.iterate(0))
