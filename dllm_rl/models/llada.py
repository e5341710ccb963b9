"""LLaDA (GSAI-ML/LLaDA-8B-Base / -Instruct) as our own transformers-5 architecture.

The checkpoints ship remote code written for transformers 4.x on top of AI2's OLMo code base; transformers 5
has no LLaDA class. This module re-implements the one configuration LLaDA uses, so that
``AutoModelForMaskedLM.from_pretrained(<official checkpoint dir>)`` loads the official safetensors shards as
they are, without ``trust_remote_code``:

* parameter names and shapes are the OLMo ones the shards carry (``model.transformer.wte``,
  ``model.transformer.blocks.{i}.q_proj`` ... ``attn_out``, ``ff_proj`` (the SiLU gate), ``up_proj``,
  ``ff_out``, ``model.transformer.ln_f``, ``model.transformer.ff_out`` as the LM head), which is why the
  block cannot be transformers' ``LlamaDecoderLayer``; its pieces (RMSNorm, rotary embedding, attention
  kernels, bidirectional mask) are transformers' own;
* the math is the ``block_type="llama"`` block with the causal mask removed: every position attends to
  every non-padding position and the logits at position i predict the clean token at position i;
* every OLMo option LLaDA does not use is either irrelevant to inference (init scheme, precision, the
  ``flash_attention`` flag: the kernel comes from ``config._attn_implementation``) and kept verbatim, or
  changes the network and is refused with a ``ValueError`` naming the key, so a checkpoint we would compute
  wrongly never loads silently.

Two helpers shared with ``dream.py`` live here as well: the padding mask builder and the float32 guard for
rotary frequency buffers.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from dllm_rl.models.auto import register_architecture

MODEL_TYPE = "llada"


@strict  # type-checks fields at construction and on assignment, like the built-in configs
class LLaDAConfig(PretrainedConfig):
    """The OLMo-style config.json of the LLaDA checkpoints, defaults equal to LLaDA-8B-Instruct's.

    The defaults are the 8B checkpoint's values rather than OLMo's (which describe a causal GPT-2-sized
    model with a sequential block) so that ``LLaDAConfig(d_model=..., n_layers=...)`` builds a small model
    of the same kind, and a config.json that omits a key gets LLaDA's value.
    """

    model_type = MODEL_TYPE
    # Standard names for generic code (FLOP counters, DeepSpeed auto config, PEFT, transformers internals):
    # reading or writing config.hidden_size reads or writes d_model. tie_word_embeddings drives transformers'
    # weight tying, so it must mean exactly LLaDA's weight_tying.
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
        "tie_word_embeddings": "weight_tying",
        "initializer_range": "init_std",
    }

    # Sizes. None values are filled in __post_init__ the way OLMo derives them.
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: n_heads (32 for the 8B model), as OLMo derives it
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = 12288
    vocab_size: int = 126464
    embedding_size: int | None = 126464  # rows of wte and width of the logits (may exceed vocab_size)
    max_sequence_length: int = 4096
    # int allowed: strict typing would reject `rope_theta: 500000` coming from YAML.
    rope_theta: float | int = 500000.0
    rms_norm_eps: float | int = 1e-5
    include_bias: bool = False
    include_qkv_bias: bool = False
    bias_for_layer_norm: bool | None = False
    weight_tying: bool = False
    # Architecture switches: only the values below are implemented (see check_supported).
    block_type: str = "llama"
    block_group_size: int = 1
    activation_type: str = "silu"
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    rope: bool = True
    rope_full_precision: bool = True
    alibi: bool = False
    alibi_bias_max: float | int = 8.0
    multi_query_attention: bool | None = None
    scale_logits: bool = False
    input_emb_norm: bool = False
    attention_dropout: float | int = 0.0
    residual_dropout: float | int = 0.0
    embedding_dropout: float | int = 0.0
    # OLMo leftovers with no effect here, kept so the config round-trips unchanged.
    flash_attention: bool = False
    init_device: str | None = "meta"
    init_fn: str = "mitchell"
    init_std: float | int = 0.02
    init_cutoff_factor: float | int | None = None
    precision: str | None = "amp_bf16"
    use_cache: bool = False
    # Special tokens of LLaDA-8B-Instruct: <|mdm_mask|>, and <|endoftext|> as both EOS and padding.
    mask_token_id: int | None = 126336
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    bos_token_id: int | None = None
    # Derived from rope_theta for transformers' rotary module; LLaDA has no other RoPE variant.
    rope_parameters: RopeParameters | dict | None = None

    def __post_init__(self, **kwargs):
        # The parent sets unknown kwargs (auto_map, transformers_version, standard names routed through
        # attribute_map, ...) as attributes, so derive and check only afterwards.
        super().__post_init__(**kwargs)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        self.check_supported()
        self.rope_parameters = {"rope_type": "default", "rope_theta": float(self.rope_theta)}

    def check_supported(self) -> None:
        """Raise ValueError (naming the key) for any option this implementation would compute differently.

        Runs at construction and again when a model is built, so a config edited after construction is
        caught too. Plain ValueError on purpose: strict's class validators would wrap it in an exception
        type that callers catching ValueError (the checkpoint loader) do not expect.
        """

        def refuse(key: str, why: str) -> None:
            raise ValueError(f"LLaDA config: {key}={getattr(self, key, None)!r} is not supported ({why})")

        fixed = {
            "block_type": ("llama", "only the Llama-style block of the LLaDA checkpoints is implemented"),
            "block_group_size": (1, "block groups rename the parameters to transformer.block_groups"),
            "activation_type": ("silu", "the block computes ff_out(silu(ff_proj(x)) * up_proj(x))"),
            "layer_norm_type": ("rms", "only RMSNorm is implemented"),
            "layer_norm_with_affine": (True, "norms always carry a weight"),
            "attention_layer_norm": (False, "query/key norms are not implemented"),
            "rope": (True, "learned absolute positions are not implemented"),
            "alibi": (False, "ALiBi biases are not implemented"),
            "scale_logits": (False, "logit scaling is not implemented"),
            "input_emb_norm": (False, "embedding scaling by sqrt(d_model) is not implemented"),
        }
        for key, (value, why) in fixed.items():
            if getattr(self, key) != value:
                refuse(key, why)
        if self.multi_query_attention:
            refuse("multi_query_attention", "give n_kv_heads=1 instead")
        norm_bias = self.bias_for_layer_norm if self.bias_for_layer_norm is not None else self.include_bias
        if norm_bias:
            refuse("bias_for_layer_norm", "norms have no bias (bias_for_layer_norm=None follows include_bias)")
        for key in ("residual_dropout", "embedding_dropout"):
            if getattr(self, key) != 0:
                refuse(key, "only attention_dropout is implemented")
        # Keys of OLMo variants / forks that are not dataclass fields here but would change the network.
        if getattr(self, "clip_qkv", None) is not None:
            refuse("clip_qkv", "clipping of q/k/v is not implemented")
        if getattr(self, "rope_scaling_factor", None) not in (None, 1, 1.0):
            refuse("rope_scaling_factor", "position interpolation is not implemented")
        incoming = self.rope_parameters or {}
        if incoming.get("rope_type", "default") != "default":
            refuse("rope_parameters", "LLaDA uses plain RoPE with rope_theta only")
        if "rope_theta" in incoming and float(incoming["rope_theta"]) != float(self.rope_theta):
            refuse("rope_parameters", f"its rope_theta disagrees with rope_theta={self.rope_theta!r}")
        if self.d_model % self.n_heads != 0:
            refuse("d_model", f"not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2 != 0:
            refuse("n_heads", "the head dimension d_model / n_heads must be even for rotary embeddings")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0:
            refuse("n_kv_heads", f"n_heads={self.n_heads} must be a multiple of it")
        if self.embedding_size < self.vocab_size:
            refuse("embedding_size", f"smaller than vocab_size={self.vocab_size}")


class Float32InvFreq(nn.Module):
    """Mixin for transformers' rotary modules: keep the ``inv_freq`` buffers in float32 through ``.to(dtype)``.

    ``model.to(torch.bfloat16)`` casts floating buffers too; bf16 keeps 8 bits of mantissa, so the rotary
    angle of position ~1000 would be off by radians. The values cannot be recovered from the rounded
    buffer, so they are recomputed from the config (cheap: head_dim / 2 numbers). ``from_pretrained(dtype=)``
    and DeepSpeed's mixed precision already leave buffers alone; this covers a blanket cast by the caller.
    """

    inv_freq: torch.Tensor
    original_inv_freq: torch.Tensor
    rope_type: str
    config: PretrainedConfig
    compute_default_rope_parameters: Callable[..., tuple[torch.Tensor, float]]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "Float32InvFreq":
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            rope_fn = (
                self.compute_default_rope_parameters
                if self.rope_type == "default"
                else ROPE_INIT_FUNCTIONS[self.rope_type]
            )
            inv_freq, _ = rope_fn(self.config)
            inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)
            self.inv_freq = inv_freq
            self.original_inv_freq = inv_freq.clone()
        return self


class LLaDARotaryEmbedding(Float32InvFreq, LlamaRotaryEmbedding):
    """transformers' Llama rotary embedding (default RoPE from ``config.rope_parameters``), float32-guarded."""


