"""The model families through the user's path: tiny configs, save_pretrained round trips, the family
adapter (Dream's shift, LLaDA's chat template), LoRA (targets, reference, save / load / merge), and
one clear error for each kind of bad checkpoint directory."""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
from pathlib import Path

import pytest
import torch
from forked import run_module
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from dllm_rl.config import LoraCfg, ModelCfg, validate
from dllm_rl.errors import ConfigError
from dllm_rl.merge import main as merge_main
from dllm_rl.models.families import LLADA_CHAT_TEMPLATE, get_family
from dllm_rl.models.policy import build_tiny, load_pretrained
from dllm_rl.schema import typed
from tests.test_config import _compose
from tests.test_e2e import FAST, REPO, _one_clear_line, run_cli

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz .,:\n<>/"
FAMILY_CONFIGS = {"tiny": "tiny", "llada": "tiny_llada", "dream": "tiny_dream"}


@functools.cache
def _composed_model(name: str, lora: str) -> str:
    return OmegaConf.to_yaml(_compose(f"model={name}", f"model/lora={lora}").model, resolve=True)


def model_cfg(name: str, **overrides) -> ModelCfg:
    """A model config group as Hydra composes it (the named option over its schema, lora from lora/none)."""
    cfg = typed(ModelCfg, OmegaConf.create(_composed_model(name, "none")), "model")
    return dataclasses.replace(cfg, **overrides)


def small_lora(**overrides) -> LoraCfg:
    lora = typed(LoraCfg, OmegaConf.create(_composed_model("tiny", "paper")).lora, "model.lora")
    return dataclasses.replace(lora, **{"r": 4, "alpha": 8.0, "dropout": 0.0, **overrides})


