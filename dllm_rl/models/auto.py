"""Registering our architectures with transformers' Auto classes (one helper for every family)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM


def register_architecture(model_type: str, config_cls: type, model_cls: type) -> None:
    """Make ``from_pretrained`` / ``from_config`` find ``model_cls`` for config.json's ``model_type``.

    Re-registering raises in transformers (e.g. on importlib.reload or a second import path), so
    only what is not there yet is registered.
    """
    try:
        AutoConfig.register(model_type, config_cls)
    except ValueError:
        pass
    for auto_cls in (AutoModel, AutoModelForMaskedLM):
        try:
            auto_cls.register(config_cls, model_cls)
        except ValueError:
            pass
