"""bench/spg_step.py: the training-step bench runs end to end on tiny models, and its bookkeeping holds together.

Speeds are never asserted (they depend on the machine); what is asserted is that every phase was clocked,
the phases account for the step, FLOPs follow the stated convention and the forwards really run, MFU is a
fraction of the measured peak, --grow reruns the step per value, --objective and --mc reach the objective's
own keys, and that the sizes the FLOP count reads from a config are those of the network really built, for
the 8B architectures too (built on the meta device: no memory, no weights).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from forked import run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "spg_step.py"
PHASES = ("rollout", "reward", "prepare", "likelihood_forward", "backward", "optimizer_step")
# Seconds on 2 cores: short completions, few steps, a small peak matmul, one thread.
TINY = [
    "--gen-length=32",
    "--block-length=16",
    "--steps=8",
    "--repeats=1",
    "--peak-size=512",
    "--peak-samples=2",
    "--device=cpu",
    "cluster.threads=1",
]


def load_bench():
    spec = importlib.util.spec_from_file_location("spg_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    # A child picks its own torch.distributed rendezvous, whatever an in-process test left in the environment.
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = run_script(SCRIPT, *args, *TINY, f"--json={out}", cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "total" in proc.stdout and "MFU" in proc.stdout  # the readable table went to stdout
    return json.loads(out.read_text())


def check_report(r: dict, completions: int, mc: int | None, objective: str = "spg") -> None:
    assert set(r["phases"]) == set(PHASES)
    for name in PHASES:
        assert r["phases"][name]["seconds"] > 0, name
    for run in [r["warmup"], *r["repeats"]]:
        timed = sum(run["phases"].values())
        # Phases are disjoint stretches of the step: they cannot exceed it and must account for most of it.
        assert timed <= run["total_seconds"]
        assert timed >= 0.5 * run["total_seconds"]
        assert not run["optimizer_step_skipped"]
        assert run["completion_tokens"] == r["settings"]["gen_length"]
        assert run["prompt_tokens"] == r["settings"]["prompt_length"]
        # One forward per denoising step for each sampler call (one call: the whole rollout at once).
        assert run["nfe"] == r["settings"]["steps"] * (completions // r["settings"]["rollout_micro_batch"])
    assert r["total_seconds"] > 0
    assert sum(p["share"] for p in r["phases"].values()) <= 1.0 + 1e-9

    f = r["flops"]
    for key in ("rollout", "likelihood_forward", "forward_backward"):
        assert f[key] > 0, key
    assert f["sequence_tokens"] == r["settings"]["prompt_length"] + r["settings"]["gen_length"]
    assert f["rollout_sequence_forwards"] == completions * r["settings"]["steps"]
    # m masked copies per completion (the one-step estimators: one), each a row of the loss forward.
    assert f["likelihood_sequences"] == completions * (mc or 1)
    assert f["step"] == pytest.approx(f["rollout"] + f["precompute"] + f["forward_backward"])
    # The reward phase scores every completion with the task's own reward functions.
    assert r["reward"]["functions"] and r["reward"]["example_row"]
    assert r["model"]["matmul_params_counted"] == r["model"]["matmul_params_in_model"]

    assert r["peak"]["flops_per_second"] > 0
    for key, value in r["mfu"].items():
        assert 0 < value <= 1, (key, value)
    mem = r["memory"]
    assert mem["kind"].startswith("cpu")
    assert mem["peak_bytes"]["rss"] >= mem["baseline_bytes"] > 0

    assert "spg_step.py" in r["command"]
    assert r["device"]["torch"] == torch.__version__ and r["device"]["name"]
    assert r["config"]["objective"]["name"] == objective == r["settings"]["objective"]
    assert r["settings"]["mc"] == mc
    if mc is not None:
        assert r["config"]["objective"][r["settings"]["mc_key"]] == mc


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> dict:
    """tiny_llada with LoRA, the step measured at m = 1 and m = 2 (one bench run serves both tests)."""
    return run_bench(tmp_path_factory.mktemp("grow"), "--model=tiny_llada", "--group=2", "--lora-r=4", "--grow=mc=1,2")


@pytest.mark.slow
def test_tiny_llada_with_lora(grown):
    r = grown["growth"]["mc"]["reports"][1]  # the default m = 2
    check_report(r, completions=2, mc=2)
    s, m, f = r["settings"], r["model"], r["flops"]
    assert s["lora"]["r"] == 4 and s["family"] == "llada"
    assert 0 < m["params_trainable"] == m["lora_params"] < m["params_total"]
    # A frozen base gets no weight gradients: fwd+bwd costs more than 2 forwards, less than 3.
    assert 2 * f["likelihood_forward"] < f["forward_backward"] < 3 * f["likelihood_forward"]


@pytest.mark.slow
def test_tiny_dream_full_finetuning_in_micro_batches(tmp_path):
    # Two prompts of G=2 in train micro-batches of 2 (gradient accumulation 2) and two sampler calls.
    r = run_bench(
        tmp_path,
        "--model=tiny_dream",
        "--no-lora",
        "--group=2",
        "--prompts=2",
        "--micro-batch=2",
        "--rollout-micro-batch=2",
    )
    check_report(r, completions=4, mc=2)
    s, m, f = r["settings"], r["model"], r["flops"]
    assert s["lora"] is None and s["family"] == "dream" and s["train_micro_batch"] == 2
    assert r["config"]["train"]["micro_batch_per_gpu"] == 2
    assert m["lora_params"] == 0 and m["params_trainable"] == m["params_total"]
    assert f["forward_backward"] == pytest.approx(3 * f["likelihood_forward"])


@pytest.mark.parametrize("model", ["llada_8b_instruct", "dream_7b_instruct"])
def test_8b_sizes_read_for_flops_match_the_network(model):
    """The FLOP count of the GPU bench reads the sizes the network is really built with (LoRA r128 on)."""
    bench = load_bench()
    from dllm_rl.build import build_policy
    from dllm_rl.config import run_config

    args = bench.parse_args([f"--model={model}", "--device=cpu", "--dtype=bfloat16"])
    cfg = bench.compose_config(bench.config_overrides(args))
    with torch.device("meta"):
        policy, _ = build_policy(run_config(cfg), SimpleNamespace(alphabet=bench.ALPHABET))
    arch = bench.architecture(policy.model)
    mcfg = cfg["model"]
    assert arch["hidden_size"] == mcfg["hidden_size"] and arch["num_hidden_layers"] == mcfg["num_layers"]
    assert arch["num_key_value_heads"] == mcfg["num_kv_heads"] and arch["vocab_size"] == mcfg["vocab_size"]
    assert arch["matmul_params_counted"] == arch["matmul_params_in_model"]
    assert arch["params_trainable"] == arch["lora_params"] > 0
    one = bench.sequence_flops(arch, 512, lora=True)
    assert one["forward"] > 2 * 512 * arch["matmul_params_counted"]  # attention and adapters come on top


@pytest.mark.slow
def test_grow_mc_reruns_the_step_per_value(grown):
    r = grown
    g = r["growth"]["mc"]
    assert g["values"] == [1, 2] and set(r["growth"]) == {"mc"}
    one, two = g["reports"]
    for mc, report in ((1, one), (2, two)):
        check_report(report, completions=2, mc=mc)
    assert [row["value"] for row in g["rows"]] == [1, 2]
    for row in g["rows"]:
        assert set(row["seconds"]) == set(PHASES) and all(row["seconds"][name] > 0 for name in PHASES)
        assert row["total_seconds"] > 0 and row["peak_memory_bytes"] > 0 and 0 < row["mfu_step"] <= 1
    # m doubles the loss forward and its backward, not the rollout: the step's FLOPs grow by less.
    f1, f2 = one["flops"], two["flops"]
    assert f2["likelihood_sequences"] == 2 * f1["likelihood_sequences"]
    assert f2["forward_backward"] == pytest.approx(2 * f1["forward_backward"])
    assert f2["rollout"] == f1["rollout"] and f1["step"] < f2["step"] < 2 * f1["step"]
    ratio = g["rows"][1]["flops_ratio"]
    assert ratio["likelihood_forward"] == pytest.approx(2) and ratio["rollout"] == pytest.approx(1)
    assert ratio["step"] == pytest.approx(f2["step"] / f1["step"])
    assert g["rows"][0]["time_ratio"]["total"] == pytest.approx(1)
    assert g["rows"][1]["time_ratio"]["total"] > 0
    assert "mc" not in g["fixed"] and g["fixed"]["gen_length"] == 32


@pytest.mark.slow
def test_diffu_grpo_precompute_scores_without_grad(tmp_path):
    # Two inner steps: prepare scores two prompt-masked copies per completion, for the old and the reference policy.
    r = run_bench(
        tmp_path,
        "--model=tiny_llada",
        "--group=2",
        "--lora-r=4",
        "--objective=diffu_grpo",
        "objective.inner_iterations=2",
    )
    check_report(r, completions=2, mc=None, objective="diffu_grpo")
    f = r["flops"]
    # Old and reference log-probs of the inner steps, all in no-grad forwards of the precompute phase.
    assert f["precompute_sequence_forwards"] > 0 and f["precompute"] > 0
    assert f["by_phase"]["prepare"]["grad_rows"] == 0
    assert r["phases"]["prepare"]["seconds"] > 0 and 0 < r["mfu"]["precompute"] <= 1


def test_mc_goes_to_the_objectives_own_key():
    bench = load_bench()
    base = ["--model=tiny_llada", "--device=cpu"]
    cfg = bench.build_config(bench.parse_args([*base, "--objective=gdsd", "--mc=3"]))
    assert cfg["objective"]["mc_pairs"] == 3 and "mc_samples" not in cfg["objective"]
    cfg = bench.build_config(bench.parse_args([*base, "--objective=dmpo", "--mc=6"]))
    assert cfg["objective"]["mc_samples"] == 6
    assert bench.build_config(bench.parse_args([*base, "--objective=elbo"]))["objective"]["mc_samples"] == 2
    with pytest.raises(SystemExit, match="no Monte Carlo count"):
        bench.build_config(bench.parse_args([*base, "--objective=wd1", "--mc=2"]))
    args = bench.parse_args([*base, "--grow=gen_length=64,128", "--grow", "batch=1,2"])
    assert args.grow == [("gen_length", [64, 128]), ("batch", [1, 2])]
    with pytest.raises(SystemExit):
        bench.parse_args([*base, "--grow=lr=1,2"])
