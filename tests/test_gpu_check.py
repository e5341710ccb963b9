"""bench/gpu_check.py: the GPU check's plan, its memory layouts for full fine-tuning, and ``--smoke``.

The smoke run goes through the same functions as the GPU run, on the CPU with the tiny models: it is cut
off partway (SIGKILL, as a time limit would), rerun with the same --out, and must then have measured every
key of the plan exactly once, kept what the first run finished, and written the JSON, the Markdown beside
it and the marked section of a page. The GPU plan's 8B configs are composed and counted on the meta device
here; their measurement needs a CUDA device. Speeds are never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from forked import run_module

from tests.test_e2e import REPO, child_env

SCRIPT = REPO / "bench" / "gpu_check.py"
GIB = 2**30


def load_check():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smoke_args(out: Path, *extra: str) -> list[str]:
    return ["--smoke", f"--out={out}", *extra, "cluster.threads=1"]


def smoke_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bench.gpu_check", *smoke_args(out, *extra)]


def test_plan_puts_the_headline_measurements_first():
    check = load_check()
    keys = check.plan(check.GPU)
    assert len(keys) == len(set(keys))
    models = check.GPU.models
    per_model = len(check.VARIANTS) * len(check.GPU.batch_sizes)
    assert len(keys) == 2 + len(models) * (per_model + 2)
    assert keys[0] == "peak/start" and keys[-1] == "peak/end"
    # LLaDA's reference and fastest sampler cells and its LoRA step, then Dream's, then full fine-tuning.
    assert keys[1:7] == [
        "sampler/llada_8b_instruct/b16/plain",
        "sampler/llada_8b_instruct/b16/dual+threshold",
        "spg/llada_8b_instruct/lora",
        "sampler/dream_7b_instruct/b16/plain",
        "sampler/dream_7b_instruct/b16/dual+threshold",
        "spg/dream_7b_instruct/lora",
    ]
    assert keys[7:9] == ["spg/llada_8b_instruct/full", "spg/dream_7b_instruct/full"]
    for model in models:
        for batch in check.GPU.batch_sizes:
            for variant in check.VARIANTS:
                assert f"sampler/{model}/b{batch}/{variant}" in keys
    assert check.parse_key("sampler/tiny_llada/b16/dual+threshold") == {
        "kind": "sampler",
        "model": "tiny_llada",
        "batch": 16,
        "variant": "dual+threshold",
    }


def test_full_finetuning_takes_the_first_layout_that_fits():
    check = load_check()
    params = 8 * 10**9
    # An H200 (about 139 GiB) on a 128 GiB host: fp32 Adam fits neither, bf16 states fit the GPU.
    plan = check.full_finetune_plan(params, "bfloat16", 139 * GIB, 128 * GIB, offload=True)
    assert plan["name"] == "bf16_states"
    assert "+deepspeed.bf16.bf16_optimizer_states=true" in plan["overrides"]
    assert plan["estimates"]["on_device"]["device_bytes"] == 20 * params
    assert plan["estimates"]["offload"] == {"device_bytes": 4 * params, "host_bytes": 16 * params}
    # The same GPU with a large host: the optimizer goes to the CPU before any precision is given up.
    plan = check.full_finetune_plan(params, "bfloat16", 139 * GIB, 1024 * GIB, offload=True)
    assert plan["name"] == "offload"
    assert "+deepspeed.zero_optimization.offload_optimizer.device=cpu" in plan["overrides"]
    assert check.full_finetune_plan(params, "bfloat16", 256 * GIB, 0, offload=True)["name"] == "on_device"
    # No offload where the device is the host; float32 has no bf16-state layout.
    assert check.full_finetune_plan(params, "float32", 139 * GIB, 1024 * GIB, offload=False)["name"] is None
    assert check.full_finetune_plan(10**6, "float32", 8 * GIB, 8 * GIB, offload=False)["name"] == "on_device"
    assert check.attention_kernel("auto", torch.device("cpu")) == "sdpa"


def test_the_gpu_plans_configs_compose_at_the_8b_shapes():
    """What the GPU run composes for both models: the sampler cell and both SPG steps (the full one with
    the layout an H200 gets), validated as a run's config; parameters counted on the meta device."""
    check = load_check()
    args = SimpleNamespace(overrides=[])
    result = {"settings": {"attn_implementation": "sdpa", "dtype": "bfloat16"}, "calibration": {}}
    checker = check.Checker(args, check.GPU, torch.device("cpu"), result)
    for model in check.GPU.models:
        cfg = check.sampler_bench.speed_config(checker.sampler_args(model, 16))
        assert cfg["model"]["name"] == model and cfg["model"]["dtype"] == "bfloat16"
        assert (cfg["sampler"]["gen_length"], cfg["sampler"]["block_length"], cfg["sampler"]["steps"]) == (256, 32, 128)
        lora = check.spg.build_config(checker.spg_args(model, True, []))
        assert lora["model"]["lora"]["r"] == 128 and lora["objective"]["mc_samples"] == 2
        assert lora["rollout"]["samples_per_prompt"] == 6 and lora["deepspeed"]["zero_optimization"]["stage"] == 2
        params = checker.parameter_count(check.spg.build_config(checker.spg_args(model, False, [])))
        assert 7 * 10**9 < params < 9 * 10**9
        layout = check.full_finetune_plan(params, "bfloat16", 139 * GIB, 128 * GIB, offload=True)
        full = check.spg.build_config(checker.spg_args(model, False, layout["overrides"]))
        assert not full["model"]["lora"]["enabled"] and full["deepspeed"]["bf16"]["bf16_optimizer_states"] is True


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """A smoke run killed after a few measurements, then rerun with the same --out and a --page."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, page = tmp / "check.json", tmp / "RESULTS.md"
    page.write_text("# Results\n\nText before the section.\n")
    first = subprocess.Popen(
        smoke_command(out), cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        while first.poll() is None:
            if out.is_file() and len(json.loads(out.read_text())["measurements"]) >= 3:
                break
            time.sleep(0.05)
    finally:
        first.kill()
        _, first_err = first.communicate()
    assert out.is_file(), first_err[-3000:]
    cut = json.loads(out.read_text())
    missing = [key for key in cut["plan"] if key not in cut["measurements"]]
    if not missing:  # the whole plan finished before the kill landed: take the last two back out
        for key in cut["plan"][-2:]:
            del cut["measurements"][key]
        cut["peaks"] = cut["peaks"][:1]
        out.write_text(json.dumps(cut))
        missing = cut["plan"][-2:]
    second = run_module("bench.gpu_check", *smoke_args(out, f"--page={page}"), cwd=REPO, env=child_env())
    assert second.returncode == 0, second.stderr[-4000:]
    return {
        "cut": cut,
        "missing": missing,
        "second": second,
        "result": json.loads(out.read_text()),
        "markdown": out.with_suffix(".md").read_text(),
        "page": page.read_text(),
        "out": out,
    }


@pytest.mark.slow
def test_smoke_rerun_measures_only_what_the_cut_run_left(smoke):
    r, cut = smoke["result"], smoke["cut"]
    measured_again = [
        line.split("measuring ", 1)[1].removesuffix(" ...")
        for line in smoke["second"].stderr.splitlines()
        if line.startswith("gpu_check: measuring ")
    ]
    assert measured_again == smoke["missing"]
    assert r["complete"] and not r["failed"] and set(r["measurements"]) == set(r["plan"])
    for key, value in cut["measurements"].items():
        assert r["measurements"][key]["finished"] == value["finished"], key  # kept, not measured again
    assert len(r["runs"]) == 2 and "ended" in r["runs"][-1]


@pytest.mark.slow
def test_smoke_measures_every_sampler_cell_and_training_step(smoke):
    check = load_check()
    r = smoke["result"]
    sizes = check.SMOKE
    assert r["settings"]["smoke"] and r["settings"]["dtype"] == "float32"
    assert r["device"]["type"] == "cpu" and r["device"]["torch"] == torch.__version__
    assert r["peak"]["flops_per_second"] == max(p["flops_per_second"] for p in r["peaks"]) > 0
    for model in sizes.models:
        calibration = r["calibration"][model]
        assert calibration["tries"][-1]["tokens_per_step_mean"] >= calibration["target_tokens_per_step"]
        assert calibration["logit_scale"] == calibration["tries"][-1]["scale"] > 1
        for batch in sizes.batch_sizes:
            rows = {v: r["measurements"][f"sampler/{model}/b{batch}/{v}"] for v in check.VARIANTS}
            for variant, row in rows.items():
                assert (row["model"], row["batch_size"], row["variant"]) == (model, batch, variant)
                assert row["prompt_length"] == sizes.prompt_length and row["gen_length"] == sizes.gen_length
                assert row["tokens_per_second"] > 0 and 0 < row["mfu"] <= 1
                assert row["logit_scale"] == calibration["logit_scale"]
            assert rows["plain"]["nfe"] == sizes.steps
            assert rows["dual"]["nfe"] == sizes.steps
            assert rows["dual"]["forward_tokens"] < rows["prefix"]["forward_tokens"] < rows["plain"]["forward_tokens"]
            for name in ("threshold", "dual+threshold"):
                assert sizes.gen_length // sizes.block_length <= rows[name]["nfe"] <= sizes.gen_length
        # The first prompt's first block is the calibration's: there the threshold commits several tokens.
        assert r["measurements"][f"sampler/{model}/b1/threshold"]["tokens_per_step_max"] > 1
        for training in ("lora", "full"):
            step = r["measurements"][f"spg/{model}/{training}"]
            s = step["settings"]
            assert (s["model"], s["group"], s["mc"], s["zero_stage"]) == (model, sizes.group, sizes.mc, 2)
            assert all(step["phases"][name]["seconds"] > 0 for name in check.spg.PHASES)
            assert 0 < step["mfu"]["forward_backward"] <= 1 and 0 < step["mfu"]["step"] <= 1
            assert step["memory"]["peak_bytes"]["rss"] > 0
            trainable, total = step["model"]["params_trainable"], step["model"]["params_total"]
            if training == "lora":
                assert s["lora"]["r"] == sizes.lora_r and trainable < total
                assert step["full_finetune_layout"] is None
            else:
                assert s["lora"] is None and trainable == total
                assert step["full_finetune_layout"]["name"] == "on_device"


@pytest.mark.slow
def test_smoke_writes_markdown_and_the_page_section(smoke):
    check = load_check()
    md, page, r = smoke["markdown"], smoke["page"], smoke["result"]
    assert md.startswith("## GPU check") and "(complete)" in md
    table = [line for line in md.splitlines() if line.startswith("| tiny_")]
    sampler_rows = len(check.SMOKE.models) * len(check.SMOKE.batch_sizes) * len(check.VARIANTS)
    assert len(table) == sampler_rows + 2 * len(check.SMOKE.models)
    assert sum("| LoRA r4 |" in line for line in table) == 2
    assert sum("| full (ZeRO-2, optimizer on the device) |" in line for line in table) == 2
    assert page.startswith("# Results\n\nText before the section.\n")
    assert page.count(check.BEGIN) == 1 and page.count(check.END) == 1
    assert page.split(check.BEGIN, 1)[1].split(check.END, 1)[0].strip() == md.strip()
    # Another setting into the same file is refused before anything is measured.
    again = run_module(
        "bench.gpu_check", *smoke_args(smoke["out"]), "sampler.remasking=margin", cwd=REPO, env=child_env(), timeout=300
    )
    assert again.returncode != 0 and "other settings (overrides)" in again.stderr
    assert json.loads(smoke["out"].read_text())["measurements"] == r["measurements"]
