"""The gradient-noise instrument (python -m dllm_rl.variance): its estimators on synthetic gradients with a
known signal and variance split, the position split (likelihood hook and Sudoku's blind cells), and one
tiny run through the real entry point."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from forked import run_module
from test_e2e import REPO, child_env

from dllm_rl.errors import ConfigError
from dllm_rl.likelihood.bounds import elbo, eubo, masked_logp
from dllm_rl.likelihood.masks import MaskDraw
from dllm_rl.variance import (
    check,
    gram_matrices,
    noise_statistics,
    parameter_group,
    position_statistics,
    setting_label,
    statistics,
)


# ------------------------------------------------------------------------------- synthetic gradients
def synthetic(gen: torch.Generator, k: int, r: int, dim: int, mu: torch.Tensor, rollout: float, mask: float):
    """g_kr = μ + a_k + e_kr with E|a|² = rollout, E|e|² = mask (isotropic Gaussians): [K·R, dim]."""
    a = torch.randn(k, 1, dim, generator=gen, dtype=torch.float64) * (rollout / dim) ** 0.5
    e = torch.randn(k, r, dim, generator=gen, dtype=torch.float64) * (mask / dim) ** 0.5
    return (mu + a + e).reshape(k * r, dim)


def gram_of(g: torch.Tensor, k: int, r: int) -> torch.Tensor:
    return (g @ g.T).reshape(k, r, k, r)


def test_estimators_are_unbiased_on_synthetic_gradients():
    """Averaged over many small experiments (K = 3, R = 2, where a biased estimator would be far off), the
    estimates hit |μ|², the mask variance and the rollout variance; the signal share of one experiment with
    many rounds is close to its true value."""
    gen = torch.Generator().manual_seed(0)
    k, r, dim = 3, 2, 64
    mu = torch.zeros(dim, dtype=torch.float64)
    mu[0] = 1.0  # |μ|² = 1
    rollout, mask = 2.0, 5.0
    reps = [noise_statistics(gram_of(synthetic(gen, k, r, dim, mu, rollout, mask), k, r)) for _ in range(3000)]
    mean = {key: sum(s[key] for s in reps) / len(reps) for key in reps[0]}
    assert mean["signal_sq_norm"] == pytest.approx(1.0, abs=0.15)
    assert mean["mask_variance"] == pytest.approx(mask, rel=0.05)
    assert mean["rollout_variance"] == pytest.approx(rollout, abs=0.3)
    assert mean["mean_sq_norm"] == pytest.approx(1.0 + rollout + mask, rel=0.05)
    # the naive |ḡ|² over the same draws would overestimate |μ|² by (rollout + mask/R)/K = 1.5
    # one experiment with many rounds: the share itself
    wide = torch.zeros(256, dtype=torch.float64)
    wide[0] = 1.0
    big = noise_statistics(gram_of(synthetic(gen, 200, 4, 256, wide, rollout, mask), 200, 4))
    assert big["signal_share"] == pytest.approx(1.0 / 8.0, abs=0.03)
    assert big["mask_share"] == pytest.approx(mask / (mask + rollout), abs=0.05)
    assert big["rollout_share"] == pytest.approx(rollout / (mask + rollout), abs=0.05)
    assert big["signal_share_without_mask_noise"] == pytest.approx(1.0 / 3.0, abs=0.05)
    # cosine between independent rounds: |μ|² / E|g|² for isotropic noise in high dimension
    assert big["cosine"] == pytest.approx(1.0 / 8.0, abs=0.03)


def test_law_of_total_variance_holds_exactly():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(5 * 3, 40, generator=gen, dtype=torch.float64)
    s = noise_statistics(gram_of(g, 5, 3))
    assert s["mask_variance"] + s["rollout_variance"] == pytest.approx(s["mean_sq_norm"] - s["signal_sq_norm"])
    assert s["mask_share"] + s["rollout_share"] == pytest.approx(1.0)


def test_noise_free_and_signal_free_limits():
    gen = torch.Generator().manual_seed(2)
    mu = torch.randn(30, dtype=torch.float64, generator=gen)
    same = mu.expand(4 * 2, -1).clone()
    s = noise_statistics(gram_of(same, 4, 2))
    assert s["signal_share"] == pytest.approx(1.0) and s["cosine"] == pytest.approx(1.0)
    assert s["mask_variance"] == pytest.approx(0.0, abs=1e-12) and s["rollout_variance"] == pytest.approx(
        0.0, abs=1e-12
    )
    # only mask noise: rollouts identical, every draw independent
    zero = torch.zeros(500, dtype=torch.float64)
    pure_mask = synthetic(gen, 50, 4, 500, zero, 0.0, 3.0)
    s = noise_statistics(gram_of(pure_mask, 50, 4))
    assert s["mask_share"] == pytest.approx(1.0, abs=0.05) and abs(s["signal_share"]) < 0.02
    with pytest.raises(ValueError):
        noise_statistics(gram_of(pure_mask[:4], 4, 1))


def test_position_split_sums_to_the_total():
    """g = g_blind + g_visible: the blind and visible shares add up to 1; all-blind is share 1; a blind part
    orthogonal to the visible one gives equal projection and energy shares."""
    gen = torch.Generator().manual_seed(3)
    k, r, dim = 4, 3, 20
    blind = torch.randn(k * r, dim, generator=gen, dtype=torch.float64)
    visible = torch.randn(k * r, dim, generator=gen, dtype=torch.float64)
    full = blind + visible
    stats = position_statistics(
        (blind @ full.T).reshape(k, r, k, r), (blind**2).sum(1).reshape(k, r), gram_of(full, k, r)
    )
    assert stats["blind_share"] + stats["visible_share"] == pytest.approx(1.0)
    everything = position_statistics(gram_of(full, k, r), (full**2).sum(1).reshape(k, r), gram_of(full, k, r))
    assert everything["blind_share"] == pytest.approx(1.0) and everything["blind_energy_share"] == pytest.approx(1.0)
    blind[:, 10:], visible[:, :10] = 0.0, 0.0  # disjoint coordinates
    full = blind + visible
    stats = position_statistics(
        (blind @ full.T).reshape(k, r, k, r), (blind**2).sum(1).reshape(k, r), gram_of(full, k, r)
    )
    assert stats["blind_share"] == pytest.approx(stats["blind_energy_share"])


def test_group_grams_add_up_to_the_total():
    gen = torch.Generator().manual_seed(4)
    full = torch.randn(3 * 2, 12, generator=gen)
    blind = torch.randn(3 * 2, 12, generator=gen)
    slices = {"embeddings": [slice(0, 4)], "mlp": [slice(4, 7), slice(9, 12)], "norms": [slice(7, 9)]}
    grams = gram_matrices(full, blind, slices, 3, 2)
    for key in ("gram", "cross", "blind_sq"):
        parts = sum(grams[g][key] for g in slices)
        torch.testing.assert_close(parts, grams["total"][key])
    stats = statistics(grams)
    assert sum(stats[g]["share_of_sq_norm"] for g in slices) == pytest.approx(1.0)
    assert stats["total"]["signal_share_se"] >= 0  # the jackknife over K = 3 rounds


def test_parameter_groups_by_name():
    names = {
        "model.embed_tokens.weight": "embeddings",
        "model.layers.0.self_attn.q_proj.weight": "attention",
        "model.layers.0.attn_norm.weight": "norms",
        "model.layers.1.mlp.down_proj.weight": "mlp",
        "lm_head.weight": "output_head",
        "model.transformer.wte.weight": "embeddings",  # LLaDA
        "model.transformer.blocks.0.attn_out.weight": "attention",
        "model.transformer.blocks.0.ff_out.weight": "mlp",
        "model.transformer.ff_out.weight": "output_head",
        "model.transformer.ln_f.weight": "norms",
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight": "attention",
        "model.layers.0.post_attention_layernorm.weight": "norms",  # Dream (Qwen2)
    }
    assert {n: parameter_group(n) for n in names} == names


# ----------------------------------------------------------------------------------- position hook
def test_position_weight_splits_the_gradient_and_keeps_the_values():
    """masked_logp's position_weight: the same values, and the gradients of w and 1 − w add up to the
    unweighted one even through a non-linear estimator (the EUBO's logsumexp)."""
    gen = torch.Generator().manual_seed(5)
    vocab, mask_id, n, p, length = 7, 6, 3, 2, 5
    table = torch.randn(vocab, vocab, generator=gen, dtype=torch.float64, requires_grad=True)

    def logits_fn(ids, attn, pos):
        return table[ids] + 0.1 * pos.unsqueeze(-1).to(table.dtype)

    prompt = torch.randint(0, 6, (n, p), generator=gen)
    completion = torch.randint(0, 6, (n, length), generator=gen)
    scored = torch.rand(n, 2, length, generator=gen) < 0.6
    masks = MaskDraw(scored, torch.zeros(n, 2, p, dtype=torch.bool), torch.ones(n, 2), torch.full((n, 2), 0.5))
    weight = (torch.rand(n, length, generator=gen) < 0.5).double()

    def loss_and_grad(w):
        logp = masked_logp(logits_fn, prompt, torch.ones_like(prompt), completion, masks, mask_id, position_weight=w)
        lengths = torch.full((n,), float(length), dtype=torch.float64)
        loss = (
            elbo(logp, masks.scored, masks.weight) - 0.5 * eubo(logp, masks.scored, masks.weight, 1.0, lengths)
        ).sum()
        (grad,) = torch.autograd.grad(loss, table)
        return loss.detach(), grad

    plain, g = loss_and_grad(None)
    v_blind, g_blind = loss_and_grad(weight)
    v_visible, g_visible = loss_and_grad(1.0 - weight)
    assert v_blind == plain and v_visible == plain
    torch.testing.assert_close(g_blind + g_visible, g)
    assert g_blind.abs().sum() > 0 and g_visible.abs().sum() > 0


def test_sudoku_blind_positions_are_the_given_cells(tmp_path):
    from dllm_rl.tasks.sudoku import SudokuTask

    example = {"puzzle": "1030400000010020", "solution": "1234432121433412"}
    compact = SudokuTask({"name": "sudoku", "prompt_style": "compact", "train_size": 10}, tmp_path)
    assert compact.reward_blind_positions(example, 16) == [c != "0" for c in example["puzzle"]]
    assert compact.reward_blind_positions(example, 4) == [True, False, True, False]
    chat = SudokuTask({"name": "sudoku", "prompt_style": "chat", "few_shot": 0, "train_size": 10}, tmp_path)
    assert chat.reward_blind_positions(example, 256) is None
    custom = SudokuTask({"name": "sudoku", "rewards": ["my_pkg.rewards:f"], "train_size": 10}, tmp_path)
    assert custom.reward_blind_positions(example, 16) is None


def test_config_rules_and_labels():
    cfg = {"variance": {"rounds": 1, "mask_draws": 1, "max_gradient_gib": 1.0}, "cluster": {"nproc": 2}}
    with pytest.raises(ConfigError, match="variance.rounds=1.*\n.*variance.mask_draws=1.*\n.*cluster.nproc"):
        check(cfg)
    label = setting_label(
        {"objective": "spg", "negative_surrogate": "mix", "mask": "coupled", "mc": 4, "mc_key": "mc_samples"}
        | {"prompt_mask_prob": 0.15, "omega": 0.5}
    )
    assert label == "spg · coupled · m=4 · p=0.15 · ω=0.5"


# -------------------------------------------------------------------------------------- end to end
def test_help_exits_zero(monkeypatch, capsys):
    """`python -m dllm_rl.variance --help`, in this process (the entry point's Hydra app; a child process
    would spend most of its time importing torch and transformers)."""
    from dllm_rl.variance import main

    monkeypatch.setattr(sys, "argv", ["python -m dllm_rl.variance", "--help"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    assert "gradient-noise instrument" in out and "--report" in out and "objective/mask" in out


def test_tiny_run_writes_variance_json_and_one_summary_line(tmp_path):
    run_dir = tmp_path / "run"
    tiny = [
        "variance.rounds=3",
        "variance.mask_draws=2",
        "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=4",
        "rollout.micro_batch=8",
        "train.micro_batch_per_gpu=4",
        "warmstart.steps=5",
        "task.train_size=200",
        "task.validation_size=16",
        "task.test_size=16",
        "cluster.threads=1",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = run_module("dllm_rl.variance", *tiny, cwd=REPO, env=child_env(OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "variance.json").read_text())
    assert {"total", "positions", "groups", "per_round", "seconds", "wall_seconds", "rounds", "mask_draws"} <= set(
        result
    )
    assert (result["rounds"], result["mask_draws"], result["completions_per_round"]) == (3, 2, 8)
    total = result["total"]
    for key in ("signal_share", "cosine", "mask_share", "rollout_share", "signal_share_se"):
        assert key in total
    assert total["mask_share"] + total["rollout_share"] == pytest.approx(1.0)
    positions = result["positions"]
    assert positions["prompt_share"] == 0.0 and positions["blind_positions_source"] == "sudoku.reward_blind_positions"
    assert positions["blind_share"] + positions["visible_share"] == pytest.approx(1.0)
    assert set(result["groups"]) == {"embeddings", "attention", "mlp", "norms", "output_head"}
    assert sum(g["share_of_sq_norm"] for g in result["groups"].values()) == pytest.approx(1.0)
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("spg on sudoku: signal share ") and "of variance | blind positions" in line
    assert "K=3 R=2 | " in line and str(run_dir) in line