def inputs(policy, batch: int = 2, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    low = len(policy.family.specials.tokens)
    ids = torch.randint(low, len(policy.tokenizer), (batch, length), generator=g)
    ids[:, -3:] = policy.mask_id
    return ids, torch.ones_like(ids)


def policy_of(family: str, seed: int = 0):
    policy = build_tiny(model_cfg(FAMILY_CONFIGS[family]), ALPHABET, seed)
    policy.model.eval()
    return policy


def perturb_lora(policy) -> None:
    """lora_B starts at zero (the adapter is a no-op); give it weight so the adapter changes outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", ["tiny", "llada", "dream"])
def test_tiny_config_round_trips_through_the_checkpoint_path(family, tmp_path):
    policy = policy_of(family)
    ids, attention = inputs(policy)
    with torch.no_grad():
        before = policy.logits(ids, attention)
    policy.save(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] in get_family(family).model_types
    loaded = load_pretrained(tmp_path / "ckpt")
    loaded.model.eval()
    assert type(loaded.model) is type(policy.model) and loaded.family.name == family
    assert (loaded.mask_id, loaded.eos_id) == (policy.mask_id, policy.eos_id)
    assert loaded.tokenizer.mask_token == get_family(family).specials.mask
    with torch.no_grad():
        assert torch.equal(loaded.logits(ids, attention), before)


def test_dream_policy_logits_undo_the_shift_once():
    policy = policy_of("dream")
    ids, attention = inputs(policy)
    with torch.no_grad():
        raw = policy.model(input_ids=ids, attention_mask=attention).logits
        aligned = policy.logits(ids, attention)
    # position i reads the raw output at i - 1; position 0 reuses its own
    assert torch.equal(aligned[:, 1:], raw[:, :-1]) and torch.equal(aligned[:, 0], raw[:, 0])
    assert not torch.equal(aligned, raw)
    llada = policy_of("llada")
    ids, attention = inputs(llada)
    with torch.no_grad():
        assert torch.equal(llada.logits(ids, attention), llada.model(input_ids=ids, attention_mask=attention).logits)


def test_llada_chat_template_is_the_papers_prompt(tmp_path):
    policy = policy_of("llada")
    text = policy.render_prompts(["  Solve 2+3.\n"], chat=True, prefill="<reasoning>")[0]
    expected = (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nSolve 2+3.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<reasoning>"
    )
    assert text == expected
    # the fixed template replaces whatever a checkpoint's tokenizer carries, unless asked not to
    policy.tokenizer.chat_template = "{{ messages[0]['content'] }}"
    policy.save(tmp_path / "ckpt")
    assert load_pretrained(tmp_path / "ckpt").tokenizer.chat_template == LLADA_CHAT_TEMPLATE
    kept = load_pretrained(tmp_path / "ckpt", chat_template="tokenizer")
    assert kept.render_prompts(["hi"], chat=True) == ["hi"]


def test_dream_keeps_its_tokenizers_template():
    policy = policy_of("dream")
    text = policy.render_prompts(["hi"], chat=True)[0]
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids, _ = policy.encode_prompts(["hi"], chat=True)
    assert policy.tokenizer.convert_tokens_to_ids("<|im_start|>") in ids[0].tolist()  # one token, not characters


# -------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_lora_targets_the_papers_matrices_inside_the_layers_only(family):
    policy = policy_of(family)
    policy.apply_lora(small_lora())
    adapted = sorted(n.removesuffix(".lora_A") for n, _ in policy.model.named_modules() if n.endswith(".lora_A"))
    layers = policy.model.config.num_hidden_layers
    assert len(adapted) == 7 * layers
    leaves = {n.rsplit(".", 1)[-1] for n in adapted}
    if family == "llada":
        # OLMo names: o = attn_out, gate = ff_proj, down = ff_out; the LM head is also called ff_out
        assert leaves == {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"}
        assert all(".blocks." in n for n in adapted)
    else:
        assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert all(".layers." in n for n in adapted)
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_initialisation_follows_the_run_seed_and_leaves_the_global_generator_alone():
    """Two runs of one configuration start from the same adapter (PEFT draws A from torch's global
    generator, which the run does not otherwise seed at that point); another seed gives another one."""

    calls = []

    def adapter(seed):
        policy = policy_of("tiny")
        calls.append(seed)
        torch.manual_seed(1000 + len(calls))  # whatever state the process happens to be in
        state = torch.random.get_rng_state()
        policy.apply_lora(small_lora(), seed=seed)
        assert torch.equal(torch.random.get_rng_state(), state)
        return {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_A" in n}

    first, again, other = adapter(0), adapter(0), adapter(1)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


@pytest.mark.parametrize("family", ["tiny", "llada", "dream"])
def test_lora_reference_save_load_and_merge(family, tmp_path):
    policy = policy_of(family)
    ids, attention = inputs(policy)
    with torch.no_grad():
        base = policy.logits(ids, attention)
    params_before = sum(p.numel() for p in policy.model.parameters())
    policy.apply_lora(small_lora())
    perturb_lora(policy)
    policy.attach_reference()
    with torch.no_grad():
        adapted = policy.logits(ids, attention)
        reference = policy.reference_logits(ids, attention)
    assert not torch.allclose(adapted, base)
    assert torch.allclose(reference, base, atol=1e-6)  # π_ref = the adapter switched off
    assert policy._reference_copy is None  # no second copy of the weights
    assert sum(p.numel() for p in policy.model.parameters()) > params_before

    # a random-init base lives on no disk: the adapter directory carries it in base/
    policy.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "config.json").exists()
    adapter_tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter_tensors and all("lora_" in k for k in adapter_tensors)
    reloaded = load_pretrained(tmp_path / "adapter")
    reloaded.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded.logits(ids, attention), adapted, atol=1e-6)

    assert merge_main([str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = load_pretrained(tmp_path / "merged")
    merged.model.eval()
    assert sum(p.numel() for p in merged.model.parameters()) == params_before
    with torch.no_grad():
        assert torch.allclose(merged.logits(ids, attention), adapted, atol=1e-5)
    # merging never overwrites
    assert merge_main([str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2

    # an adapter on a base that exists on disk names it instead of copying it
    policy_of(family).save(tmp_path / "base")
    on_disk = load_pretrained(tmp_path / "base")
    on_disk.apply_lora(small_lora())
    on_disk.save(tmp_path / "adapter2")
    assert not (tmp_path / "adapter2" / "base").exists()
    assert Path(json.loads((tmp_path / "adapter2" / "adapter_config.json").read_text())["base_model_name_or_path"]) == (
        tmp_path / "base"
    )
    again = load_pretrained(tmp_path / "base", adapter=tmp_path / "adapter2", trainable=True)
    assert any(p.requires_grad for p in again.model.parameters())


# ------------------------------------------------------------------------------------- bad input


@pytest.fixture
def saved(tmp_path):
    """A two-shard LLaDA checkpoint with an index, as official checkpoints are laid out."""
    policy = policy_of("llada")
    directory = tmp_path / "ckpt"
    policy.save(directory)
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k].contiguous() for k in keys}, directory / file)
        weight_map.update(dict.fromkeys(keys, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_sharded_checkpoint_loads(saved):
    assert load_pretrained(saved).family.name == "llada"


def test_missing_shard_names_the_file(saved):
    (saved / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model-00002-of-00002\.safetensors is missing .*index\.json maps \d+"):
        load_pretrained(saved)


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_layers": 3}, r"lack \d+ tensors config\.json implies, e\.g\. 'model\.transformer\.blocks\.2\."),
        ({"n_layers": 1}, r"holds 'model\.transformer\.blocks\.1\..*which the architecture in config\.json does not"),
        ({"mlp_hidden_size": 64}, r"has shape \[\d+, \d+\] but config\.json implies \[64, \d+\]"),
    ],
)
def test_config_that_does_not_match_the_weights_names_file_and_key(saved, change, message):
    _edit_config(saved, **change)
    with pytest.raises(ConfigError, match=message) as info:
        load_pretrained(saved)
    assert "model.path=" in str(info.value)


def test_unknown_model_type_and_broken_config(saved):
    _edit_config(saved, model_type="gpt2")
    with pytest.raises(ConfigError, match=r"config\.json: model_type='gpt2' is not a supported"):
        load_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        load_pretrained(saved)


def _drop_mask_token(directory: Path) -> None:
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg.pop("mask_token", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_mask_token_comes_from_the_config_when_the_tokenizer_has_none(saved):
    _drop_mask_token(saved)
    policy = load_pretrained(saved)
    assert policy.tokenizer.mask_token == "<|mdm_mask|>"
    assert policy.mask_id == json.loads((saved / "config.json").read_text())["mask_token_id"]


def test_tokenizer_without_a_mask_token_names_both_keys(saved):
    _drop_mask_token(saved)
    _edit_config(saved, mask_token_id=None)
    with pytest.raises(ConfigError, match=r"no mask token: .*tokenizer_config\.json.*'mask_token'.*'mask_token_id'"):
        load_pretrained(saved)


def test_mask_ids_that_disagree(saved):
    _edit_config(saved, mask_token_id=7)
    with pytest.raises(ConfigError, match=r"'<\|mdm_mask\|>' has id \d+ but config\.json 'mask_token_id' is 7"):
        load_pretrained(saved)


class _Exploit:
    """Unpickling this would run a shell command: weights-only loading must refuse it."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.canary}",))


