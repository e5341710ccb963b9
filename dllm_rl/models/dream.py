"""Dream (Dream-org/Dream-v0-Base-7B / -Instruct-7B) as our own transformers-5 architecture.

Dream is Qwen2.5-7B continued as a masked diffusion LM: the same weights layout and block math, with the
causal mask removed. Its checkpoints ship remote code for transformers 4.x; transformers 5 has no Dream
class. This module assembles the model from transformers' own Qwen2 modules (``Qwen2DecoderLayer``,
``Qwen2RMSNorm``, ``Qwen2RotaryEmbedding``) with every attention layer switched to ``is_causal=False``, so
the official shards load under their Qwen2 parameter names without ``trust_remote_code``.

Dream keeps the autoregressive alignment it inherited: the output at position i-1 is the prediction for
token i. ``DreamModel.forward`` returns those raw outputs unchanged (so it matches the official model
logit for logit); ``align_logits`` converts them to the "position i predicts token i" convention the rest
of the code uses, and the model adapter is the one place that calls it.
"""

from typing import Any

import torch
import torch.nn as nn
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedModel, Qwen2Config
from transformers import initialization as init
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from dllm_rl.models.auto import register_architecture
from dllm_rl.models.llada import Float32InvFreq, bidirectional_attention_mask, default_position_ids

# The official config.json spells it with a capital D; AutoConfig looks model types up case-sensitively.
MODEL_TYPE = "Dream"


@strict  # type-checks fields at construction and on assignment, like the built-in configs
class DreamConfig(Qwen2Config):
    """Qwen2's config under Dream's model type, plus ``mask_token_id``; defaults are Dream-v0-Instruct-7B's.

    Inheriting Qwen2Config gives exactly the fields the Qwen2 modules read (and transformers 5's
    ``rope_parameters`` handling: a config.json's ``rope_theta`` / ``rope_scaling`` are folded into it).
    """

    model_type = MODEL_TYPE
    default_theta = 1000000.0  # RoPE base when a config.json gives neither rope_theta nor rope_parameters

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    use_cache: bool = False  # no KV cache: every diffusion step re-reads the whole sequence
    # Special tokens of Dream-v0-Instruct-7B: <|mask|>, and <|endoftext|> as BOS, EOS and padding.
    mask_token_id: int | None = 151666
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_supported()

    def check_supported(self) -> None:
        """Raise ValueError (naming the key) for options the bidirectional model would compute differently.

        Plain ValueError on purpose: strict's class validators would wrap it in an exception type that
        callers catching ValueError (the checkpoint loader) do not expect.
        """
        if self.use_sliding_window:
            raise ValueError(
                f"Dream config: use_sliding_window={self.use_sliding_window!r} is not supported "
                "(Dream attends over the whole sequence in both directions)"
            )
        if any(t != "full_attention" for t in self.layer_types or ()):
            raise ValueError(f"Dream config: layer_types={self.layer_types!r} is not supported (full attention only)")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"Dream config: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"Dream config: num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )


class DreamRotaryEmbedding(Float32InvFreq, Qwen2RotaryEmbedding):
    """transformers' Qwen2 rotary embedding, with its frequency buffers kept in float32."""


def align_logits(logits: torch.Tensor) -> torch.Tensor:
    """Dream's raw logits [B, T, V] re-indexed so that position i predicts token i.

    The raw output at i-1 predicts token i, so the aligned logits at i are the raw ones at i-1. Position 0
    has no predecessor and reuses its own output, as Dream's sampler does (a prompt always precedes the
    masked positions, so position 0 is never scored).
    """
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


class DreamBaseModel(nn.Module):
    """The network under ``model.``: embed_tokens, layers (bidirectional Qwen2 blocks), norm."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        # padding_idx as in Qwen2 and the official code: the padding row starts at zero and gets no gradient.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        for layer in self.layers:
            # The attention kernels read the flag from the module; with SDPA and no padding the mask is None,
            # and is_causal=True would silently make the model autoregressive again.
            layer.self_attn.is_causal = False
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config)  # buffers only: nothing in the state dict

    def forward(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        kv_cache: Any = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq_len = x.shape[:2]
        if position_ids is None:
            position_ids = default_position_ids(batch, seq_len, x.device)
        position_embeddings = self.rotary_emb(x, position_ids)
        mask = bidirectional_attention_mask(self.config, x, attention_mask, kv_cache)
        for layer in self.layers:
            # position_ids are deliberately not passed on: the rotary tables already hold them, and the flash
            # kernel would read non-monotonic (left-padded) positions as packed sequences. The Qwen2 attention
            # calls cache.update(k, v, layer_idx), which is what a WindowKVCache answers.
            x = layer(x, attention_mask=mask, position_embeddings=position_embeddings, cache=kv_cache)
        return self.norm(x)


class DreamModel(PreTrainedModel):
    """Dream with its LM head; the class name of the checkpoints' ``architectures`` entry.

    ``forward`` returns Dream's raw logits (position i-1 predicts token i); see ``align_logits``.
    Registered for AutoModel (as the official auto_map does) and AutoModelForMaskedLM.
    """

    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Only applied when config.tie_word_embeddings is True (it is False for Dream-7B).
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DreamConfig):
        config.check_supported()  # catches options changed after the config was built
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization helpers skip tensors already loaded from a checkpoint.
        std = float(self.config.initializer_range)
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            # Slicing drops the "already loaded" flag the helpers check, so test it on the full weight.
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, Qwen2RMSNorm):
            init.ones_(module.weight)
        else:
            # The rotary buffers: recomputed here after a meta-device construction (from_pretrained).
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        kv_cache: Any = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        """Raw logits [B, T, V]: position i-1 predicts token i (``align_logits`` re-indexes them).

        attention_mask: [B, T], 1 = real token, 0 = padding (padding keys are never attended to).
        position_ids: [B, T]; with left padding pass positions counted over real tokens
        (``dllm_rl.positions.position_ids_from_attention_mask``); default 0..T-1.
        kv_cache: a WindowKVCache (dllm_rl/kv_cache.py): a full forward fills it; with its window set,
        input_ids and position_ids are the window's and attention_mask still covers the whole sequence.
        Extra kwargs (from PEFT or HF wrappers: return_dict, use_cache, labels, ...) are accepted and ignored.
        """
        hidden = self.model(input_ids, inputs_embeds, attention_mask, position_ids, kv_cache)
        return MaskedLMOutput(logits=self.lm_head(hidden))


register_architecture(MODEL_TYPE, DreamConfig, DreamModel)
