"""Behavioural tests of our LLaDA and Dream architectures (dllm_rl/models/llada.py and dream.py).

What matters is that an official checkpoint loads into them unchanged and computes what the official code
computes. So the tests (a) build the full-size models from configs mirroring the official config.json files
and compare every parameter name and shape with the official layout written out here by hand, (b) compare
logits with an independent plain-torch forward that reads the weights by their official names, and (c)
check the properties the RL code relies on: bidirectional attention, padding keys ignored, left-padding
positions honoured, identical results across attention kernels, checkpointing, save/load and bf16.
Tiny sizes (d 64, 2 layers, 4 heads, 2 KV heads) keep the whole file to a few seconds on a CPU.
"""

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedModel

import dllm_rl.models  # noqa: F401  (registers the architectures with the Auto classes)
from dllm_rl.models.dream import DreamConfig, DreamModel, align_logits
from dllm_rl.models.llada import LLaDAConfig, LLaDAModelLM, bidirectional_attention_mask
from dllm_rl.positions import position_ids_from_attention_mask

# GSAI-ML/LLaDA-8B-Instruct config.json, key for key (OLMo leftovers included).
LLADA_8B_INSTRUCT_CONFIG: dict[str, Any] = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}

# Dream-org/Dream-v0-Instruct-7B config.json (Qwen2.5-7B layout), key for key.
DREAM_7B_INSTRUCT_CONFIG: dict[str, Any] = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_dream.DreamConfig",
        "AutoModel": "modeling_dream.DreamModel",
    },
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "Dream",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

VOCAB = 100

