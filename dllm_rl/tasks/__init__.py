"""Tasks: data, rewards and metrics. Importing this package registers every built-in task."""

from dllm_rl.tasks import sudoku  # noqa: F401  (registers "sudoku")
from dllm_rl.tasks.base import TASKS, DataError, Task, get_task, register_task, total_reward

__all__ = ["TASKS", "DataError", "Task", "get_task", "register_task", "total_reward"]
