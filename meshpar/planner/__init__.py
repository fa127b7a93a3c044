"""The planner: choose the layout (mesh factorisation, ZeRO stage, microbatches, pipeline
schedule, remat, precision) for a model and a cluster from compiled programs and a cost model.

* :mod:`meshpar.planner.hardware`: hardware profiles (TOML, shipped and your own; ``cpu``
  calibrated and cached).
* :mod:`meshpar.planner.layout`: candidate layouts and their enumeration.
* :mod:`meshpar.planner.cost`: the step-time model (compute + exposed communication + bubble).
* :mod:`meshpar.planner.search`: :func:`plan` and :func:`plan_gpt`.
* :mod:`meshpar.planner.report`: the ranked table.
"""

from meshpar.planner.cost import Collective, StepTime, step_time
from meshpar.planner.hardware import HardwareProfile, calibrate_cpu, load_profile, parse_profile
from meshpar.planner.layout import Dims, Layout, enumerate_layouts
from meshpar.planner.report import format_plan_result
from meshpar.planner.search import Candidate, PlanResult, plan, plan_gpt

__all__ = ["Candidate", "Collective", "Dims", "HardwareProfile", "Layout", "PlanResult",
           "StepTime", "calibrate_cpu", "enumerate_layouts", "format_plan_result",
           "load_profile", "parse_profile", "plan", "plan_gpt", "step_time"]
