"""Tasks: data, rewards and metrics. Importing this package registers every built-in task and reward."""

from dllm_rl.tasks import countdown, gsm8k, math500, sanity, sudoku  # noqa: F401  (registration by import)
from dllm_rl.tasks.base import TASKS, DataError, Task, get_task, register_task, total_reward

__all__ = ["TASKS", "DataError", "Task", "get_task", "register_task", "total_reward"]
