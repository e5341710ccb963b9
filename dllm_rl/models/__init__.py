"""Model and tokenizer definitions; importing this package registers the tiny, LLaDA and Dream architectures
with the Auto classes."""

import dllm_rl.models.dream  # noqa: F401  (registers Dream, model_type "Dream", with the Auto classes)
import dllm_rl.models.llada  # noqa: F401  (registers LLaDA, model_type "llada", with the Auto classes)
from dllm_rl.models import tiny  # noqa: F401  (registers the Auto classes)
