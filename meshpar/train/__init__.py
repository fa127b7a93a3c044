"""Training: the config, the plan (where parameters, optimizer state and the pipeline live), losses,
the :class:`Trainer`, checkpoints and the embedded corpus.

``from meshpar.train import TrainConfig, Trainer`` keeps working from when this was one module.
"""

from meshpar.train.trainer import Fallback, TrainConfig, Trainer, TrainState

__all__ = ["Fallback", "TrainConfig", "TrainState", "Trainer"]
