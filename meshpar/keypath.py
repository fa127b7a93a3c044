"""Pytree key paths as ``"a/b/c"`` strings: how errors, reports and checkpoints name a leaf.

It lives at the top of the package because the backend (multi-process batch checks), the
placement code and checkpoints all name leaves the same way, and none of them should import the
others for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def path_str(path: Sequence[Any]) -> str:
    """``('blocks', 'attn', 'q')`` or a jax key path -> ``"blocks/attn/q"``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                key = getattr(key, attr)
                break
        parts.append(str(key))
    return "/".join(parts)
