"""bench/sampler.py: the sampler bench runs end to end on tiny models and its numbers hold together.

Speeds are never asserted (they depend on the machine). What is asserted: every variant has a row in
every cell; plain runs one forward per step; the caches keep the NFE but run fewer positions (dual fewer
than prefix); threshold decoding takes between one step per block and one per token, degenerates to one
token per step on near-uniform random predictions and commits more once --logit-scale sharpens them;
FLOPs follow the stated convention and MFU is a fraction of the measured peak; the accuracy part scores
every variant and gives the paired noise band. The three runs are subprocesses started together (each
on one thread), so that their start-up (imports, config composition) overlaps on two cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "sampler.py"
VARIANTS = ("plain", "prefix", "dual", "threshold", "prefix+threshold", "dual+threshold")
GEN, BLOCK, STEPS, BATCH, PROMPT = 32, 16, 16, 2, 16
SPEED = [
    "speed",
    "--model=tiny_llada",
    f"--gen-lengths={GEN}",
    f"--block-length={BLOCK}",
    f"--steps={STEPS}",
    f"--batch-sizes={BATCH}",
    f"--prompt-length={PROMPT}",
    "--repeats=1",
    "--peak-size=512",
    "--peak-samples=2",
    "--device=cpu",
    # Sharp random predictions: the 0.9 threshold fires (at 1.0 it never would, one token per step).
    "--logit-scale=300",
    "cluster.threads=1",
]


def load_sampler_bench():
    spec = importlib.util.spec_from_file_location("bench_sampler", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start(out: Path, *args: str) -> subprocess.Popen:
    # A child picks its own torch.distributed rendezvous, whatever an in-process test left in the environment.
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args, f"--json={out}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("bench_sampler")
    runs = {
        "speed": _start(tmp / "speed.json", *SPEED),
        "accuracy": _start(
            tmp / "accuracy.json",
            "accuracy",
            "--task=sudoku",
            "--device=cpu",
            "--warmup-rows=4",
            "--repeats=1",
            f"cache_dir={tmp / 'cache'}",
            "warmstart.steps=10",
            "task.train_size=200",
            "task.validation_size=16",
            "task.test_size=16",
            "cluster.threads=1",
        ),
    }
    out = {}
    for name, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {stderr[-4000:]}"
        assert "variant" in stdout and "plain" in stdout  # the readable table went to stdout
        out[name] = json.loads((tmp / f"{name}.json").read_text())
        out[name]["_stdout"] = stdout
    return out


def test_speed_rows_count_forwards_and_positions(reports):
    r = reports["speed"]
    rows = {row["variant"]: row for row in r["rows"]}
    assert [row["variant"] for row in r["rows"]] == list(VARIANTS)  # one cell: gen 32 x batch 2
    for row in r["rows"]:
        assert (row["gen_length"], row["batch_size"], row["steps"]) == (GEN, BATCH, STEPS)
        assert row["prompt_length"] == PROMPT
        assert row["seconds"] > 0 and row["tokens_per_second"] > 0
        assert row["nfe_repeats"] == [row["nfe"]]
    plain = rows["plain"]
    assert plain["nfe"] == STEPS and plain["nfe_per_token"] == pytest.approx(STEPS / GEN)
    assert plain["forward_tokens"] == STEPS * (PROMPT + GEN)  # every step a full forward
    assert plain["tokens_per_step_mean"] == pytest.approx(GEN / STEPS)
    assert plain["speedup_vs_plain"] == pytest.approx(1.0) and plain["token_agreement_with_plain"] == 1.0
    # Caches: the same forwards, fewer positions in them; the dual cache runs only the block.
    for cached in ("prefix", "dual"):
        assert rows[cached]["nfe"] == plain["nfe"]
        assert rows[cached]["forward_tokens"] < plain["forward_tokens"]
    assert rows["dual"]["forward_tokens"] < rows["prefix"]["forward_tokens"]
    blocks = GEN // BLOCK
    per_block = STEPS // blocks
    assert rows["dual"]["forward_tokens"] == blocks * ((PROMPT + GEN) + (per_block - 1) * BLOCK)
    for name in ("threshold", "prefix+threshold", "dual+threshold"):
        row = rows[name]
        assert row["threshold"] == 0.9 and blocks <= row["nfe"] <= GEN
        assert row["nfe_per_token"] == pytest.approx(row["nfe"] / GEN)
        assert row["steps_per_block"] == pytest.approx(row["nfe"] / blocks)
    # With the sharpened head the threshold fires: more than one token per step, fewer forwards than tokens.
    thr = rows["threshold"]
    assert thr["tokens_per_step_mean"] > 1 and thr["tokens_per_step_max"] > 1 and thr["nfe"] < GEN
    assert rows["prefix"]["tokens_per_step_mean"] == pytest.approx(GEN / STEPS)  # the fixed schedule


def test_speed_flops_mfu_and_provenance(reports):
    r = reports["speed"]
    bench = load_sampler_bench()
    arch = r["model"]
    T = PROMPT + GEN
    # A full forward by the windowed formula is spg_step's sequence forward.
    assert bench.window_flops(arch, T, T) == pytest.approx(bench.spg.sequence_flops(arch, T, False)["forward"])
    assert arch["matmul_params_counted"] == arch["matmul_params_in_model"]
    for row in r["rows"]:
        assert row["flops"] == pytest.approx(BATCH * bench.window_flops(arch, row["forward_tokens"], T))
        assert 0 < row["mfu"] <= 1, (row["variant"], row["mfu"])
    plain = r["rows"][0]
    assert plain["flops"] == pytest.approx(BATCH * STEPS * bench.spg.sequence_flops(arch, T, False)["forward"])
    assert r["peak"]["flops_per_second"] > 0
    assert "sampler.py" in r["command"] and r["argv"][1] == "speed"
    assert r["device"]["type"] == "cpu" and r["device"]["torch"] == torch.__version__ and r["device"]["name"]
    assert r["config"]["model"]["name"] == "tiny_llada" and r["config"]["cluster"]["threads"] == 1
    assert r["settings"]["logit_scale"] == 300 and r["settings"]["threshold"] == 0.9
    assert r["rows"][3]["sampler"]["threshold"] == 0.9 and r["rows"][2]["sampler"]["cache"] == "dual"


def test_accuracy_part_scores_every_variant_with_a_paired_band(reports):
    r = reports["accuracy"]
    s = r["settings"]
    assert s["task"] == "sudoku" and s["primary_metric"] == "cell_acc" and s["test_examples"] == 16
    assert [row["variant"] for row in r["rows"]] == list(VARIANTS)
    assert r["base"]["source"].startswith(r["config"]["cache_dir"])
    for row in r["rows"]:
        assert 0.0 <= row["metric"] <= 1.0
        assert row["metric"] == row["metrics"]["cell_acc"]
        assert len(row["per_example_metric"]) == 16 and row["per_example_mean_equals_metric"]
        assert row["tokens_per_second"] > 0 and row["sampler_calls"] == 1
        vs = row["vs_plain"]
        for key in ("difference", "standard_error", "band", "within_noise", "examples_changed", "speedup"):
            assert key in vs, key
        assert vs["band"] >= 0 and isinstance(vs["within_noise"], bool)
        assert 0.0 <= vs["identical_completions"] <= 1.0
    plain = r["rows"][0]
    assert plain["nfe_per_token"] == pytest.approx(s["steps"] / s["gen_length"])
    assert plain["vs_plain"]["difference"] == 0 and plain["vs_plain"]["within_noise"] is True
    assert r["rows"][2]["forward_tokens_per_token"] < plain["forward_tokens_per_token"]
    assert "in noise" in r["_stdout"]


def test_paired_difference_band():
    bench = load_sampler_bench()
    same = bench.paired_difference([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same["difference"] == 0 and same["band"] == 0 and same["within_noise"] is True
    d = bench.paired_difference([1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0])  # diffs 1, 0, 0, 1
    assert d["difference"] == pytest.approx(0.5) and d["examples_changed"] == 2
    assert d["band"] == pytest.approx(2 * math.sqrt(1 / 3) / 2) and d["within_noise"] is True
    shift = bench.paired_difference([1.0, 1.0], [0.0, 0.0])  # every example better: no spread, not noise
    assert shift["band"] == 0 and shift["within_noise"] is False
    assert bench.paired_difference([1.0], [0.0])["within_noise"] is None


def test_logit_scale_takes_a_number_or_auto():
    bench = load_sampler_bench()
    base = ["speed", "--device=cpu"]
    assert bench.parse_args([*base, "--logit-scale=auto"]).logit_scale == "auto"
    assert bench.parse_args([*base, "--logit-scale=300"]).logit_scale == 300.0
    for bad in ("sharp", "0"):
        with pytest.raises(SystemExit):
            bench.parse_args([*base, f"--logit-scale={bad}"])
