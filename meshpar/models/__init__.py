"""Built-in models. Each is an ordinary Flax module that annotates logical axes; none is special."""

from meshpar.models.gpt import GPT, PRESETS, GPTConfig, get_preset, lm_loss

__all__ = ["GPT", "GPTConfig", "PRESETS", "get_preset", "lm_loss"]