def test_pickled_weights_are_loaded_weights_only(tmp_path):
    directory = tmp_path / "ckpt"
    policy_of("tiny").save(directory)
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    canary = tmp_path / "pwned"
    with (directory / "pytorch_model.bin").open("wb") as f:
        pickle.dump({**state, "evil": _Exploit(canary)}, f)
    with pytest.raises(ConfigError, match=r"cannot read pytorch_model\.bin"):
        load_pretrained(directory)
    assert not canary.exists()
    # the same tensors in a plain torch.save file load fine
    torch.save(state, directory / "pytorch_model.bin")
    assert load_pretrained(directory).family.name == "tiny"


def test_official_config_without_a_path_is_one_clear_line(tmp_path):
    proc = run_cli("model=llada_8b_instruct", f"hydra.run.dir={tmp_path}", "logging=none")
    _one_clear_line(proc, "model=llada_8b_instruct needs model.path=")
    # The same rule for Dream, through the validation pass the command line runs (no second process).
    with pytest.raises(ConfigError, match="model=dream_7b_instruct needs model.path="):
        validate(_compose("model=dream_7b_instruct"))


def test_lora_settings_are_validated(tmp_path):
    # Every problem of one command line is reported together, in one line.
    proc = run_cli(
        "model/lora=paper",
        "model.lora.r=0",
        "model.lora.dropout=1.5",
        "model.quantization=nf4",
        f"hydra.run.dir={tmp_path}",
    )
    _one_clear_line(
        proc, "model.lora.r=0", "model.lora.dropout=1.5", "model.quantization=nf4 needs cluster.device=cuda"
    )


# ------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    ("model", "objective"), [("tiny_llada", "gdsd"), ("tiny_dream", "spg")], ids=["llada-gdsd", "dream-spg"]
)
def test_family_trains_with_lora_and_evaluates_from_its_adapter(model, objective, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        *FAST,
        f"model={model}",
        "model/lora=paper",
        "model.lora.r=8",
        f"objective={objective}",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        "logging=none",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_metric"] is not None
    export = run_dir / "checkpoints" / "final" / "hf"
    assert (export / "adapter_config.json").is_file() and not (export / "config.json").exists()
    base = Path(json.loads((export / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert (base / "warmstart.json").is_file()  # the adapter points at the cached warm-started base

    from tests.test_e2e import child_env

    out = tmp_path / "eval"
    proc = run_module(
        "dllm_rl.evaluate",
        f"model={model}",
        f"evaluate.checkpoint={run_dir}",
        "evaluate.subset_size=8",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={out}",
        cwd=REPO,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())
