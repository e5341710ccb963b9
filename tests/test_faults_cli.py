"""Entry points and console (docs/RELIABILITY.md, "Entry points and console"): every entry point's
--help, one summary and one error line, DeepSpeed's and the compiler's build noise in the rank log
instead of the console, NFE that means the same in evaluate and training, evaluate naming the
checkpoint it scored, and the Makefile swapping torch when TORCH_SPEC changes."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from forked import run_module
from run_configs import composed
from test_e2e import FAST, REPO, child_env, run_cli

from dllm_rl.evaluate import resolve_checkpoint

# --------------------------------------------------------------------------------------------- --help
# (module, what its --help must list); the Hydra ones list their config groups and keys.
HELP = [
    ("dllm_rl.__main__", ["python -m dllm_rl [group=option", "objective: ", "train:", "micro_batch_per_gpu"]),
    ("dllm_rl.evaluate", ["python -m dllm_rl.evaluate", "evaluate:", "checkpoint:", "gen_lengths"]),
    ("dllm_rl.experiments.report", ["python -m dllm_rl.experiments.report", "root"]),
    (
        "dllm_rl.experiments.reproduce",
        ["python -m dllm_rl.experiments.reproduce", "--quick", "--out", "--page", "--lanes", "--report-only"],
    ),
    ("dllm_rl.merge", ["adapter", "output", "--base", "--dtype"]),
    ("dllm_rl.worker", ["python -m dllm_rl.worker", "config"]),
    ("dllm_rl.variance", ["python -m dllm_rl.variance", "variance:", "rounds"]),
]
HYDRA_MAINS = {"dllm_rl.__main__", "dllm_rl.evaluate", "dllm_rl.variance"}


def test_every_entry_point_help_exits_0_and_lists_its_options(monkeypatch, capsys):
    """In-process: each main exactly as `python -m <module> --help` calls it (a subprocess each
    would spend most of its time importing torch)."""
    for name, expected in HELP:
        module = importlib.import_module(name)
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            module.main() if name in HYDRA_MAINS else module.main(["--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code in (0, None), (name, exit_info.value.code)
        for text in expected:
            assert text in out, (name, text, out[:2000])
    from dllm_rl.variance import report_main

    with pytest.raises(SystemExit) as exit_info:
        report_main(["--help"])
    assert exit_info.value.code == 0 and "--page" in capsys.readouterr().out


def test_help_applies_the_overrides_and_lists_the_config_groups(monkeypatch, capsys):
    """`python -m dllm_rl objective=gdsd --help` shows GDSD's keys and every group under conf/."""
    from dllm_rl.__main__ import main
    from dllm_rl.cli_help import config_groups

    monkeypatch.setattr(sys, "argv", ["dllm_rl", "objective=gdsd", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "  name: gdsd" in out and "mc_pairs:" in out and "  name: spg" not in out
    groups = config_groups()
    assert groups["objective"] == ["diffu_grpo", "dmpo", "elbo", "gdsd", "rloo_elbo", "spg", "wd1"]
    assert "random" in groups["objective/mask"] and "tiny" in groups["model"]
    for name, options in groups.items():
        assert f"{name}: {', '.join(options)}" in out
    assert "Use --hydra-help" in out


def test_help_with_a_bad_override_is_one_error_line(monkeypatch, capsys):
    from dllm_rl.__main__ import main

    monkeypatch.setattr(sys, "argv", ["dllm_rl", "objective=nope", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "objective" in err and "nope" in err


# ------------------------------------------------------------------------------------------- console
def test_error_line_is_printed_once_below_an_open_progress_bar_and_logged_once(tmp_path, capsys):
    from tqdm.auto import tqdm

    from dllm_rl.console import say_error

    root = logging.getLogger()
    console, logfile = logging.StreamHandler(sys.stderr), logging.FileHandler(tmp_path / "job.log")
    root.addHandler(console)
    root.addHandler(logfile)
    try:
        bar = tqdm(total=4, desc="RL", file=sys.stderr)
        bar.update(2)  # the run fails here, its bar still open
        say_error("reward 'r' returned nan")
    finally:
        root.removeHandler(console)
        root.removeHandler(logfile)
        logfile.close()
    err = capsys.readouterr().err
    assert err.count("reward 'r' returned nan") == 1
    assert "\nerror: reward 'r' returned nan\n" in err  # on a line of its own, after the bar's
    assert (tmp_path / "job.log").read_text().count("reward 'r' returned nan") == 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny real run: several rollout micro-batches (rollout.micro_batch=8 for 16 completions) and
    evaluation batches (eval.batch_size=8 for 32 examples), validation off (no checkpoints/best)."""
    root = tmp_path_factory.mktemp("faults_cli")
    run_dir = root / "run"
    args = [*FAST, "eval.batch_size=8", "eval.splits=[test]"]
    # a new interpreter: the libraries' import-time output is part of what the tests below check
    proc = run_cli(*args, f"cache_dir={root / 'cache'}", f"hydra.run.dir={run_dir}", "logging=none", fresh=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run_dir, proc


NOISE = {
    "DeepSpeed's accelerator warning": "Setting accelerator to CPU",
    "the compiler probes' gcc lines": "compilers.C.base",
    "the shm op's build message": "shm_comm_op built successfully",
}


@pytest.mark.slow
def test_summary_once_and_library_noise_only_in_the_rank_log(trained):
    _, run_dir, proc = trained
    console = proc.stdout + proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("spg on sudoku: test cell_acc") and str(run_dir) in line
    assert console.count(line) == 1
    assert (run_dir / "__main__.log").read_text().count(line) == 1
    assert summary["steps"] == 4
    rank_log = (run_dir / "logs" / "rank0.log").read_text()
    cpu_build = not torch.cuda.is_available() and shutil.which("gcc") is not None
    for what, text in NOISE.items():
        assert text not in console, f"{what} reached the console"
        if cpu_build:
            assert text in rank_log, f"{what} is missing from logs/rank0.log"


@pytest.fixture(scope="module")
def evaluated(trained):
    """python -m dllm_rl.evaluate on the run directory, at the training length and steps (16 tokens,
    one block, 8 steps) in batches of 5."""
    root, run_dir, _ = trained
    out = root / "eval"
    proc = run_module(
        "dllm_rl.evaluate",
        f"evaluate.checkpoint={run_dir}",
        "evaluate.gen_lengths=[16]",
        "evaluate.steps_per_token=0.5",
        "evaluate.subset_size=12",
        "evaluate.batch_size=5",
        "task.train_size=500",
        "task.validation_size=32",
        "task.test_size=32",
        "logging=none",
        f"cache_dir={root / 'cache'}",
        f"hydra.run.dir={out}",
        cwd=REPO,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, out, proc


@pytest.mark.slow
def test_nfe_is_forwards_per_sequence_in_evaluate_and_training(trained, evaluated):
    _, run_dir, _ = trained
    _, out, _ = evaluated
    steps = json.loads((out / "metrics.json").read_text())["per_length"]["16"]
    assert steps["steps"] == 8
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_eval_nfe = {r["eval/nfe"] for r in records if "eval/nfe" in r}
    rollout_nfe = {r["rollout_nfe"] for r in records if "rollout_nfe" in r}
    # 3 evaluation batches, 4 training evaluation batches, 2 rollout micro-batches: one sequence's forwards.
    assert steps["nfe"] == 8.0 and train_eval_nfe == {8.0} and rollout_nfe == {8.0}


@pytest.mark.slow
def test_evaluate_names_the_checkpoint_it_scored_and_why(evaluated):
    run_dir, out, proc = evaluated
    result = json.loads((out / "metrics.json").read_text())
    final = str(run_dir / "checkpoints" / "final" / "hf")
    assert result["checkpoint"] == final
    why = "the run's last weights: no checkpoints/best/hf, since validation was off (eval.splits)"
    assert result["checkpoint_choice"] == why
    line = proc.stdout.strip().splitlines()[-1]
    assert line.endswith(f"checkpoint {final} ({result['checkpoint_choice']})")
    assert (proc.stdout + proc.stderr).count(line) == 1


def test_checkpoint_choice_says_why_there_is_no_best(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "final" / "hf").mkdir(parents=True)
    (run / "checkpoints" / "final" / "hf" / "config.json").write_text("{}")
    cfg = composed()
    assert cfg.model.path is None and cfg.model.name == "tiny"
    cfg.evaluate.checkpoint = str(run)
    path, why = resolve_checkpoint(cfg)
    assert path == str(run / "checkpoints" / "final" / "hf") and "no summary.json says why" in why
    (run / "summary.json").write_text(json.dumps({"best": {"step": 0}}))
    assert "validation never beat the starting weights" in resolve_checkpoint(cfg)[1]
    (run / "summary.json").write_text(json.dumps({"best": {"step": 6}}))
    assert "the export of step 6 (best on validation) is missing" in resolve_checkpoint(cfg)[1]
    (run / "checkpoints" / "best" / "hf").mkdir(parents=True)
    (run / "checkpoints" / "best" / "hf" / "config.json").write_text("{}")
    path, why = resolve_checkpoint(cfg)
    assert path == str(run / "checkpoints" / "best" / "hf") and why == "the run's best on validation"


# -------------------------------------------------------------------------------------------- Makefile
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_swaps_torch_only_when_torch_spec_changes(tmp_path):
    """Dry runs (make -n) against a fake venv: nothing is installed."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()  # newer than pyproject.toml: the venv is up to date
    (venv / ".torch-spec").write_text("torch==2.13.0\n")

    def dry_run(*args: str) -> str:
        proc = subprocess.run(
            ["make", "-n", "install", f"VENV={venv}", *args], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "pip" not in dry_run()  # no TORCH_SPEC: keep the venv's torch
    assert "pip" not in dry_run("TORCH_SPEC=torch==2.13.0")  # the recorded one
    swap = dry_run("TORCH_SPEC=torch==2.13.0+cu128")
    assert "pip uninstall --quiet --yes torch" in swap and "pip install --quiet 'torch==2.13.0+cu128'" in swap
    assert "'torch==2.13.0+cu128' > " in swap  # and records it
    assert "-e '.[dev]'" not in swap  # the rest of the venv stays
    (venv / ".torch-spec").unlink()  # a venv made before the record existed
    assert "pip uninstall" in dry_run("TORCH_SPEC=torch==2.13.0") and "pip" not in dry_run()
