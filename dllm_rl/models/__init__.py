"""Model and tokenizer definitions; importing this package registers the tiny model with the Auto classes."""

from dllm_rl.models import tiny  # noqa: F401  (registers the Auto classes)
