"""Model families: what differs between the tiny model, LLaDA and Dream, in one place.

Everything above the model (samplers, estimators, objectives, tasks) sees one contract: logits where
position i predicts token i, a mask id, an EOS id and a chat template. A ``Family`` records how one
architecture meets that contract:

* ``shifted``: Dream was adapted from an autoregressive model, so its output at position i-1 predicts
  token i; ``align_logits`` undoes that once, here, and nowhere else (README, "Models").
* ``lora_modules``: the papers' LoRA targets are named q/k/v/o/gate/up/down after Llama; LLaDA's OLMo
  code names the same matrices q_proj/k_proj/v_proj/attn_out/ff_proj/up_proj/ff_out, and its LM head
  is also called ``ff_out``. Targets are therefore translated per family and anchored inside the
  decoder layers, so the head is never adapted by accident.
* ``specials`` and ``chat_template``: the special-token strings the tiny tokenizers mimic, and the
  fixed chat template installed on every tokenizer of the family (LLaDA; README, "Models"), or None to
  keep the tokenizer's own (Dream, whose template comes from its Qwen2.5 tokenizer).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dllm_rl.config import ModelCfg
from dllm_rl.errors import ConfigError
from dllm_rl.models.char_tokenizer import Specials

# The papers' LoRA target list (r 128, alpha 64, dropout 0.05; README, "Models"), in Llama's names.
CANONICAL_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# LLaDA's chat template, generalised to any list of messages: header, trimmed content, end of turn.
LLADA_CHAT_TEMPLATE = (
    "<|startoftext|>{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# The Qwen2.5 template Dream's tokenizer carries (default system turn when none is given); only the
# tiny Dream tokenizer is built with it: a real checkpoint keeps its own.
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def _dream_align(logits: torch.Tensor) -> torch.Tensor:
    from dllm_rl.models.dream import align_logits  # the one implementation of Dream's shift

    return align_logits(logits)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json model_type values of this family
    layers: str  # regex of the decoder-layer container in parameter names ("model.layers.3.")
    lora_modules: Mapping[str, str]  # canonical LoRA target -> module name in this architecture
    specials: Specials
    chat_template: str | None
    align_logits: Callable[[torch.Tensor], torch.Tensor]
    shift: int  # 1 where the raw output at i - 1 predicts token i (what align_logits undoes), else 0
    random_config: Callable[[ModelCfg, Any], Any]  # (the model section, tokenizer) -> PretrainedConfig

    def lora_target_regex(self, targets: Sequence[str]) -> str:
        """A PEFT target_modules regex (full match on module names) for the given targets.

        Canonical names (q_proj ... down_proj) are translated; anything else is taken as this
        architecture's own module name. Only modules inside decoder layers match.
        """
        if not targets:
            raise ConfigError("model.lora.target_modules is empty (give e.g. [q_proj, k_proj, v_proj, o_proj])")
        names = sorted({self.lora_modules.get(t, t) for t in targets})
        alternatives = "|".join(re.escape(n) for n in names)
        return rf".*\.{self.layers}\.\d+\.(?:[^.]+\.)*(?:{alternatives})"


def _sizes(m: ModelCfg) -> dict[str, Any]:
    heads = m.num_heads
    kv = m.num_kv_heads or heads
    from dllm_rl.models.tiny import swiglu_width

    inter = m.intermediate_size
    if inter is None:  # the tiny model's rule, so every family of one size has the same MLP width
        inter = swiglu_width(m.hidden_size)
    return {"heads": heads, "kv": kv, "hidden": m.hidden_size, "inter": inter, "layers": m.num_layers}


def _vocab(m: ModelCfg, tokenizer: Any) -> int:
    return m.vocab_size or len(tokenizer)


def _special_ids(tokenizer: Any) -> dict[str, Any]:
    return {
        "mask_token_id": tokenizer.mask_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }


def _tiny_config(m: ModelCfg, tokenizer: Any) -> Any:
    from dllm_rl.models.tiny import TinyMDLMConfig

    return TinyMDLMConfig(
        vocab_size=_vocab(m, tokenizer),
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta or 10000.0,
        **_special_ids(tokenizer),
    )


def _llada_config(m: ModelCfg, tokenizer: Any) -> Any:
    from transformers import AutoConfig

    s, vocab = _sizes(m), _vocab(m, tokenizer)
    return AutoConfig.for_model(
        "llada",
        d_model=s["hidden"],
        n_heads=s["heads"],
        n_kv_heads=s["kv"],
        n_layers=s["layers"],
        mlp_hidden_size=s["inter"],
        vocab_size=vocab,
        embedding_size=vocab,
        max_sequence_length=m.max_position_embeddings,
        rope_theta=m.rope_theta or 500000.0,
        **_special_ids(tokenizer),
    )


def _dream_config(m: ModelCfg, tokenizer: Any) -> Any:
    from transformers import AutoConfig

    s = _sizes(m)
    return AutoConfig.for_model(
        "Dream",
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        vocab_size=_vocab(m, tokenizer),
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta or 1000000.0,
        tie_word_embeddings=False,
        **_special_ids(tokenizer),
    )


_SAME_NAMES = {t: t for t in CANONICAL_LORA_TARGETS}

FAMILIES: dict[str, Family] = {
    "tiny": Family(
        name="tiny",
        model_types=("dllm_rl_tiny",),
        layers="layers",
        lora_modules=_SAME_NAMES,
        specials=Specials(),
        chat_template=None,
        align_logits=_identity,
        shift=0,
        random_config=_tiny_config,
    ),
    "llada": Family(
        name="llada",
        model_types=("llada",),
        layers="blocks",
        lora_modules={
            "q_proj": "q_proj",
            "k_proj": "k_proj",
            "v_proj": "v_proj",
            "o_proj": "attn_out",
            "gate_proj": "ff_proj",
            "up_proj": "up_proj",
            "down_proj": "ff_out",
        },
        # LLaDA-8B-Instruct's names; EOS and pad are both <|endoftext|> (README, "Models").
        specials=Specials(
            pad="<|endoftext|>",
            bos="<|startoftext|>",
            eos="<|endoftext|>",
            mask="<|mdm_mask|>",
            unk="<|unk|>",
            extra=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            chat_template=LLADA_CHAT_TEMPLATE,
        ),
        chat_template=LLADA_CHAT_TEMPLATE,
        align_logits=_identity,
        shift=0,
        random_config=_llada_config,
    ),
    "dream": Family(
        name="dream",
        model_types=("Dream", "dream"),
        layers="layers",
        lora_modules=_SAME_NAMES,
        # Dream-v0-Instruct-7B's names: <|endoftext|> is EOS and pad, <|mask|> the mask token.
        specials=Specials(
            pad="<|endoftext|>",
            bos="<|beginoftext|>",
            eos="<|endoftext|>",
            mask="<|mask|>",
            unk="<|unk|>",
            extra=("<|im_start|>", "<|im_end|>"),
            chat_template=QWEN_CHAT_TEMPLATE,
        ),
        chat_template=None,
        align_logits=_dream_align,
        shift=1,
        random_config=_dream_config,
    ),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model.family={name!r} is not one of {sorted(FAMILIES)}") from None


def family_of_model_type(model_type: str, where: str = "config.json") -> Family:
    """The family whose checkpoints carry this config.json ``model_type``."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ConfigError(f"{where}: model_type={model_type!r} is not a supported masked-diffusion model ({known})")
