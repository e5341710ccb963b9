"""The Policy: a masked-diffusion network plus its tokenizer, behind one `logits` call.

Samplers and estimators only ever call ``policy.logits(input_ids, attention_mask, position_ids)``
and read ``mask_id``; which network sits behind it (the embedded tiny model, a local checkpoint, a
DeepSpeed engine wrapping either) is the model loader's business. Objectives that need π_ref call
``reference_logits`` (after ``attach_reference``), and wrap every no-grad scoring forward in
``scoring()`` so dropout never adds noise to cached scores (docs/ARCHITECTURE.md, "Decisions worth
knowing": reference policy, dropout).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerBase

from dllm_rl.config import LoraCfg, ModelCfg
from dllm_rl.errors import ConfigError
from dllm_rl.kv_cache import WindowKVCache, windowed_logits
from dllm_rl.models import loading
from dllm_rl.models.char_tokenizer import build_char_tokenizer
from dllm_rl.models.families import Family, family_of_model_type, get_family
from dllm_rl.positions import position_ids_from_attention_mask


class Policy:
    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: Family | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # The family adapter: how this architecture's raw outputs become "position i predicts token i".
        self.family = family or family_of_model_type(model.config.model_type)
        self.forward_module: torch.nn.Module = model  # replaced by the DeepSpeed engine for training
        if tokenizer.mask_token_id is None:
            raise ConfigError("the tokenizer has no mask token (set mask_token when saving it)")
        self.mask_id = int(tokenizer.mask_token_id)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.mask_id
        # π_ref is either a frozen copy of the starting network or, for a PEFT model, the policy
        # network itself with its adapter switched off.
        self._reference_copy: torch.nn.Module | None = None
        self._reference_adapter_off = False

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        kv_cache: WindowKVCache | None = None,
        window: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """[B, T, V] logits, position i predicting token i (the family's alignment applied once, here).

        With a ``kv_cache`` (dllm_rl/kv_cache.py) and no ``window`` the full forward also fills the
        cache; with ``window=(start, end)`` only those positions of ``input_ids`` are run against the cached
        keys/values of the others, and the result is their [B, end - start, V] logits.
        """
        if kv_cache is None:
            out = self.forward_module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            return self.family.align_logits(out.logits)
        if position_ids is None:
            position_ids = position_ids_from_attention_mask(attention_mask)

        def forward(ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, cache: WindowKVCache) -> torch.Tensor:
            return self.forward_module(input_ids=ids, attention_mask=attn, position_ids=pos, kv_cache=cache).logits

        logits = windowed_logits(forward, input_ids, attention_mask, position_ids, kv_cache, window, self.family.shift)
        return self.family.align_logits(logits) if window is None else logits

    @contextlib.contextmanager
    def scoring(self) -> Iterator[None]:
        """No gradients and dropout off for the duration; every module's train/eval flag is restored after."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, training in modes:
                module.training = training

    @property
    def has_reference(self) -> bool:
        return self._reference_adapter_off or self._reference_copy is not None

    def attach_reference(self) -> None:
        """Make π_ref available to ``reference_logits``: the starting network, frozen, never synced.

        Call before handing the model to DeepSpeed so a copy never reaches the optimizer. A PEFT model
        needs no copy: its base weights with the adapter switched off are the reference. Idempotent.
        """
        if self.has_reference:
            return
        if _is_peft(self.model):
            self._reference_adapter_off = True
            return
        reference = copy.deepcopy(self.model)
        reference.eval()
        reference.requires_grad_(False)
        self._reference_copy = reference

    def reference_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, T, V] logits of π_ref (no gradients, dropout off), position i predicting token i."""
        if not self.has_reference:
            raise RuntimeError("reference_logits: no reference policy; call Policy.attach_reference() first")
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self._reference_adapter_off:
            # Through forward_module like every policy forward: a DeepSpeed engine wraps the module's
            # forward in its own set-up (ZeRO-3 parameter fetch and release, autocast).
            with self.scoring(), self.model.disable_adapter():
                return self.family.align_logits(self.forward_module(**kwargs).logits)
        with torch.no_grad():
            return self.family.align_logits(self._reference_copy(**kwargs).logits)

    def apply_lora(self, lora: LoraCfg, quantized: bool = False, seed: int = 0) -> None:
        """Wrap the network in a fresh PEFT LoRA adapter (model.lora); only the adapter trains.

        The adapter's random initialisation (PEFT draws its A matrices from torch's global generator)
        is drawn under ``seed`` (the run's seed), so that two runs of one configuration start from the
        same adapter; the global generator is left as it was. Call before ``attach_reference`` and
        DeepSpeed: π_ref is then the same weights with the adapter switched off, with no second copy.
        """
        from peft import get_peft_model, prepare_model_for_kbit_training

        if _is_peft(self.model):
            raise ConfigError("model.lora.enabled: the policy already carries an adapter (model.adapter)")
        if quantized:
            self.model = prepare_model_for_kbit_training(self.model, use_gradient_checkpointing=False)
        # torch.manual_seed seeds the CPU and every CUDA device: fork (and so restore) all of them
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(seed)
            self.model = get_peft_model(self.model, loading.lora_config(self.family, lora))
        self.forward_module = self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render_prompts(self, prompts: list[str], chat: bool = False, prefill: str = "") -> list[str]:
        """The model-input texts: prompts as they are, or (``chat``) each one as the user message of the
        tokenizer's chat template with the generation prompt; ``prefill`` follows either."""
        if not chat:
            return [p + prefill for p in prompts]
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                "task.prompt_style=chat needs a tokenizer with a chat template, and this model's has none "
                "(use task.prompt_style=compact, or a checkpoint whose tokenizer_config.json or chat_template.jinja "
                "holds one)"
            )
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            + prefill
            for p in prompts
        ]

    def encode_prompts(
        self, prompts: list[str], chat: bool = False, prefill: str = "", max_tokens: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask on the policy's device (see render_prompts).

        ``max_tokens`` keeps the last tokens of longer prompts (left truncation, the reference's cap).
        """
        texts = self.render_prompts(prompts, chat, prefill)
        # A chat template writes its own BOS; adding special tokens again would double it.
        rows = self.tokenizer(texts, add_special_tokens=not chat)["input_ids"]
        if max_tokens is not None:
            rows = [row[-max_tokens:] for row in rows]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every completion starts at the same column
            if row:
                ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                attention[i, width - len(row) :] = 1
        return ids.to(self.device), attention.to(self.device)

    def prompt_lengths(self, prompts: list[str], chat: bool = False, prefill: str = "") -> list[int]:
        """Token count of each rendered prompt (for task.max_prompt_tokens)."""
        texts = self.render_prompts(prompts, chat, prefill)
        return [len(row) for row in self.tokenizer(texts, add_special_tokens=not chat)["input_ids"]]

    def decode(self, completion_ids: torch.Tensor) -> list[str]:
        """Completion texts: everything before the first EOS, special tokens dropped."""
        rows = completion_ids.tolist()
        if self.eos_id is not None:
            rows = [row[: row.index(self.eos_id)] if self.eos_id in row else row for row in rows]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def save(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """save_pretrained for the network and the tokenizer, loadable again with model.path.

        ``state_dict`` replaces the module's own tensors (needed when ZeRO-3 has partitioned them).
        A LoRA policy saves its adapter only (adapter_config.json names the base checkpoint); a base
        that exists on no disk (a random initialisation) is saved beside it in ``base/``.
        """
        directory = Path(directory)
        self.model.save_pretrained(directory, state_dict=state_dict)
        self.tokenizer.save_pretrained(directory)
        if _is_peft(self.model):
            base = self.model.get_base_model()
            origin = getattr(base, "name_or_path", "") or ""
            if not (origin and (Path(origin) / "config.json").is_file()):
                # The wrapped base's modules carry the adapter; keep the base tensors under their own names.
                source = state_dict if state_dict is not None else self.model.state_dict()
                weights = {
                    k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
                    for k, v in source.items()
                    if "lora_" not in k
                }
                base.save_pretrained(directory / loading.EMBEDDED_BASE, state_dict=weights)
                self.tokenizer.save_pretrained(directory / loading.EMBEDDED_BASE)


def _is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def build_tiny(m: ModelCfg, alphabet: str, seed: int) -> Policy:
    """A freshly initialised network of the model section's family (tiny, llada or dream) and size, with a
    character tokenizer over ``alphabet`` that carries the family's special tokens and chat template."""
    family = get_family(m.family.value)
    tokenizer = build_char_tokenizer(alphabet, family.specials)
    config = family.random_config(m, tokenizer)
    attn = m.attn_implementation.value
    # Initialise under a private RNG so building a model never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForMaskedLM.from_config(config, attn_implementation=attn if family.name != "tiny" else None)
    return Policy(model.to(loading.dtype_of(m.dtype)), tokenizer, family)


def load_pretrained(
    path: str | os.PathLike,
    dtype: str = "float32",
    *,
    attn_implementation: str = "sdpa",
    quantization: str = "none",
    chat_template: str = "family",
    adapter: str | os.PathLike | None = None,
    trainable: bool = False,
) -> Policy:
    """A policy from local disk only: a save_pretrained / official checkpoint directory (config.json,
    weights, tokenizer), or an adapter directory (adapter_config.json) on top of the base it names.

    ``adapter`` puts a saved LoRA adapter on the loaded base (``trainable``: keep training it).
    Everything is checked first and reported naming the file and key (see models/loading.py).
    """
    p = Path(os.path.expanduser(str(path)))
    if not (p / "config.json").is_file() and (p / loading.ADAPTER_CONFIG).is_file():
        if adapter is not None:
            raise ConfigError(f"model.path={p} is itself an adapter directory; do not also give model.adapter")
        adapter, p = p, loading.adapter_base(p)
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"model.path={p}: no config.json (expected a save_pretrained or official checkpoint directory)"
        )
    model, family = loading.load_model(p, dtype, attn_implementation, quantization)
    tokenizer_dir = Path(adapter) if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file() else p
    tokenizer = loading.load_tokenizer(tokenizer_dir, model.config, family, chat_template)
    if adapter is not None:
        from peft import PeftModel

        a = Path(os.path.expanduser(str(adapter)))
        if not (a / loading.ADAPTER_CONFIG).is_file():
            raise ConfigError(f"model.adapter={a}: no {loading.ADAPTER_CONFIG} (expected a saved PEFT adapter)")
        try:
            model = PeftModel.from_pretrained(model, a, is_trainable=trainable, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(
                f"model.adapter={a}: cannot load the adapter onto {p}: {loading.first_line(exc)}"
            ) from None
    return Policy(model, tokenizer, family)


def load_from_config(path: str | os.PathLike, m: ModelCfg, trainable: bool = False) -> Policy:
    """load_pretrained with the loading options of the model section (model.*)."""
    return load_pretrained(
        path,
        m.dtype,
        attn_implementation=m.attn_implementation.value,
        quantization=m.quantization.value,
        chat_template=m.chat_template.value,
        adapter=m.adapter,
        trainable=trainable,
    )
