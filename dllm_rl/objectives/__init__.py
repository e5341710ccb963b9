"""RL objectives: one file each, registered by name (`objective=<name>`)."""

from dllm_rl.objectives import diffu_grpo, dmpo, gdsd, spg, wd1  # noqa: F401  (registers the objectives)
from dllm_rl.objectives.base import (
    OBJECTIVES,
    Objective,
    RolloutBatch,
    get_objective,
    group_mean_advantages,
    register_objective,
)

__all__ = [
    "OBJECTIVES",
    "Objective",
    "RolloutBatch",
    "get_objective",
    "group_mean_advantages",
    "register_objective",
]
