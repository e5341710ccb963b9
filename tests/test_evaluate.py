"""`python -m dllm_rl.evaluate`: the papers' protocol through the real entry point (Hydra, datasets,
transformers, torch elastic launch with gloo), on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from forked import run_module
from run_configs import composed
from test_e2e import REPO, child_env

from dllm_rl.config import EvaluateCfg, ModelCfg
from dllm_rl.errors import ConfigError
from dllm_rl.evaluate import protocol, resolve_checkpoint
from dllm_rl.models.policy import build_tiny

SMALL = [
    "warmstart.steps=5",
    "task.train_size=200",
    "task.validation_size=16",
    "task.test_size=24",
    "evaluate.subset_size=12",
    "evaluate.subset_seed=3",
    "evaluate.batch_size=5",
    "evaluate.gen_lengths=[16,32]",
    "logging=none",
]


def small_model(max_position_embeddings: int) -> ModelCfg:
    return ModelCfg(
        name="tiny",
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=max_position_embeddings,
        dtype="float32",
    )


def run_eval(tmp: Path, name: str, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp / name
    proc = run_module(
        "dllm_rl.evaluate",
        *SMALL,
        f"cache_dir={tmp / 'cache'}",
        f"hydra.run.dir={run_dir}",
        *args,
        cwd=REPO,
        env=child_env(),
    )
    return proc, run_dir


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    proc, run_dir = run_eval(tmp, "one", "evaluate.marginals=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc, run_dir


def test_writes_generations_and_metrics_per_length(single):
    _, proc, run_dir = single
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["num_examples"] == 12 and result["split"] == "test" and result["temperature"] == 0.0
    assert list(result["per_length"]) == ["16", "32"]
    for length, r in result["per_length"].items():
        assert r["gen_length"] == int(length) and r["block_length"] == min(32, int(length))
        assert r["steps"] == int(length) // 2  # steps = length / 2
        assert 0.0 <= r["cell_acc"] <= 1.0
        rows = [json.loads(line) for line in (run_dir / f"generations_len{length}.jsonl").read_text().splitlines()]
        assert len(rows) == 12 and all({"prompt", "completion", "reward"} <= set(row) for row in rows)
    mean = sum(r["cell_acc"] for r in result["per_length"].values()) / 2
    assert result["average"]["cell_acc"] == pytest.approx(mean)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("evaluate sudoku (test, 12 examples): cell_acc L16=") and "per 100 examples" in last
    # evaluate.marginals=true: one answer position per blank of the 12 puzzles (8 each in the test split)
    marginals = json.loads((run_dir / "marginals.json").read_text())
    assert result["marginals"] == marginals and marginals["positions"] == 12 * 8
    assert sum(marginals["histogram"].values()) == pytest.approx(1.0)
    assert f"whole completion masked: argmax {marginals['argmax_acc']:.4f}" in last


def test_subset_is_the_seeded_choice_of_the_test_split(single):
    import numpy as np

    _, _, run_dir = single
    rows = [json.loads(line) for line in (run_dir / "generations_len16.jsonl").read_text().splitlines()]
    np.random.seed(3)
    chosen = np.random.choice(24, 12, replace=False)
    from dllm_rl.tasks import get_task

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    test = get_task("sudoku", cfg["task"], Path(cfg["cache_dir"])).dataset("test")
    assert [r["prompt"] for r in rows] == [test[int(i)]["eval_prompt"] for i in chosen]


def test_two_processes_give_the_same_result_as_one(single):
    tmp, _, run_dir = single
    proc, run_dir2 = run_eval(tmp, "two", "cluster.nproc=2", "cluster.threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, run_dir2))
    assert two["processes"] == 2
    for length in ("16", "32"):
        assert two["per_length"][length]["cell_acc"] == one["per_length"][length]["cell_acc"]
        gen = f"generations_len{length}.jsonl"
        assert (run_dir2 / gen).read_text() == (run_dir / gen).read_text()


def test_bad_checkpoint_is_one_line(tmp_path):
    proc, _ = run_eval(tmp_path, "bad", f"evaluate.checkpoint={tmp_path / 'nowhere'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: evaluate.checkpoint=")


def test_resolve_checkpoint_finds_a_runs_best_then_final_export(tmp_path):
    policy = build_tiny(small_model(32), "01234", seed=0)
    run = tmp_path / "run"
    policy.save(run / "checkpoints" / "final" / "hf")
    cfg = composed()
    assert cfg.model.path is None and cfg.model.name == "tiny"
    cfg.evaluate.checkpoint = str(run)
    assert resolve_checkpoint(cfg)[0] == str(run / "checkpoints" / "final" / "hf")
    policy.save(run / "checkpoints" / "best" / "hf")
    assert resolve_checkpoint(cfg)[0] == str(run / "checkpoints" / "best" / "hf")
    cfg.evaluate.checkpoint = str(run / "checkpoints")
    assert resolve_checkpoint(cfg)[0] == str(run / "checkpoints" / "best" / "hf")
    cfg.evaluate.checkpoint = str(run / "checkpoints" / "final" / "hf")
    assert resolve_checkpoint(cfg) == (cfg.evaluate.checkpoint, "evaluate.checkpoint as given")
    cfg = composed()
    cfg.evaluate.checkpoint = None
    assert resolve_checkpoint(cfg)[0] is None  # the cached warm-started base
    cfg.model = dataclasses.replace(cfg.model, name="llada_8b_instruct", requires_path=True)
    with pytest.raises(ConfigError, match="give evaluate.checkpoint"):
        resolve_checkpoint(cfg)


@pytest.mark.parametrize(
    "length, per_token, expected",
    [(128, 0.5, (32, 64)), (256, 0.5, (32, 128)), (512, 1.0, (32, 512)), (16, 0.5, (16, 8)), (48, 0.5, None)],
)
def test_protocol_block_and_steps(length, per_token, expected):
    ecfg = EvaluateCfg(block_length=32, steps_per_token=per_token)
    if expected is None:
        with pytest.raises(ConfigError, match="not a multiple"):
            protocol(ecfg, length)
        return
    settings = protocol(ecfg, length)
    assert (settings["block_length"], settings["steps"]) == expected


def test_marginals_score_the_reference_token_at_the_positions_the_reward_reads(tmp_path, monkeypatch):
    """A network that puts p = 0.9 on the reference digit at even completion positions and p = 0.04 at
    odd ones: the blanks alone are scored, and the statistics are those of that construction."""
    import numpy as np
    import torch

    from dllm_rl.evaluation import target_marginals
    from dllm_rl.tasks import get_task

    task = get_task("sudoku", {"train_size": 50, "validation_size": 4, "test_size": 6}, tmp_path)
    examples = task.dataset("test").to_list()
    policy = build_tiny(small_model(64), task.alphabet, seed=0)
    vocab = len(policy.tokenizer)
    digits = [policy.tokenizer.convert_tokens_to_ids(d) for d in "1234"]
    answers = [[policy.tokenizer.convert_tokens_to_ids(c) for c in ex["solution"]] for ex in examples]
    calls = []

    def designed_logits(ids, attention, position_ids=None, **_):
        rows = [answers[len(calls) * 4 + r] for r in range(ids.shape[0])]  # micro-batches of 4 below
        calls.append(ids.shape[0])
        probs = torch.full((ids.shape[0], ids.shape[1], vocab), 1e-9)
        for r, answer in enumerate(rows):
            for k, token in enumerate(answer):
                col = ids.shape[1] - 16 + k
                if k % 2 == 0:
                    probs[r, col, digits] = 0.1 / 3
                    probs[r, col, token] = 0.9
                else:
                    probs[r, col, digits] = 0.32
                    probs[r, col, token] = 0.04
        return probs.log()

    monkeypatch.setattr(policy, "logits", designed_logits)
    result = target_marginals(policy, task, examples, 16, batch_size=4)
    blanks = [k for ex in examples for k, ch in enumerate(ex["puzzle"]) if ch == "0"]
    even = np.mean([k % 2 == 0 for k in blanks])
    assert calls == [4, 2] and result["positions"] == len(blanks) == 6 * 8
    assert result["argmax_acc"] == pytest.approx(even)
    assert result["mean_p_target"] == pytest.approx(0.9 * even + 0.04 * (1 - even), abs=1e-6)
    assert result["histogram"]["0.8-1"] == pytest.approx(even) and result["histogram"]["0-0.05"] == pytest.approx(
        1 - even
    )
    assert result["argmax_wrong"]["positions"] == round(len(blanks) * (1 - even))
    assert result["argmax_wrong"]["p<0.1"] == 1.0

    chat = get_task(
        "sudoku", {"train_size": 50, "validation_size": 4, "test_size": 6, "prompt_style": "chat"}, tmp_path
    )
    with pytest.raises(ConfigError, match="compact"):
        target_marginals(policy, chat, examples, 16, batch_size=4)
