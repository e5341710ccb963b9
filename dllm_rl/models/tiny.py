"""A tiny masked-diffusion transformer of the LLaDA kind, as a real Hugging Face model.

LLaDA is a Llama-style transformer with the causal mask removed: every position sees every other one and
position i predicts the clean token at position i (no shift). There is no timestep input; the number of
<mask> tokens already tells the model how noisy the sequence is. Being a `PreTrainedModel` lets the tiny
model go through exactly the same code paths (from_pretrained, PEFT, DeepSpeed, checkpointing) as a
real 8B checkpoint, so the CPU tests exercise the production code.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput

from dllm_rl.kv_cache import WindowKVCache, key_padding_mask
from dllm_rl.models.auto import register_architecture
from dllm_rl.positions import position_ids_from_attention_mask  # noqa: F401  (re-exported)

MODEL_TYPE = "dllm_rl_tiny"


def swiglu_width(hidden_size: int) -> int:
    """SwiGLU has three matrices, so 8/3*d keeps the parameter count of a 4*d GELU MLP; rounded up to a
    multiple of 8 for friendlier matmul shapes (64 -> 176)."""
    return 8 * math.ceil(8 * hidden_size / 3 / 8)


@strict  # type-checks fields and runs validate_* methods at construction, like the built-in configs
class TinyMDLMConfig(PretrainedConfig):
    # transformers 5 configs are dataclasses: fields are class annotations with defaults, and unknown
    # kwargs still land on the instance via PretrainedConfig.__post_init__.
    model_type = MODEL_TYPE
    # Standard names so generic HF / DeepSpeed helpers that look for them keep working.
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    vocab_size: int = 32
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int | None = None
    max_position_embeddings: int = 512
    rope_theta: float | int = 10000.0  # int allowed: strict mode would reject `rope_theta: 10000` from YAML
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = swiglu_width(self.hidden_size)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2 != 0:
            raise ValueError("head dim must be even for rotary embeddings")


class TinyMDLMRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares under/overflows easily in bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class TinyMDLMRotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Frequencies are recomputed on every call instead of living in a buffer: model.to(bf16) would
        # round a buffer (angles off by radians at position ~500), and from_pretrained builds models on
        # the meta device, where a non-persistent buffer would need re-initialising. Cost is negligible.
        exponent = torch.arange(0, self.head_dim, 2, device=position_ids.device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        # fp32 angles: integer positions past 256 are not exact in bf16.
        freqs = position_ids[..., None].float() * inv_freq  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, D], broadcast over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class TinyMDLMAttention(nn.Module):
    def __init__(self, config: TinyMDLMConfig):
        super().__init__()
        self.n_head = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_cache: WindowKVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv_cache is not None:  # keys/values of the other positions come from the cache
            k, v = kv_cache.update(k, v, layer_idx)
        # is_causal=False is the whole point of a diffusion LM: every position sees both directions.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class TinyMDLMMLP(nn.Module):
    def __init__(self, config: TinyMDLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyMDLMBlock(GradientCheckpointingLayer):
    # GradientCheckpointingLayer wraps forward in torch.utils.checkpoint when the model has
    # checkpointing enabled and is training; hidden states must then be passed positionally.
    def __init__(self, config: TinyMDLMConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = TinyMDLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TinyMDLMAttention(config)
        self.mlp_norm = TinyMDLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = TinyMDLMMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_cache: WindowKVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.attn_norm(x), cos, sin, attn_mask, kv_cache, self.layer_idx)
        return x + self.mlp(self.mlp_norm(x))


class TinyMDLMBackbone(nn.Module):
    def __init__(self, config: TinyMDLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([TinyMDLMBlock(config, i) for i in range(config.num_layers)])
        self.norm = TinyMDLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = TinyMDLMRotary(config.hidden_size // config.num_heads, config.rope_theta)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        kv_cache: WindowKVCache | None = None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)

        # [B, 1, 1, K]: keys only, broadcast over heads and queries. The mask covers every key, which under
        # a windowed cache forward is more positions than the T being run. A row with no real key would
        # softmax over nothing (NaN in some SDPA backends, leaking into gradients via 0 * NaN), so such rows
        # attend everywhere instead; their outputs are garbage but finite and callers ignore them.
        attn_mask = key_padding_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, kv_cache)
        return self.norm(x)


class TinyMDLM(PreTrainedModel):
    config_class = TinyMDLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # the only kernel it has (attn_implementation is not consulted)
    _no_split_modules = ["TinyMDLMBlock"]
    # Only applied when config.tie_word_embeddings is True.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyMDLMConfig):
        super().__init__(config)
        self.model = TinyMDLMBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization helpers skip tensors already loaded from a checkpoint.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, TinyMDLMRMSNorm):
            init.ones_(module.weight)

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
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        kv_cache: WindowKVCache | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """Logits [B, T, V]; position i predicts the clean token at position i.

        attention_mask: [B, T], 1 = real token, 0 = padding (padding keys are never attended to).
        position_ids: [B, T]; with left padding pass `position_ids_from_attention_mask(attention_mask)`.
        kv_cache: a WindowKVCache (dllm_rl/kv_cache.py): a full forward fills it; with its window set,
        input_ids and position_ids are the window's and attention_mask still covers the whole sequence.
        Extra kwargs (e.g. from PEFT or HF wrappers) are accepted and ignored.
        """
        hidden = self.model(input_ids, attention_mask, position_ids, kv_cache)
        return MaskedLMOutput(logits=self.lm_head(hidden))


register_architecture(MODEL_TYPE, TinyMDLMConfig, TinyMDLM)