# The same files at tiny sizes. rope_theta is an int for LLaDA (as YAML would give it) and small for both so
# the rotation varies fast over a short sequence; embedding_size > vocab_size as LLaDA allows.
TINY_LLADA_CONFIG: dict[str, Any] = {
    **LLADA_8B_INSTRUCT_CONFIG,
    "d_model": 64,
    "n_heads": 4,
    "n_kv_heads": 2,
    "n_layers": 2,
    "mlp_hidden_size": 96,
    "vocab_size": VOCAB,
    "embedding_size": VOCAB + 4,
    "max_sequence_length": 64,
    "rope_theta": 10000,
    "mask_token_id": VOCAB - 1,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
TINY_DREAM_CONFIG: dict[str, Any] = {
    **DREAM_7B_INSTRUCT_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "sliding_window": 64,
    "rope_theta": 10000.0,
    "mask_token_id": VOCAB - 1,
    "pad_token_id": 1,
    "bos_token_id": 1,
    "eos_token_id": 1,
    "torch_dtype": "float32",  # the tests compare float32 numbers; the real file says bfloat16
}


# ---------------------------------------------------------------------------------------------------------------
# The official layouts, written out by name (independently of the model code).


def llada_official_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, heads, kv = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
    hidden, rows, hd = cfg["mlp_hidden_size"], cfg["embedding_size"], cfg["d_model"] // cfg["n_heads"]
    shapes = {"model.transformer.wte.weight": (rows, d), "model.transformer.ln_f.weight": (d,)}
    if not cfg["weight_tying"]:
        shapes["model.transformer.ff_out.weight"] = (rows, d)
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shapes |= {
            p + "attn_norm.weight": (d,),
            p + "ff_norm.weight": (d,),
            p + "q_proj.weight": (heads * hd, d),
            p + "k_proj.weight": (kv * hd, d),
            p + "v_proj.weight": (kv * hd, d),
            p + "attn_out.weight": (d, d),
            p + "ff_proj.weight": (hidden, d),
            p + "up_proj.weight": (hidden, d),
            p + "ff_out.weight": (d, hidden),
        }
    return shapes


def dream_official_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    inter, vocab, hd = cfg["intermediate_size"], cfg["vocab_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * hd, d),
            p + "self_attn.q_proj.bias": (heads * hd,),
            p + "self_attn.k_proj.weight": (kv * hd, d),
            p + "self_attn.k_proj.bias": (kv * hd,),
            p + "self_attn.v_proj.weight": (kv * hd, d),
            p + "self_attn.v_proj.bias": (kv * hd,),
            p + "self_attn.o_proj.weight": (d, heads * hd),
            p + "mlp.gate_proj.weight": (inter, d),
            p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# Independent reference forwards: plain torch, float64, weights looked up by their official names.


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def ref_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (j, j + D/2) of x [B, H, T, D] by angle position * theta^(-2j/D)."""
    half = x.shape[-1] // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    angle = positions[:, None, :, None].double() * freq  # [B, 1, T, D/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q [B, H, T, D] over k, v [B, KV, T, D]; query head h reads KV head h // (H / KV)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))  # padding keys only
    return torch.softmax(scores, dim=-1) @ v


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    batch, seq_len, _ = x.shape
    return x.view(batch, seq_len, -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, _, seq_len, _ = x.shape
    return x.transpose(1, 2).reshape(batch, seq_len, -1)


def llada_reference(sd: dict[str, torch.Tensor], cfg: dict[str, Any], ids, mask, positions) -> torch.Tensor:
    w = {k: v.double() for k, v in sd.items()}
    eps, hd, theta = cfg["rms_norm_eps"], cfg["d_model"] // cfg["n_heads"], float(cfg["rope_theta"])

    def linear(h: torch.Tensor, name: str) -> torch.Tensor:  # with a bias where the checkpoint has one
        return h @ w[name + ".weight"].T + w.get(name + ".bias", torch.zeros((), dtype=torch.float64))

    x = w["model.transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = ref_rms_norm(x, w[p + "attn_norm.weight"], eps)
        q = ref_rope(split_heads(linear(h, p + "q_proj"), hd), positions, theta)
        k = ref_rope(split_heads(linear(h, p + "k_proj"), hd), positions, theta)
        v = split_heads(linear(h, p + "v_proj"), hd)
        x = x + linear(merge_heads(ref_attention(q, k, v, mask)), p + "attn_out")
        h = ref_rms_norm(x, w[p + "ff_norm.weight"], eps)
        x = x + linear(F.silu(linear(h, p + "ff_proj")) * linear(h, p + "up_proj"), p + "ff_out")
    x = ref_rms_norm(x, w["model.transformer.ln_f.weight"], eps)
    if "model.transformer.ff_out.weight" in w:
        return linear(x, "model.transformer.ff_out")
    return x @ w["model.transformer.wte.weight"].T  # weight_tying


def dream_reference(sd: dict[str, torch.Tensor], cfg: dict[str, Any], ids, mask, positions) -> torch.Tensor:
    w = {k: v.double() for k, v in sd.items()}
    eps, theta = cfg["rms_norm_eps"], float(cfg["rope_theta"])
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."

        def proj(h: torch.Tensor, name: str) -> torch.Tensor:
            return h @ w[p + f"self_attn.{name}.weight"].T + w[p + f"self_attn.{name}.bias"]  # noqa: B023

        h = ref_rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = ref_rope(split_heads(proj(h, "q_proj"), hd), positions, theta)
        k = ref_rope(split_heads(proj(h, "k_proj"), hd), positions, theta)
        v = split_heads(proj(h, "v_proj"), hd)
        x = x + merge_heads(ref_attention(q, k, v, mask)) @ w[p + "self_attn.o_proj.weight"].T
        h = ref_rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return ref_rms_norm(x, w["model.norm.weight"], eps) @ head.T


# ---------------------------------------------------------------------------------------------------------------
# Per-family fixtures and helpers.


@dataclass(frozen=True)
class Family:
    name: str
    tiny: dict[str, Any]
    model_cls: type[PreTrainedModel]
    shapes: Callable[[dict[str, Any]], dict[str, tuple[int, ...]]]
    reference: Callable[..., torch.Tensor]
    logits_width: int
    tie_key: str  # the config.json key that ties the LM head to the embedding


FAMILIES = {
    "llada": Family(
        "llada", TINY_LLADA_CONFIG, LLaDAModelLM, llada_official_shapes, llada_reference, VOCAB + 4, "weight_tying"
    ),
    "dream": Family(
        "dream", TINY_DREAM_CONFIG, DreamModel, dream_official_shapes, dream_reference, VOCAB, "tie_word_embeddings"
    ),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


def make_config(cfg: dict[str, Any], **overrides: Any) -> Any:
    """The config a checkpoint directory holding this config.json would give (via AutoConfig)."""
    values = {**cfg, **overrides}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Weights big enough that every component visibly moves the logits (the 0.02 init barely does)."""
    noise = torch.randn(shape, generator=generator)
    return 1.0 + 0.2 * noise if name.endswith("norm.weight") or ".ln_f." in name else 0.15 * noise


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(random_tensor(name, tuple(param.shape), generator))
    return model


def tiny_model(family: Family, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    model = AutoModelForMaskedLM.from_config(make_config(family.tiny, **overrides))
    return randomize(model, seed).eval()


def padded_batch(seed: int = 1, seq_len: int = 9, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0 unpadded, row 1 left-padded by `pad` (with random, non-pad token ids under the padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB - 1, (2, seq_len), generator=generator)
    mask = torch.ones(2, seq_len, dtype=torch.long)
    mask[1, :pad] = 0
    return ids, mask, position_ids_from_attention_mask(mask)


def logits_of(model: PreTrainedModel, ids, mask=None, positions=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


# ---------------------------------------------------------------------------------------------------------------
# Full-size official layouts.


def test_llada_8b_instruct_config_builds_the_official_layout_on_meta(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLADA_8B_INSTRUCT_CONFIG))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, LLaDAConfig)
    # OLMo leftovers survive; standard names read the OLMo ones.
    assert (config.init_fn, config.precision, config.flash_attention) == ("mitchell", "amp_bf16", False)
    assert config.auto_map == LLADA_8B_INSTRUCT_CONFIG["auto_map"]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (4096, 32, 32)
    assert (config.num_key_value_heads, config.intermediate_size, config.max_position_embeddings) == (32, 12288, 4096)
    assert config.tie_word_embeddings is False
    assert (config.mask_token_id, config.eos_token_id, config.pad_token_id) == (126336, 126081, 126081)
    assert config.rope_theta == 500000.0

    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(config)
    assert type(model) is LLaDAModelLM
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert state == llada_official_shapes(LLADA_8B_INSTRUCT_CONFIG)
    assert state["model.transformer.wte.weight"] == (126464, 4096)
    assert state["model.transformer.blocks.0.q_proj.weight"] == (4096, 4096)
    assert state["model.transformer.blocks.31.ff_proj.weight"] == (12288, 4096)
    assert state["model.transformer.blocks.31.ff_out.weight"] == (4096, 12288)
    assert state["model.transformer.ff_out.weight"] == (126464, 4096)

    # Per block: q, k, v, attn_out 4 * 4096^2 = 67,108,864; ff_proj, up_proj, ff_out 3 * 12288 * 4096
    # = 150,994,944; attn_norm, ff_norm 2 * 4096 = 8,192; sum 218,112,000, times 32 blocks = 6,979,584,000.
    # wte and the untied LM head 2 * 126464 * 4096 = 1,035,993,088; ln_f 4,096.
    # Total 6,979,584,000 + 1,035,993,088 + 4,096 = 8,015,581,184.
    assert 32 * (4 * 4096**2 + 3 * 12288 * 4096 + 2 * 4096) + 2 * 126464 * 4096 + 4096 == 8_015_581_184
    assert sum(p.numel() for p in model.parameters()) == 8_015_581_184


def test_dream_7b_instruct_config_builds_the_official_layout_on_meta(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(DREAM_7B_INSTRUCT_CONFIG))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, DreamConfig) and config.model_type == "Dream"
    assert (config.mask_token_id, config.pad_token_id, config.eos_token_id) == (151666, 151643, 151643)
    assert config.rope_parameters["rope_theta"] == 1000000.0
    assert config.auto_map == DREAM_7B_INSTRUCT_CONFIG["auto_map"]

    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(config)
    assert type(model) is DreamModel
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert state == dream_official_shapes(DREAM_7B_INSTRUCT_CONFIG)
    assert state["model.embed_tokens.weight"] == (152064, 3584)
    assert state["model.layers.0.self_attn.k_proj.weight"] == (512, 3584)  # 4 KV heads of 128
    assert state["model.layers.27.self_attn.q_proj.bias"] == (3584,)
    assert state["model.layers.27.mlp.down_proj.weight"] == (3584, 18944)
    assert state["lm_head.weight"] == (152064, 3584)

    # Per layer: q 3584^2 + 3584 = 12,848,640; k and v 2 * (512 * 3584 + 512) = 3,671,040; o 3584^2 =
    # 12,845,056; gate, up, down 3 * 18944 * 3584 = 203,685,888; two norms 7,168; sum 233,057,792, times 28
    # layers = 6,525,618,176. Embedding and untied head 2 * 152064 * 3584 = 1,089,994,752; final norm 3,584.
    # Total 6,525,618,176 + 1,089,994,752 + 3,584 = 7,615,616,512.
    per_layer = (3584**2 + 3584) + 2 * (512 * 3584 + 512) + 3584**2 + 3 * 18944 * 3584 + 2 * 3584
    assert 28 * per_layer + 2 * 152064 * 3584 + 3584 == 7_615_616_512
    assert sum(p.numel() for p in model.parameters()) == 7_615_616_512


# ---------------------------------------------------------------------------------------------------------------
# Numerics against the reference and the properties the RL code relies on.


def test_logits_equal_an_independent_reference_with_padding_and_left_pad_positions(family: Family) -> None:
    model = tiny_model(family)
    ids, mask, positions = padded_batch()
    logits = logits_of(model, ids, mask, positions)
    expected = family.reference(model.state_dict(), family.tiny, ids, mask.bool(), positions)
    assert logits.shape == (2, 9, family.logits_width)
    assert expected.abs().max() > 1.0  # the weights are large enough for the comparison to mean something
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=1e-5)


def test_llada_include_bias_options_add_the_biases_the_reference_expects() -> None:
    # Not used by the LLaDA checkpoints, but part of the OLMo format: q/k/v biases with include_qkv_bias,
    # biases on every linear layer (LM head included) with include_bias; never on the norms.
    for options, biased in [
        ({"include_qkv_bias": True}, {"q_proj", "k_proj", "v_proj"}),
        ({"include_bias": True}, {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"}),
    ]:
        model = tiny_model(FAMILIES["llada"], **options)
        names = {n.split(".")[-2] for n in model.state_dict() if n.endswith(".bias") and ".blocks.0." in n}
        assert names == biased
        assert ("model.transformer.ff_out.bias" in model.state_dict()) == options.get("include_bias", False)
        ids, mask, positions = padded_batch()
        expected = llada_reference(model.state_dict(), TINY_LLADA_CONFIG, ids, mask.bool(), positions)
        torch.testing.assert_close(logits_of(model, ids, mask, positions).double(), expected, atol=1e-5, rtol=1e-5)


def test_inputs_embeds_give_the_same_logits_as_input_ids(family: Family) -> None:
    model = tiny_model(family)
    ids, mask, positions = padded_batch()
    with torch.no_grad():
        from_embeds = model(
            inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, position_ids=positions
        )
    torch.testing.assert_close(from_embeds.logits, logits_of(model, ids, mask, positions), atol=0, rtol=0)


def test_an_all_padding_row_attends_everywhere_instead_of_nowhere() -> None:
    # Some SDPA backends return NaN for a query with no visible key (CPU returns zeros, so the end-to-end
    # test below cannot tell); the mask builder must therefore never produce such a row.
    embeds = torch.zeros(2, 4, 64)
    padding = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    for attn in ("sdpa", "eager"):
        config = make_config(TINY_LLADA_CONFIG)
        config._attn_implementation = attn
        mask = bidirectional_attention_mask(config, embeds, padding)
        visible = mask if mask.dtype == torch.bool else mask == 0  # eager: additive 0 / -inf-like mask
        assert visible.shape == (2, 1, 4, 4)
        assert visible[0, 0, :, :2].all() and not visible[0, 0, :, 2:].any()  # padding keys hidden
        assert visible[1].all()  # the all-padding row sees every key
    config._attn_implementation = "sdpa"
    # No padding: no mask at all (SDPA's fast path), which is why the layers must not default to causal.
    assert bidirectional_attention_mask(config, embeds, torch.ones(2, 4)) is None


def test_default_position_ids_count_from_zero(family: Family) -> None:
    model = tiny_model(family)
    ids, _, _ = padded_batch()
    arange = torch.arange(ids.shape[1]).expand_as(ids)
    torch.testing.assert_close(logits_of(model, ids), logits_of(model, ids, positions=arange), atol=0, rtol=0)
    # RoPE only sees relative positions: shifting all of them changes nothing, stretching them does.
    torch.testing.assert_close(logits_of(model, ids, positions=arange + 3), logits_of(model, ids))
    assert not torch.allclose(logits_of(model, ids), logits_of(model, ids, positions=2 * arange), atol=1e-3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_is_bidirectional(family: Family, attn: str) -> None:
    # Without padding SDPA gets no mask at all, so this catches an attention layer left with is_causal=True.
    model = tiny_model(family, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    ids, _, _ = padded_batch()
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % VOCAB
    before, after = logits_of(model, ids), logits_of(model, changed)
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-3  # the first position sees the last token


def test_padding_keys_are_ignored(family: Family) -> None:
    model = tiny_model(family)
    ids, mask, positions = padded_batch(pad=3)
    real = ids[1:, 3:]
    alone = logits_of(model, real)  # the same tokens, unpadded, positions 0..5
    padded = logits_of(model, ids, mask, positions)[1:, 3:]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    other_pads = ids.clone()
    other_pads[1, :3] = torch.tensor([5, 6, 7])
    torch.testing.assert_close(logits_of(model, other_pads, mask, positions)[1:, 3:], alone, atol=1e-5, rtol=1e-5)
    # Sanity: with the padding attended to, the same row gives different logits.
    assert not torch.allclose(logits_of(model, ids, None, positions)[1:, 3:], alone, atol=1e-3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_all_padding_row_stays_finite(family: Family, attn: str) -> None:
    model = tiny_model(family, attn_implementation=attn).train()
    ids, mask, positions = padded_batch()
    mask[1] = 0
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(logits).all()
    logits[0].logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sdpa_and_eager_give_the_same_logits(family: Family) -> None:
    sdpa = tiny_model(family, attn_implementation="sdpa")
    eager = tiny_model(family, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    ids, mask, positions = padded_batch()
    torch.testing.assert_close(logits_of(eager, ids, mask, positions), logits_of(sdpa, ids, mask, positions))
    torch.testing.assert_close(logits_of(eager, ids), logits_of(sdpa, ids))


def test_gradient_checkpointing_gives_the_same_gradients(family: Family) -> None:
    ids, mask, positions = padded_batch()
    targets = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(3))

    def gradients(model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], int]:
        calls = []
        first_linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        hook = first_linear.register_forward_hook(lambda *_: calls.append(1))
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        (loss * mask.flatten()).sum().backward()
        hook.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain = tiny_model(family).train()
    checkpointed = tiny_model(family).train()
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    plain_grads, plain_calls = gradients(plain)
    ckpt_grads, ckpt_calls = gradients(checkpointed)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the first block really was recomputed in the backward pass
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_peft_lora_wrapper_runs_and_trains_through_checkpointing(family: Family) -> None:
    # PEFT forwards HF-style kwargs (return_dict, output_attentions, ...): they must be accepted and ignored.
    model = tiny_model(family)
    ids, mask, positions = padded_batch()
    base = logits_of(model, ids, mask, positions)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        wrapped = peft_model(
            input_ids=ids, attention_mask=mask, position_ids=positions, return_dict=True, output_attentions=False
        ).logits
    torch.testing.assert_close(wrapped, base, atol=0, rtol=0)  # LoRA starts as the identity (B = 0)
    peft_model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    peft_model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.square().mean().backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


def test_save_pretrained_round_trip(family: Family, tmp_path: Path) -> None:
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == {"llada": "llada", "dream": "Dream"}[family.name]
    assert saved["architectures"] == [family.model_cls.__name__]
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(loaded) is family.model_cls
    ids, mask, positions = padded_batch()
    torch.testing.assert_close(logits_of(loaded, ids, mask, positions), logits_of(model, ids, mask, positions))
    assert loaded.config.mask_token_id == VOCAB - 1 and loaded.config.eos_token_id == 1
    assert loaded.config.pad_token_id == 1


def test_tied_head_is_the_embedding_and_survives_save_load(family: Family, tmp_path: Path) -> None:
    model = tiny_model(family, **{family.tie_key: True})
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embedding.weight
    untied = sum(p.numel() for p in tiny_model(family).parameters())
    assert sum(p.numel() for p in model.parameters()) == untied - head.weight.numel()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(family.shapes({**family.tiny, family.tie_key: True}))  # no head tensor
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    ids, mask, positions = padded_batch()
    torch.testing.assert_close(logits_of(loaded, ids, mask, positions), logits_of(model, ids, mask, positions))


def test_checkpoint_in_the_official_layout_loads_without_remote_code(family: Family, tmp_path: Path) -> None:
    # Weights built by hand under the official names, written as two safetensors shards with an index,
    # next to a config.json in the official key style (auto_map included).
    generator = torch.Generator().manual_seed(7)
    shapes = family.shapes(family.tiny)
    state = {name: random_tensor(name, shape, generator) for name, shape in shapes.items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(family.tiny))

    model, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model) is family.model_cls
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for name, tensor in state.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    ids, mask, positions = padded_batch()
    expected = family.reference(state, family.tiny, ids, mask.bool(), positions)
    torch.testing.assert_close(logits_of(model.eval(), ids, mask, positions).double(), expected, atol=1e-5, rtol=1e-5)
    # AutoModel resolves to our class too, although the config's auto_map points at remote code.
    assert type(AutoModel.from_pretrained(tmp_path)) is family.model_cls


def test_dream_forward_is_unshifted_and_align_logits_shifts_by_one() -> None:
    raw = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    aligned = align_logits(raw)
    assert aligned.shape == raw.shape
    torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])  # position i now holds the raw output at i-1
    torch.testing.assert_close(aligned[:, 0], raw[:, 0])  # position 0 reuses its own output
    # The model itself does not shift: its logits are the reference's unshifted ones (checked exactly above);
    # here, the last raw position still depends on the last token, which a shifted forward would drop.
    model = tiny_model(FAMILIES["dream"])
    ids, _, _ = padded_batch()
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % VOCAB
    assert not torch.allclose(logits_of(model, ids)[:, -1], logits_of(model, changed)[:, -1], atol=1e-3)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("block_type", "sequential"),
        ("block_group_size", 2),
        ("activation_type", "swiglu"),
        ("activation_type", "gelu"),
        ("layer_norm_type", "default"),
        ("layer_norm_with_affine", False),
        ("attention_layer_norm", True),
        ("alibi", True),
        ("rope", False),
        ("scale_logits", True),
        ("input_emb_norm", True),
        ("multi_query_attention", True),
        ("bias_for_layer_norm", True),
        ("residual_dropout", 0.1),
        ("embedding_dropout", 0.1),
        ("clip_qkv", 8.0),
        ("rope_scaling_factor", 2.0),
        ("n_kv_heads", 3),
    ],
)
def test_unsupported_llada_options_raise_value_error_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key):
        make_config(TINY_LLADA_CONFIG, **{key: value})


