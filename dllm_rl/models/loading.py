"""Loading checkpoints from local directories: checks first, then weights-only deserialisation.

A user's checkpoint directory is untrusted input, and an 8B load takes minutes, so everything that
can be checked cheaply is checked before any tensor is read, and each problem is reported as one
message naming the file and the key:

* config.json must parse and name a supported ``model_type``;
* every shard the index (model.safetensors.index.json) names must exist;
* the tensor names and shapes in the weight files (safetensors headers; .bin files through
  ``torch.load(weights_only=True)`` onto the meta device) must be exactly the ones the config
  implies — a config that does not match its weights would otherwise load with randomly
  initialised layers and a warning;
* the tokenizer must give a mask token (from its own files or the config's ``mask_token_id``).

Weights are then loaded with ``from_pretrained(weights_only=True)``: a pickle can only ever produce
tensors, never run code. ``trust_remote_code`` is never used: the architectures are our own.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dllm_rl.config import LoraCfg
from dllm_rl.errors import ConfigError
from dllm_rl.models.families import Family, family_of_model_type

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
# Where an adapter saved from a policy with no on-disk base keeps that base (relative to the adapter).
EMBEDDED_BASE = "base"


def first_line(exc: BaseException) -> str:
    """A library exception as one line for a user-facing message (its first line, or its type)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def dtype_of(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ConfigError(f"model.dtype={name!r} must be float32, bfloat16 or float16") from None


def read_json(path: Path, field: str = "model.path") -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{field}={path.parent}: {path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{field}={path.parent}: {path.name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{field}={path.parent}: {path.name} must hold a JSON object")
    return data


def checkpoint_family(path: Path) -> tuple[dict[str, Any], Family]:
    """The parsed config.json and the family its model_type belongs to."""
    config = read_json(path / "config.json")
    if "model_type" not in config:
        raise ConfigError(f"model.path={path}: config.json has no key 'model_type'")
    return config, family_of_model_type(str(config["model_type"]), where=f"model.path={path}: config.json")


def weight_files(path: Path) -> dict[str, list[str]]:
    """file name -> the tensor names it should hold, from the shard index or the single weight file.

    A single file maps to an empty list (its header is the only list of names).
    """
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (path / index_name).is_file():
            index = read_json(path / index_name)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConfigError(f"model.path={path}: {index_name} has no 'weight_map' object")
            files: dict[str, list[str]] = {}
            for key, file in weight_map.items():
                files.setdefault(str(file), []).append(str(key))
            for file, keys in files.items():
                if not (path / file).is_file():
                    raise ConfigError(
                        f"model.path={path}: weight shard {file} is missing ({index_name} maps {len(keys)} "
                        f"tensors to it, e.g. {keys[0]!r})"
                    )
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return {single: []}
    raise ConfigError(
        f"model.path={path}: no weights (expected model.safetensors, {SAFE_INDEX} with its shards, "
        "or pytorch_model.bin)"
    )


def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape without reading tensor data (safetensors header; .bin onto the meta device)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        state = torch.load(file, map_location="meta", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing error
        first = first_line(exc)
        raise ConfigError(f"model.path={file.parent}: cannot read {file.name}: {first}") from None
    if not isinstance(state, Mapping):
        raise ConfigError(f"model.path={file.parent}: {file.name} does not hold a state dict")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_weights_match_config(path: Path, config: Any) -> None:
    """Names and shapes in the weight files equal those the config implies (tied weights may be absent)."""
    from transformers import AutoModelForMaskedLM

    with torch.device("meta"):
        skeleton = AutoModelForMaskedLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = set(getattr(skeleton, "all_tied_weights_keys", {}) or {})
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for file, listed in weight_files(path).items():
        shapes = _file_shapes(path / file)
        for key in listed:
            if key not in shapes:
                raise ConfigError(
                    f"model.path={path}: {file} lacks tensor {key!r}, which the shard index assigns to it"
                )
        for key, shape in shapes.items():
            found[key] = (shape, file)
    for key, (shape, file) in sorted(found.items()):
        if key not in expected:
            raise ConfigError(
                f"model.path={path}: {file} holds {key!r}, which the architecture in config.json does not have "
                "(config.json does not match the weights: check n_layers / num_hidden_layers and the model_type)"
            )
        if shape != expected[key]:
            raise ConfigError(
                f"model.path={path}: {file}: {key!r} has shape {list(shape)} but config.json implies "
                f"{list(expected[key])} (config.json does not match the weights)"
            )
    missing = sorted(k for k in expected if k not in found and k not in tied)
    if missing:
        raise ConfigError(
            f"model.path={path}: the weights lack {len(missing)} tensors config.json implies, e.g. {missing[0]!r} "
            "(a shard is incomplete, or config.json does not match the weights)"
        )


def quantization_config(kind: str, dtype: torch.dtype) -> Any:
    """bitsandbytes NF4 (double quantisation, compute in ``dtype``) or None; needs a GPU and bitsandbytes."""
    if kind == "none":
        return None
    if kind != "nf4":
        raise ConfigError(f"model.quantization={kind!r} must be none or nf4")
    if not torch.cuda.is_available():
        raise ConfigError("model.quantization=nf4 needs a CUDA GPU (bitsandbytes 4-bit kernels); use none on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantization=nf4 needs the bitsandbytes package (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


def load_model(
    path: Path, dtype: str = "float32", attn_implementation: str = "sdpa", quantization: str = "none"
) -> tuple[Any, Family]:
    """The checked network of a save_pretrained / official checkpoint directory, and its family."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    import dllm_rl.models  # noqa: F401  (registers our architectures with the Auto classes)

    raw, family = checkpoint_family(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = first_line(exc)
        raise ConfigError(
            f"model.path={path}: config.json is not a valid {raw['model_type']} config: {first}"
        ) from None
    check_weights_match_config(path, config)
    torch_dtype = dtype_of(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True, "weights_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quant = quantization_config(quantization, torch_dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = first_line(exc)
        raise ConfigError(f"model.path={path}: cannot load the weights: {first}") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in (info.get(kind) or ()))
        if keys:  # the precheck should have caught these; never train a silently re-initialised layer
            raise ConfigError(f"model.path={path}: loading reported {kind} {keys[:3]} (config.json vs weights)")
    return model, family


def patch_tokenizer(tokenizer: Any, config: Any, family: Family, chat_template: str, where: str) -> Any:
    """Mask and EOS tokens from the tokenizer, else from config.json; the family's fixed chat template.

    ``chat_template``: ``family`` installs the family's fixed template where it has one (LLaDA),
    ``tokenizer`` keeps whatever the checkpoint's tokenizer carries.
    """
    config_mask = getattr(config, "mask_token_id", None)
    if tokenizer.mask_token_id is None:
        if config_mask is None:
            raise ConfigError(
                f"{where}: no mask token: the tokenizer files (tokenizer_config.json) set no 'mask_token' and "
                "config.json has no 'mask_token_id'"
            )
        token = tokenizer.convert_ids_to_tokens(int(config_mask))
        if token is None or tokenizer.convert_tokens_to_ids(token) != int(config_mask):
            raise ConfigError(
                f"{where}: config.json 'mask_token_id'={config_mask} is not a token of the tokenizer "
                f"(vocabulary of {len(tokenizer)})"
            )
        tokenizer.mask_token = token
    elif config_mask is not None and int(config_mask) != tokenizer.mask_token_id:
        raise ConfigError(
            f"{where}: tokenizer_config.json 'mask_token' {tokenizer.mask_token!r} has id {tokenizer.mask_token_id} "
            f"but config.json 'mask_token_id' is {config_mask}"
        )
    if tokenizer.eos_token_id is None and getattr(config, "eos_token_id", None) is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(config.eos_token_id))
    if chat_template not in ("family", "tokenizer"):
        raise ConfigError(f"model.chat_template={chat_template!r} must be family or tokenizer")
    if chat_template == "family" and family.chat_template is not None:
        tokenizer.chat_template = family.chat_template
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(path: Path, config: Any, family: Family, chat_template: str = "family") -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = first_line(exc)
        raise ConfigError(
            f"model.path={path}: cannot load the tokenizer (expected tokenizer.json or tokenizer_config.json "
            f"with its vocabulary files): {first}"
        ) from None
    return patch_tokenizer(tokenizer, config, family, chat_template, f"model.path={path}")


def lora_config(family: Family, lora: LoraCfg) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=family.lora_target_regex(list(lora.target_modules)),
        bias="none",
    )


def adapter_base(adapter_dir: Path) -> Path:
    """The base checkpoint an adapter directory was trained on (its adapter_config.json names it)."""
    cfg = read_json(adapter_dir / ADAPTER_CONFIG, field="adapter")
    if (adapter_dir / EMBEDDED_BASE / "config.json").is_file():
        return adapter_dir / EMBEDDED_BASE
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(
            f"adapter={adapter_dir}: {ADAPTER_CONFIG} has no 'base_model_name_or_path'; give the base with model.path"
        )
    candidate = Path(os.path.expanduser(str(base)))
    if not candidate.is_absolute():
        candidate = adapter_dir / candidate
    if not (candidate / "config.json").is_file():
        raise ConfigError(
            f"adapter={adapter_dir}: {ADAPTER_CONFIG} 'base_model_name_or_path'={base!r} is not a local checkpoint "
            "directory (give the base with model.path)"
        )
    return candidate
