"""Built-in models (``gpt``), each an ordinary Flax module that annotates logical axes, none
special; and ``linen``: :func:`~meshpar.models.linen.from_linen`, the bridge that brings a Linen
model to the Trainer."""

from meshpar.models.gpt import GPT, PRESETS, GPTConfig, get_preset, lm_loss

__all__ = ["GPT", "GPTConfig", "PRESETS", "get_preset", "lm_loss"]
