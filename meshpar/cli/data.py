"""``meshpar train``'s data: the embedded corpus or ``--data`` files, the held-out split, and
what a checkpoint records to resume them exactly."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from meshpar.errors import CheckpointError, DataError, UsageError
from meshpar.train.data import TokenBatches, load_corpus, unigram_entropy
from meshpar.train.files import Windows, open_token_files, resolve_files
from meshpar.train.tokenizer import Tokenizer

#: Tokens read to estimate a file corpus's unigram entropy (the yardstick in the summary).
_ENTROPY_SAMPLE = 1 << 22


@dataclasses.dataclass
class TrainData:
    """Where the batches come from; each process gets its rows of every global batch.

    Attributes:
        tokenizer: for text files and samples.
        train: the ``--data`` pipeline (``None``: the embedded corpus).
        embedded: the embedded corpus' batches (``None`` with ``--data``).
        eval: the held-out pipeline (``None`` without ``--eval-every``).
        spec: what a checkpoint records so that a resume can check it reads the same data.
        entropy: the unigram entropy of (a sample of) the training tokens, in nats.
        prompt: token ids that start the end-of-run sample.
    """

    tokenizer: Tokenizer
    train: Any  # a ShardedBatches, or None
    embedded: TokenBatches | None
    eval: Any  # a ShardedBatches, or None
    eval_batches: int
    spec: dict[str, Any]
    entropy: float
    prompt: list[int]
    local_rows: Callable[[dict], dict]
    _iterator: Any = None

    def describe(self) -> str:
        if self.train is None:
            text = f"embedded corpus; unigram entropy {self.entropy:.3f} nats"
        else:
            files = self.spec["files"]
            text = (f"{len(files)} file(s) ({files[0]['path']}{', ...' if len(files) > 1 else ''}), "
                    f"{len(self.train.windows):,} windows, tokenizer {self.tokenizer.name}; "
                    f"unigram entropy {self.entropy:.3f} nats")
        if self.eval is not None:
            text += (f"; eval on {self.spec['eval']['source']} ({self.eval.num_batches} batch(es), "
                     f"{self.eval_batches} per evaluation)")
        return text

    def start(self, step: int, state: dict[str, Any] | None) -> None:
        """Position the batches at ``step`` (``state``: the saved Grain iterator state)."""
        if self.train is not None:
            if step and state is None:
                raise CheckpointError(
                    f"--resume: the checkpoint at step {step} has no data iterator state; it was "
                    "not written by a --data run"
                )
            self._iterator = self.train.iterator(state)

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch of ``step``."""
        if self.train is None:
            return self.local_rows(self.embedded.batch(step))
        return next(self._iterator)

    def iterator_state(self) -> dict[str, Any] | None:
        """The Grain iterator's state (``None`` for the embedded corpus, addressed by step)."""
        return None if self._iterator is None else dict(self._iterator.get_state())

    def eval_iter(self):
        """This process's rows of each of the ``eval_batches`` held-out batches, always the same."""
        return (self.eval.batch(k) for k in range(self.eval_batches))


def _spec_of(windows: Windows) -> list[dict[str, Any]]:
    return [{"path": name, "tokens": int(len(a))} for name, a in zip(windows.names, windows.arrays)]


def _entropy(windows: Windows) -> float:
    taken, parts = 0, []
    for array in windows.arrays:
        part = np.asarray(array[: _ENTROPY_SAMPLE - taken])
        parts.append(part)
        taken += len(part)
        if taken >= _ENTROPY_SAMPLE:
            break
    return unigram_entropy(np.concatenate(parts))


