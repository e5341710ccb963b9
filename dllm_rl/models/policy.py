"""The Policy: a masked-diffusion network plus its tokenizer, behind one `logits` call.

Samplers and estimators only ever call ``policy.logits(input_ids, attention_mask, position_ids)``
and read ``mask_id``; which network sits behind it (the embedded tiny model, a local checkpoint, a
DeepSpeed engine wrapping either) is the model loader's business.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dllm_rl.errors import ConfigError
from dllm_rl.models.char_tokenizer import build_char_tokenizer
from dllm_rl.models.tiny import TinyMDLM, TinyMDLMConfig


class Policy:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.forward_module: torch.nn.Module = model  # replaced by the DeepSpeed engine for training
        if tokenizer.mask_token_id is None:
            raise ConfigError("the tokenizer has no mask token (set mask_token when saving it)")
        self.mask_id = int(tokenizer.mask_token_id)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.mask_id

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, T, V] logits, position i predicting token i."""
        return self.forward_module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask on the policy's device."""
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=True)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def decode(self, completion_ids: torch.Tensor) -> list[str]:
        """Completion texts: everything before the first EOS, special tokens dropped."""
        rows = completion_ids.tolist()
        if self.eos_id is not None:
            rows = [row[: row.index(self.eos_id)] if self.eos_id in row else row for row in rows]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        """save_pretrained for the network and the tokenizer, loadable again with model.path."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ConfigError(f"model.dtype={name!r} must be float32, bfloat16 or float16") from None


def build_tiny(model_cfg: Mapping[str, Any], alphabet: str, seed: int) -> Policy:
    """A freshly initialised embedded tiny model with a character tokenizer over ``alphabet``."""
    tokenizer = build_char_tokenizer(alphabet)
    config = TinyMDLMConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg["hidden_size"],
        num_layers=model_cfg["num_layers"],
        num_heads=model_cfg["num_heads"],
        max_position_embeddings=model_cfg["max_position_embeddings"],
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # Initialise under a private RNG so building a model never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyMDLM(config)
    return Policy(model.to(_dtype(model_cfg["dtype"])), tokenizer)


def load_pretrained(path: str | os.PathLike, dtype: str = "float32") -> Policy:
    """Load a save_pretrained directory (weights, config, tokenizer) from local disk only."""
    p = Path(os.path.expanduser(str(path)))
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path={p}: no config.json (expected a save_pretrained directory)")
    try:
        model = AutoModelForMaskedLM.from_pretrained(p, dtype=_dtype(dtype), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.path={p}: cannot load the checkpoint: {first_line}") from None
    return Policy(model, tokenizer)
