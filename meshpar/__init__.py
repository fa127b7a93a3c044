"""meshpar: sharding rules, parallel strategies and pipelines for Flax models on JAX meshes.

Example:
    >>> import optax
    >>> from flax import nnx
    >>> import meshpar as mp
    >>> from meshpar.models import GPT, get_preset, lm_loss
    >>> from meshpar.train.data import TokenBatches
    >>> mp.emulate_devices(8)                       # CPU only; before JAX starts its backend
    >>> mesh = mp.make_mesh(data=2, fsdp=2, tensor=2)
    >>> make_model = lambda: GPT(get_preset("tiny"), rngs=nnx.Rngs(0))
    >>> trainer = mp.Trainer(make_model, optax.adamw(3e-4), lm_loss, mesh=mesh, strategy="zero3")
    >>> metrics = trainer.step(TokenBatches(batch_size=8, seq_len=32).batch(0))
    >>> 5.0 < metrics.loss < 6.0                    # about ln 256: an untrained byte model
    True
"""

from meshpar import _moved
from meshpar.backend.devices import emulate_devices
from meshpar.errors import (
    DeviceEmulationError,
    IndivisibleError,
    MeshError,
    MeshparError,
    PlanError,
    ProfileError,
    RuleConflictError,
    RuleError,
    StrategyError,
    TrainingError,
    UnannotatedParameterError,
)
from meshpar.inspect.report import format_plan, plan_to_dict
from meshpar.mesh import format_mesh, make_mesh, parse_mesh
from meshpar.planner import HardwareProfile, Layout, PlanResult, load_profile, plan, plan_gpt
from meshpar.models.linen import from_linen
from meshpar.parallel.layout import activate, constrain
from meshpar.parallel.schedule import Schedule
from meshpar.parallel.stack import scan_layers
from meshpar.sharding.placement import (ShardingPlan, init_linen, init_nnx, plan_linen,
                                       plan_nnx_state)
from meshpar.sharding.rules import Rule, Rules
from meshpar.sharding.strategy import PRESETS as STRATEGIES
from meshpar.sharding.strategy import Strategy, get_strategy
from meshpar.train import Fallback, StepMetrics, TrainConfig, Trainer
from meshpar.train.diloco import DiLoCoConfig, DiLoCoTrainer
from meshpar.train.loss import Ratio, Summed

__all__ = [
    "DeviceEmulationError", "DiLoCoConfig", "DiLoCoTrainer", "Fallback", "HardwareProfile",
    "IndivisibleError", "Layout", "MeshError", "MeshparError", "PlanError", "PlanResult",
    "ProfileError", "Ratio", "Rule", "RuleConflictError", "RuleError", "Rules", "STRATEGIES",
    "Schedule", "ShardingPlan", "StepMetrics", "Strategy", "StrategyError", "Summed",
    "TrainConfig", "Trainer", "TrainingError", "UnannotatedParameterError", "activate", "constrain",
    "emulate_devices", "format_mesh", "format_plan", "from_linen", "get_strategy", "init_linen",
    "init_nnx", "load_profile", "make_mesh", "parse_mesh", "plan", "plan_gpt", "plan_linen",
    "plan_nnx_state", "plan_to_dict", "scan_layers",
]
__version__ = "0.1.0"

# The flat layout's module paths (meshpar.rules, meshpar.train's helpers, ...) keep importing.
_moved.install()


def __getattr__(name: str):
    # ``import meshpar; meshpar.rules.Rules``: an old module reached as an attribute.
    return _moved.old_attribute(name)
