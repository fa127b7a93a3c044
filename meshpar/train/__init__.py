"""Training: the config, the plan (where parameters, optimizer state and the pipeline live), losses,
the gradient norm, the :class:`Trainer`, its state, checkpoints, learning-rate schedules, the
embedded corpus, your own data (``files``: text and token files; ``tokenizer``; ``loader``: the
Grain pipeline) and text generation (``generate``).

``from meshpar.train import TrainConfig, Trainer`` keeps working from when this was one module.
"""

from meshpar.train.config import TrainConfig
from meshpar.train.metrics import StepMetrics
from meshpar.train.state import TrainState
from meshpar.train.paths import Fallback
from meshpar.train.trainer import Trainer

__all__ = ["Fallback", "StepMetrics", "TrainConfig", "TrainState", "Trainer"]