def bidirectional_attention_mask(
    config: PretrainedConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, kv_cache: Any = None
) -> torch.Tensor | None:
    """The attention mask for ``config._attn_implementation`` from a [B, T] padding mask (1 = real token).

    transformers' ``create_bidirectional_mask`` masks padding keys (never queries) and returns None when
    nothing is masked, which lets SDPA take its fast path; attention layers must then run with
    ``is_causal=False``. A row with no real token would softmax over nothing (NaN in some SDPA backends,
    leaking into gradients via 0 * NaN), so such rows attend everywhere instead: their outputs are
    meaningless but finite, and callers ignore them. A 4D mask is passed through unchanged.

    Under a windowed ``kv_cache`` forward (dllm_rl/kv_cache.py) the queries are the window's
    positions and the keys are every position: the padding mask covers the keys, and a stand-in of the
    keys' length tells transformers the key count (it reads only the shape of ``encoder_hidden_states``).
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = attention_mask.to(device=inputs_embeds.device).bool()
        attention_mask = keep | ~keep.any(dim=-1, keepdim=True)
    keys = None
    if kv_cache is not None and kv_cache.window is not None:
        if attention_mask is None:
            raise ValueError("a windowed kv_cache forward needs the attention mask of the whole sequence")
        keys = inputs_embeds.new_zeros(()).expand(attention_mask.shape[0], attention_mask.shape[-1], 1)
    return create_bidirectional_mask(
        config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, encoder_hidden_states=keys
    )


def default_position_ids(batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Positions 0..T-1 for every row (callers with left padding pass mask-derived positions instead)."""
    return torch.arange(seq_len, device=device).unsqueeze(0).expand(batch_size, -1)