def build_data(args: argparse.Namespace, *, vocab_size: int, seq_len: int, batch_rows: np.ndarray,
               local_rows: Callable[[dict], dict]) -> TrainData:
    """The data of a ``meshpar train`` run, checked against the model before anything compiles.

    Args:
        args: the parsed command line.
        vocab_size: the model's vocabulary.
        seq_len: tokens per row.
        batch_rows: the positions of this process's rows in a global batch.
        local_rows: cuts a global batch to this process's rows (the embedded corpus).

    Raises:
        UsageError: inconsistent flags (``--eval-every`` without held-out data, ...).
        DataError: see :func:`meshpar.train.files.open_token_files`; too little held-out data.
    """
    # Options that would go unused are errors, not silently ignored.
    if args.eval_batches is not None and not args.eval_every:
        raise UsageError("--eval-batches is used only with --eval-every N")
    if args.token_dtype is not None:
        patterns = [p for p in (args.data, args.eval_data) if p]
        if not any(f.endswith(".bin") for p in patterns for f in resolve_files(p)):
            raise UsageError(f"--token-dtype {args.token_dtype} is for .bin token files, and "
                             "--data/--eval-data name none")
    eval_batches = 4 if args.eval_batches is None else args.eval_batches
    token_dtype = args.token_dtype or "uint16"
    if args.eval_every < 0 or eval_batches < 1:
        raise UsageError(f"--eval-every {args.eval_every} --eval-batches {eval_batches}: "
                         "need --eval-every >= 0 and --eval-batches >= 1")
    fraction = args.eval_fraction
    if fraction is not None:
        if not 0 < fraction < 1:
            raise UsageError(f"--eval-fraction {fraction}: must be in (0, 1)")
        if not args.data:
            raise UsageError("--eval-fraction holds out part of --data; without --data use --eval-data")
        if args.eval_data:
            raise UsageError("--eval-fraction and --eval-data both name held-out data; choose one")
    if args.eval_every and not (args.eval_data or fraction):
        raise UsageError("--eval-every needs held-out data: --eval-data FILES, or --eval-fraction F "
                         "of --data")
    if (args.eval_data or fraction) and not args.eval_every:
        raise UsageError("--eval-data/--eval-fraction are used only with --eval-every N")
    if not args.data and vocab_size < 256:
        raise UsageError(f"--vocab-size {vocab_size}: the embedded corpus is byte-level and needs >= 256")
    tokenizer = Tokenizer(args.tokenizer)
    if args.tokenizer:  # the byte tokenizer is checked only where text is read (and sampled)
        tokenizer.check_fits(vocab_size)
    if args.data or args.eval_data:
        # Lazy: Grain takes a second to import, which runs on the embedded corpus do not need.
        from meshpar.train.loader import ShardedBatches
    opened = lambda flag, pattern: open_token_files(  # noqa: E731
        resolve_files(pattern, flag=flag), seq_len=seq_len, vocab_size=vocab_size,
        tokenizer=tokenizer, token_dtype=token_dtype, flag=flag)
    spec: dict[str, Any] = {"tokenizer": tokenizer.fingerprint, "tokenizer_path": tokenizer.name,
                            "token_dtype": token_dtype}
    train = embedded = held = None
    if args.data:
        windows = opened("--data", args.data)
        if fraction:
            count = max(1, math.ceil(fraction * len(windows)))
            if count >= len(windows):
                raise DataError(f"--eval-fraction {fraction} holds out all {len(windows)} windows of --data")
            windows, held = windows.split(count)
            spec["eval"] = {"source": f"the last {count} windows of --data", "fraction": fraction}
        train = ShardedBatches(windows, batch_size=args.batch_size, rows=batch_rows, seed=args.seed)
        spec["source"] = "files"
        spec["files"] = _spec_of(windows)
        entropy = _entropy(windows)
        prompt = [int(t) for t in windows[0][: max(1, min(16, seq_len // 2))]]
    else:
        embedded = TokenBatches(batch_size=args.batch_size, seq_len=seq_len, seed=args.seed)
        spec["source"] = "embedded"
        corpus = load_corpus()
        entropy = unigram_entropy(corpus)
        prompt = [int(t) for t in corpus[: max(1, min(16, seq_len // 2))]]
    if args.eval_data:
        held = opened("--eval-data", args.eval_data)
        spec["eval"] = {"source": args.eval_data, "files": _spec_of(held)}
    evaluation = None
    if held is not None:
        if len(held) < args.batch_size:
            raise DataError(
                f"the held-out data ({spec['eval']['source']}) has {len(held)} windows of "
                f"--seq-len {seq_len} + 1 tokens, fewer than one batch of --batch-size "
                f"{args.batch_size}; hold out more"
            )
        evaluation = ShardedBatches(held, batch_size=args.batch_size, rows=batch_rows, shuffle=False)
        if evaluation.num_batches < eval_batches:
            raise DataError(
                f"--eval-batches {eval_batches}: the held-out data has only "
                f"{evaluation.num_batches} batch(es) of --batch-size {args.batch_size}"
            )
    return TrainData(tokenizer=tokenizer, train=train, embedded=embedded, eval=evaluation,
                     eval_batches=eval_batches, spec=spec, entropy=entropy, prompt=prompt,
                     local_rows=local_rows)


def check_resume_data(saved: dict[str, Any] | None, here: dict[str, Any], step: int) -> None:
    """Raise :class:`CheckpointError` if a resumed run would read other data than the saved one."""
    saved = saved or {"source": "embedded"}
    # Held-out files (--eval-data) do not change the training batches; a held-out fraction does.
    fraction = lambda spec: (spec.get("eval") or {}).get("fraction")  # noqa: E731
    if fraction(saved) != fraction(here):
        raise CheckpointError(
            f"--resume: the checkpoint at step {step} held out --eval-fraction {fraction(saved)} of "
            f"--data, this run {fraction(here)}; the training windows would differ"
        )
    for key in ("source", "files", "tokenizer", "token_dtype"):
        if key == "tokenizer" and here.get("source") == "embedded" and saved.get(key) is None:
            continue  # checkpoints from before --data: the embedded corpus, bytes
        if key in ("token_dtype",) and saved.get(key) is None:
            continue
        if saved.get(key) != here.get(key):
            raise CheckpointError(
                f"--resume: the checkpoint at step {step} was trained on other data ({key}: "
                f"{saved.get(key)!r} there, {here.get(key)!r} here); an exact resume needs the same "
                "--data, --tokenizer and --token-dtype"
            )
