"""Your own training data: text files and token files, cut into fixed-length windows.

Three kinds of file, told apart by their suffix:

* ``.npy``: a 1-D integer NumPy array of token ids (memory-mapped, not read into memory);
* ``.bin``: a flat array of ``uint16`` or ``uint32`` token ids without a header, as many GPT
  trainers write them (``token_dtype`` says which; memory-mapped);
* anything else: UTF-8 text, tokenised in memory with a :class:`~meshpar.train.tokenizer.Tokenizer`
  (pre-tokenise a large corpus to ``.bin`` instead).

Each file is a document: :class:`Windows` cuts every file on its own into windows of
``seq_len + 1`` tokens, consecutive windows sharing one token (so each token but a file's first is
a target exactly once), and a window never spans two files. Token ids are checked against the
model's vocabulary when the files are opened, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence

import numpy as np

from meshpar.errors import DataError
from meshpar.train.tokenizer import Tokenizer

#: ``.bin`` token files: their element type, chosen with ``--token-dtype``.
TOKEN_DTYPES = ("uint16", "uint32")


def resolve_files(pattern: str, *, flag: str = "--data") -> list[str]:
    """The files a path or glob names, sorted; a directory means every file in it.

    Raises:
        DataError: nothing matches, or only directories do.

    Example:
        >>> resolve_files("/no/such/*.txt")
        Traceback (most recent call last):
        ...
        meshpar.errors.DataError: --data '/no/such/*.txt' matches no file
    """
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "*")
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [m for m in matches if os.path.isfile(m)]
    if not files:
        raise DataError(f"{flag} {pattern!r} matches no file"
                        + (f" (only directories: {matches[:3]})" if matches else ""))
    return files


def _load_one(path: str, tokenizer: Tokenizer, token_dtype: str, flag: str) -> np.ndarray:
    if os.path.getsize(path) == 0:
        raise DataError(f"{flag}: {path} is empty")
    if path.endswith(".npy"):
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise DataError(f"{flag}: {path} is not a NumPy array file: {err}") from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(
                f"{flag}: {path} holds a {tokens.dtype}{list(tokens.shape)} array; token files "
                "must be 1-D integer arrays"
            )
        return tokens
    if path.endswith(".bin"):
        itemsize = np.dtype(token_dtype).itemsize
        size = os.path.getsize(path)
        if size % itemsize:
            raise DataError(
                f"{flag}: {path} has {size} bytes, not a whole number of --token-dtype "
                f"{token_dtype} tokens ({itemsize} bytes each); is it a {TOKEN_DTYPES} file?"
            )
        return np.memmap(path, dtype=token_dtype, mode="r")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise DataError(
            f"{flag}: {path} is not UTF-8 text ({err.reason} at byte {err.start}); token files "
            "must end in .npy or .bin"
        ) from None
    return tokenizer.encode(text)


@dataclasses.dataclass(frozen=True)
class Windows:
    """Training windows of ``seq_len + 1`` tokens over a list of token arrays: a random-access
    source (``len``, ``[i]``) for Grain.

    Window ``i`` of a file with ``n`` tokens covers tokens ``[i * seq_len, i * seq_len + seq_len
    + 1)``; a file has ``(n - 1) // seq_len`` windows (the tail that does not fill one is
    dropped). Windows are numbered file after file.

    Attributes:
        arrays: the files' token arrays (memory maps for token files).
        names: the files' paths, for messages.
        seq_len: tokens per training row.

    Example:
        >>> w = Windows((np.arange(10),), ("a",), seq_len=4)
        >>> len(w), w[1].tolist()
        (2, [4, 5, 6, 7, 8])
    """

    arrays: tuple[np.ndarray, ...]
    names: tuple[str, ...]
    seq_len: int

    def __post_init__(self) -> None:
        counts = [max(0, (len(a) - 1) // self.seq_len) for a in self.arrays]
        object.__setattr__(self, "_starts", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        start = (index - int(self._starts[f])) * self.seq_len
        return np.asarray(self.arrays[f][start:start + self.seq_len + 1], dtype=np.int32)

    def split(self, count: int) -> tuple[Windows, Windows]:
        """The windows without their last ``count``, and those last ``count`` (a held-out split).

        The split is by windows, at the end of the last file(s); neither part shares a token
        with the other except where a file is cut (one token).
        """
        total = len(self)
        keep = total - count
        train, held = [], []
        for array, first, last in zip(self.arrays, self._starts[:-1], self._starts[1:]):
            first, last = int(first), int(last)
            if last <= keep:
                train.append(array)
            elif first >= keep:
                held.append(array[: (last - first) * self.seq_len + 1])
            else:
                cut = (keep - first) * self.seq_len
                train.append(array[:cut + 1])
                held.append(array[cut:(last - first) * self.seq_len + 1])
        names = ("held-out part",) * len(held)
        return (Windows(tuple(train), self.names[: len(train)], self.seq_len),
                Windows(tuple(held), names, self.seq_len))


def open_token_files(
    paths: Sequence[str], *, seq_len: int, vocab_size: int, tokenizer: Tokenizer | None = None,
    token_dtype: str = "uint16", flag: str = "--data",
) -> Windows:
    """Open (memory-map or tokenise) ``paths`` and check them for a model.

    Args:
        paths: the files (see :func:`resolve_files`).
        seq_len: the model's sequence length; each window holds ``seq_len + 1`` tokens.
        vocab_size: the model's vocabulary; every token id must be below it.
        tokenizer: for text files (default: bytes).
        token_dtype: the element type of ``.bin`` files, ``"uint16"`` or ``"uint32"``.
        flag: the option named in error messages.

    Returns:
        The files' :class:`Windows`.

    Raises:
        DataError: a file is empty, unreadable as its kind, or too short for one window of
            ``seq_len + 1`` tokens; a token id is ``>= vocab_size`` (the file, the id and its
            position are named); the tokenizer's vocabulary exceeds ``vocab_size``.

    Example:
        >>> import os, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = os.path.join(tmp.name, "train.bin")
        >>> np.arange(1000, dtype=np.uint16).tofile(path)     # a .bin file of uint16 tokens
        >>> windows = open_token_files([path], seq_len=64, vocab_size=50304)
        >>> len(windows), windows[0].shape                    # 999 // 64 windows of 65 tokens
        (15, (65,))
        >>> tmp.cleanup()
    """
    tokenizer = tokenizer or Tokenizer()
    if token_dtype not in TOKEN_DTYPES:
        raise DataError(f"--token-dtype {token_dtype!r}: must be one of {TOKEN_DTYPES}")
    if any(not p.endswith((".npy", ".bin")) for p in paths):
        tokenizer.check_fits(vocab_size)
    arrays = []
    for path in paths:
        tokens = _load_one(path, tokenizer, token_dtype, flag)
        if len(tokens) == 0:
            raise DataError(f"{flag}: {path} holds no tokens")
        # In chunks: a memory-mapped file is scanned without being read into memory at once.
        for start in range(0, len(tokens), 1 << 24):
            chunk = np.asarray(tokens[start:start + (1 << 24)])
            bad = np.flatnonzero((chunk >= vocab_size) | (chunk < 0))
            if bad.size:
                at = start + int(bad[0])
                raise DataError(
                    f"{flag}: {path} holds token id {int(tokens[at])} at position {at}, outside "
                    f"the model's vocabulary [0, {vocab_size}) (--vocab-size {vocab_size})"
                )
        arrays.append(tokens)
    windows = Windows(tuple(arrays), tuple(paths), seq_len)
    if len(windows) == 0:
        longest = max(len(a) for a in arrays)
        raise DataError(
            f"{flag}: the files are too short for --seq-len {seq_len}: a training row needs "
            f"{seq_len + 1} consecutive tokens of one file, and the longest has {longest}"
        )
    return windows
