"""Tasks: data, rewards and metrics, registered by name (``task=<name>``).

Every module of this package is imported here, so a new task is a new file whose class carries
``@register_task("<name>", config=<its schema>)``, plus its preset ``conf/task/<name>.yaml``
(docs/ARCHITECTURE.md, "Interfaces"). The modules name datasets, numpy and pyarrow lazily
(dllm_rl/lazy.py), so importing them for their schemas loads none of those.
"""

import importlib
import pkgutil

from dllm_rl.tasks.base import TASKS, DataError, Task, get_task, register_task, total_reward

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "math_verify_worker"):  # the worker is a script run in its own process
        importlib.import_module(f"{__name__}.{_module.name}")  # registers the task(s) and rewards it defines

__all__ = ["TASKS", "DataError", "Task", "get_task", "register_task", "total_reward"]
