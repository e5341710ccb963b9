"""dllm_rl: reinforcement-learning fine-tuning of masked diffusion language models.

Importing the package registers the config schemas (Hydra ConfigStore) and the model classes
(transformers Auto registries), so every entry point sees them.
"""

from dllm_rl.config import register_configs

register_configs()

from dllm_rl import models  # noqa: E402,F401  (registers the tiny model with the Auto classes)

__version__ = "0.1.0"