def test_unsupported_options_are_refused_on_load_and_on_model_build(tmp_path: Path) -> None:
    # Through a config.json, as the checkpoint loader meets it: still a plain ValueError.
    (tmp_path / "config.json").write_text(json.dumps({**TINY_LLADA_CONFIG, "alibi": True}))
    with pytest.raises(ValueError, match="alibi"):
        AutoConfig.from_pretrained(tmp_path)
    # include_bias with bias_for_layer_norm=None would put a bias on the norms (OLMo's fallback rule).
    with pytest.raises(ValueError, match="bias_for_layer_norm"):
        make_config(TINY_LLADA_CONFIG, include_bias=True, bias_for_layer_norm=None)
    config = make_config(TINY_LLADA_CONFIG)
    config.block_type = "sequential"  # edited after construction
    with pytest.raises(ValueError, match="block_type"):
        AutoModelForMaskedLM.from_config(config)
    with pytest.raises(ValueError, match="use_sliding_window"):
        make_config(TINY_DREAM_CONFIG, use_sliding_window=True)


def test_llada_config_reads_standard_names_and_yaml_ints() -> None:
    config = LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=None, n_layers=2, mlp_hidden_size=None, rope_theta=10000)
    assert (config.n_kv_heads, config.mlp_hidden_size) == (4, 4 * 64)  # OLMo's derivations
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    config.hidden_size = 128
    assert config.d_model == 128
    # the keyword names the model adapter uses
    built = AutoConfig.for_model("llada", d_model=32, n_heads=2, n_layers=1, vocab_size=50, embedding_size=50)
    assert (built.hidden_size, built.num_hidden_layers, built.vocab_size) == (32, 1, 50)
    assert built.num_key_value_heads == 2  # n_kv_heads defaults to n_heads


def test_bf16_forward_is_close_to_float32(family: Family) -> None:
    model = tiny_model(family)
    half = copy.deepcopy(model).to(torch.bfloat16)
    rotary = half.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32  # RoPE frequencies are not rounded by the cast
    torch.testing.assert_close(rotary.inv_freq, model.model.rotary_emb.inv_freq, atol=0, rtol=0)
    ids, mask, positions = padded_batch()
    reference = logits_of(model, ids, mask, positions)
    low = logits_of(half, ids, mask, positions)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    error = (low.float() - reference).abs().max() / reference.abs().max()
    assert error < 0.05, float(error)
