"""RL objectives: one file each, registered by name (`objective=<name>`).

Every module of this package is imported here, so a new objective is a new file whose class carries
``@register_objective("<name>")``, plus its preset ``conf/objective/<name>.yaml`` (docs/ARCHITECTURE.md,
"Adding an objective").
"""

import importlib
import pkgutil

from dllm_rl.objectives.base import (
    OBJECTIVES,
    Objective,
    RolloutBatch,
    get_objective,
    group_mean_advantages,
    register_objective,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")  # registers the objective(s) it defines

__all__ = [
    "OBJECTIVES",
    "Objective",
    "RolloutBatch",
    "get_objective",
    "group_mean_advantages",
    "register_objective",
]
