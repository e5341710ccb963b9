"""dllm_rl: reinforcement-learning fine-tuning of masked diffusion language models.

Importing the package registers the config schemas (Hydra ConfigStore), so every entry point sees
them, and nothing heavier: torch and transformers load only where a model is built, which keeps
``--help`` and config errors quick. Importing ``dllm_rl.models`` (any module under it) registers
the model classes with the transformers Auto registries.
"""

from dllm_rl.config import register_configs

register_configs()

# The objectives, samplers and tasks register their own schemas (@register_objective / @register_sampler /
# @register_task with config=...); their modules name torch, datasets and numpy lazily (dllm_rl/lazy.py),
# so this loads none of them.
import dllm_rl.objectives  # noqa: E402, F401
import dllm_rl.samplers  # noqa: E402, F401
import dllm_rl.tasks  # noqa: E402, F401

__version__ = "0.1.0"