class LLaDALlamaBlock(GradientCheckpointingLayer):
    """One LLaDA block under the official parameter names; bidirectional attention, SwiGLU MLP.

    h = x + attn_out(attn(rope(q_proj(n1 x)), rope(k_proj(n1 x)), v_proj(n1 x)))
    y = h + ff_out(silu(ff_proj(n2 h)) * up_proj(n2 h))

    The attention runs through transformers' kernel table (sdpa / eager / flash_attention_2), with this
    block standing in as the "attention module" those kernels read their settings from (``is_causal``,
    ``num_key_value_groups``, ``config``, ``layer_idx``). GradientCheckpointingLayer recomputes it in the
    backward pass when checkpointing is on; hidden states must then be passed positionally.
    """

    def __init__(self, config: LLaDAConfig, layer_idx: int):
        super().__init__()
        self.config = config  # the attention kernels read config._attn_implementation from the module
        self.layer_idx = layer_idx
        self.head_dim = config.d_model // config.n_heads
        self.num_key_value_groups = config.n_heads // config.n_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # the whole point of a diffusion LM: every position sees both directions
        self.attention_dropout = float(config.attention_dropout)
        self.rope_full_precision = config.rope_full_precision
        d, hidden = config.d_model, config.mlp_hidden_size
        qkv_bias = config.include_bias or config.include_qkv_bias
        self.attn_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)
        self.ff_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, hidden, bias=config.include_bias)  # the SiLU gate
        self.up_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.ff_out = nn.Linear(hidden, d, bias=config.include_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        kv_cache: Any = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        normed = self.attn_norm(hidden_states)
        shape = (batch, seq_len, -1, self.head_dim)
        q = self.q_proj(normed).view(shape).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(normed).view(shape).transpose(1, 2)  # [B, KV, T, D]
        v = self.v_proj(normed).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        # With rope_full_precision the tables are float32, so q and k are rotated in float32 (type promotion)
        # and rounded back once, as the official code does.
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        q, k = q_rot.to(v.dtype), k_rot.to(v.dtype)
        if kv_cache is not None:  # a WindowKVCache: the other positions' keys/values come from it
            k, v = kv_cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        attn, _ = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        hidden_states = hidden_states + self.attn_out(attn.reshape(batch, seq_len, -1))
        normed = self.ff_norm(hidden_states)
        return hidden_states + self.ff_out(F.silu(self.ff_proj(normed)) * self.up_proj(normed))


class LLaDAModel(nn.Module):
    """The network under ``model.``: ``transformer`` = {wte, blocks, ln_f, ff_out}, as in the checkpoints.

    ``transformer.ff_out`` (the LM head) always exists; with ``weight_tying`` transformers ties it to
    ``wte`` (the checkpoint then has no ff_out tensor), which computes the same ``x @ wte.T`` as the official
    code's ``F.linear(x, wte.weight)``.
    """

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        head_bias = config.include_bias and not config.weight_tying
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.embedding_size, config.d_model),
                "blocks": nn.ModuleList([LLaDALlamaBlock(config, i) for i in range(config.n_layers)]),
                "ln_f": LlamaRMSNorm(config.d_model, eps=config.rms_norm_eps),
                "ff_out": nn.Linear(config.d_model, config.embedding_size, bias=head_bias),
            }
        )
        self.rotary_emb = LLaDARotaryEmbedding(config)  # buffers only: nothing in the state dict

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
        x = self.transformer["wte"](input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq_len = x.shape[:2]
        if position_ids is None:
            position_ids = default_position_ids(batch, seq_len, x.device)
        # The rotary module only reads device and dtype from its first argument: an empty stand-in in the
        # dtype the tables should have (float32 for rope_full_precision) avoids copying the activations.
        table_dtype = torch.float32 if self.config.rope_full_precision else x.dtype
        position_embeddings = self.rotary_emb(x.new_empty(0, dtype=table_dtype), position_ids)
        mask = bidirectional_attention_mask(self.config, x, attention_mask, kv_cache)
        for block in self.transformer["blocks"]:
            x = block(x, mask, position_embeddings, kv_cache)
        return self.transformer["ff_out"](self.transformer["ln_f"](x))


class LLaDAModelLM(PreTrainedModel):
    """LLaDA with its LM head; the class name of the checkpoints' ``architectures`` entry.

    ``forward`` returns logits [B, T, embedding_size] where position i predicts the clean token at i.
    Registered for AutoModel (as the official auto_map does) and AutoModelForMaskedLM.
    """

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDALlamaBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Only applied when config.weight_tying (alias tie_word_embeddings) is True.
    _tied_weights_keys = {"model.transformer.ff_out.weight": "model.transformer.wte.weight"}

    def __init__(self, config: LLaDAConfig):
        config.check_supported()  # catches options changed after the config was built
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Plain normal(0, init_std) rather than OLMo's "mitchell" scheme: random LLaDA models only serve tests
        # and benchmarks. transformers.initialization helpers skip tensors already loaded from a checkpoint.
        std = float(self.config.init_std)
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LlamaRMSNorm):
            init.ones_(module.weight)
        else:
            # The rotary buffers: recomputed here after a meta-device construction (from_pretrained).
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer["wte"]

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer["wte"] = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer["ff_out"]

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.transformer["ff_out"] = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        kv_cache: Any = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        """Logits [B, T, embedding_size]; position i predicts the clean token at position i.

        attention_mask: [B, T], 1 = real token, 0 = padding (padding keys are never attended to).
        position_ids: [B, T]; with left padding pass positions counted over real tokens
        (``dllm_rl.positions.position_ids_from_attention_mask``); default 0..T-1.
        kv_cache: a WindowKVCache (dllm_rl/kv_cache.py): a full forward fills it; with its window set,
        input_ids and position_ids are the window's and attention_mask still covers the whole sequence.
        Extra kwargs (from PEFT or HF wrappers: return_dict, use_cache, labels, ...) are accepted and ignored.
        """
        logits = self.model(input_ids, inputs_embeds, attention_mask, position_ids, kv_cache)
        return MaskedLMOutput(logits=logits)


register_architecture(MODEL_TYPE, LLaDAConfig, LLaDAModelLM)
