"""Text to token ids and back: bytes (the default) or a Hugging Face ``tokenizers`` JSON file.

``meshpar train --data *.txt`` tokenises text with one of these; ``meshpar sample`` encodes the
prompt and decodes what the model writes with the same one (the training run copies a tokenizer
file into its checkpoint directory, so a checkpoint carries the tokenizer it was trained with).
SentencePiece ``.model`` files are not read: convert them to a ``tokenizers`` JSON file first
(``tokenizers`` can load most SentencePiece vocabularies through its converters).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from meshpar.errors import DataError

#: The byte tokenizer's vocabulary: every byte value is a token.
BYTE_VOCAB_SIZE = 256


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A text tokenizer: bytes (``path=None``) or a Hugging Face ``tokenizers`` JSON file.

    Attributes:
        path: the ``tokenizer.json`` file, or ``None`` for UTF-8 bytes (vocabulary 256).

    Raises:
        DataError: the file does not exist or is not a ``tokenizers`` JSON file.

    Example:
        >>> tok = Tokenizer()
        >>> tok.vocab_size, tok.encode("hi").tolist(), tok.decode([104, 105])
        (256, [104, 105], 'hi')
    """

    path: str | None = None
    _impl: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.path is None:
            return
        if not os.path.isfile(self.path):
            raise DataError(f"--tokenizer {self.path!r}: no such file")
        if self.path.endswith(".model"):
            raise DataError(
                f"--tokenizer {self.path!r}: SentencePiece .model files are not read; convert it "
                "to a Hugging Face tokenizers JSON file (tokenizer.json)"
            )
        try:
            impl = HFTokenizer.from_file(self.path)
        except Exception as err:  # noqa: BLE001 - the Rust library's own exception types
            raise DataError(
                f"--tokenizer {self.path!r} is not a Hugging Face tokenizers JSON file: {err}"
            ) from None
        object.__setattr__(self, "_impl", impl)

    @property
    def vocab_size(self) -> int:
        """Token ids are in ``[0, vocab_size)`` (added special tokens included)."""
        if self._impl is None:
            return BYTE_VOCAB_SIZE
        return int(self._impl.get_vocab_size(with_added_tokens=True))

    @property
    def name(self) -> str:
        """``"bytes"`` or the file's path, for messages and checkpoint metadata."""
        return "bytes" if self.path is None else self.path

    @property
    def fingerprint(self) -> str:
        """``"bytes"``, or ``"sha256:..."`` of the file's content: what a checkpoint records, so
        that the same tokenizer at another path resumes and another one does not.

        Example:
            >>> Tokenizer().fingerprint
            'bytes'
        """
        if self.path is None:
            return "bytes"
        with open(self.path, "rb") as f:
            return "sha256:" + hashlib.sha256(f.read()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as ``int64[N]``; no special tokens are added.

        Example:
            >>> Tokenizer().encode("é").tolist()   # two UTF-8 bytes
            [195, 169]
        """
        if self._impl is None:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        return np.asarray(self._impl.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Any) -> str:
        """Text of token ids (bytes that are not valid UTF-8 become U+FFFD).

        Example:
            >>> Tokenizer().decode(np.array([104, 105]))
            'hi'
        """
        ids = [int(i) for i in np.asarray(ids).ravel()]
        if self._impl is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self._impl.decode(ids, skip_special_tokens=False)

    def check_fits(self, vocab_size: int) -> None:
        """Raise :class:`DataError` unless every token id fits a model of ``vocab_size``.

        Example:
            >>> Tokenizer().check_fits(256)
        """
        if self.vocab_size > vocab_size:
            raise DataError(
                f"--tokenizer {self.name}: its vocabulary has {self.vocab_size} tokens but the "
                f"model's --vocab-size is {vocab_size}; pass --vocab-size {self.vocab_size} or more"
            )
