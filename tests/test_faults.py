"""Fault injection, checkpoints: a checkpoint either verifies or is skipped for an older one.

- byte-level damage (same size, other bytes) in every kind of file a checkpoint holds is detected,
  and resume falls back to the newest checkpoint that verifies, with a warning naming the file;
- weights with NaN are never written: not as a step checkpoint, last_good or an export (ZeRO-2 and 3);
- a crash in the middle of a save and a full disk keep the previous checkpoint and ``latest``; what
  they leave behind does not disturb the next save; a full disk is one line;
- rotation removes the older checkpoint only once its successor verifies;
- a run aborted on non-finite steps resumes from last_good at its last applied step and ends at
  train.steps, with the weights of a run that never failed.

Real runs (in-process ``worker.run``, tiny model, DeepSpeed on gloo) and real DeepSpeed engines; the
faults are injected (damaged bytes, an OSError from torch.save, a NaN loss from the objective).
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dllm_rl import checkpoint
from dllm_rl.config import CheckpointCfg, ModelCfg
from dllm_rl.errors import DllmRlError, NonFiniteError
from dllm_rl.models.policy import build_tiny

# Three rollout rounds of two steps (mu 2), a checkpoint after every step (odd steps fall inside a
# round and carry its rollouts), few prompts, short evaluations.
RUN = [
    "~testbed",
    "~testbed_objective",
    "objective.inner_iterations=2",
    "train.steps=6",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.micro_batch=16",
    "train.micro_batch_per_gpu=16",
    "eval.num_examples=8",
    "eval.every_n_steps=0",
    "checkpoint.every_n_steps=1",
    "checkpoint.keep_last=10",
    "warmstart.steps=10",
    "task.train_size=100",
    "task.validation_size=8",
    "task.test_size=8",
    "logging=none",
    "cluster.threads=1",
]


def run_config(run_dir: Path, cache: Path, *extra: str) -> dict:
    """The resolved config python -m dllm_rl would hand its worker."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from dllm_rl.config import apply_round_budget, validate

    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*RUN, f"cache_dir={cache}", *extra])
    OmegaConf.to_object(cfg)
    apply_round_budget(cfg)
    validate(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    plain["run_dir"] = str(run_dir)
    return plain


def train(cfg: dict) -> dict:
    from dllm_rl.worker import run

    return run(cfg)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted tiny run: (its run directory, the cache holding its warm-started base)."""
    root = tmp_path_factory.mktemp("faults")
    run_dir, cache = root / "run", root / "cache"
    summary = train(run_config(run_dir, cache))
    assert summary["steps"] == 6
    return run_dir, cache


def step_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def damage(path: Path, at: float = 0.5, count: int = 4096) -> None:
    """Flip up to ``count`` bytes from ``at`` of the file's length on: same size, other content."""
    data = bytearray(path.read_bytes())
    start = min(int(len(data) * at), max(len(data) - count, 0))
    end = min(start + count, len(data))
    data[start:end] = bytes(b ^ 0xFF for b in data[start:end])
    path.write_bytes(bytes(data))


# Every kind of file a checkpoint holds, by a glob inside the checkpoint directory.
KINDS = {
    "deepspeed model states": "mp_rank_*_model_states.pt",
    "deepspeed optimizer states": "*optim_states.pt",
    "rank state (RNG, rollout buffer)": "rank0_state.pt",
    "hf weights": "hf/model.safetensors",
    "hf config": "hf/config.json",
    "hf tokenizer": "hf/tokenizer.json",
    "hf chat template": "hf/chat_template.jinja",
    "manifest": "manifest.json",
}


@pytest.mark.slow
def test_every_file_of_a_checkpoint_is_hashed_and_of_a_kind_below(finished):
    run_dir, _ = finished
    step = run_dir / "checkpoints" / "step_5"
    info = checkpoint.manifest(step)
    assert info["hash"] == checkpoint.HASH and set(info["digests"]) == set(info["files"])
    on_disk = {str(f.relative_to(step)) for f in step.rglob("*") if f.is_file() and f.name != "manifest.json"}
    assert set(info["files"]) == on_disk
    kinds = {str(f.relative_to(step)) for pattern in KINDS.values() for f in step.glob(pattern)}
    others = set(info["files"]) - kinds
    # the rest of hf/ is more of the same kind: JSON configs (tokenizer_config.json)
    assert others and all(f.startswith("hf/") and f.endswith(".json") for f in others), others
    # The odd steps fall inside a round: they resume with the round's rollouts.
    assert "buffer" in torch.load(step / "rank0_state.pt", weights_only=True)
    assert checkpoint.problem(step) is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_bytes_in_any_checkpoint_file_fall_back_to_the_previous_checkpoint(finished, tmp_path, kind, caplog):
    from dllm_rl.worker import resume_point

    source, cache = finished
    run_dir = tmp_path / "run"
    shutil.copytree(source / "checkpoints", run_dir / "checkpoints", ignore=shutil.ignore_patterns("final", "best"))
    ckpt = run_dir / "checkpoints"
    (ckpt / "latest").write_text("step_5")
    target = next((ckpt / "step_5").glob(KINDS[kind]))
    size = target.stat().st_size
    damage(target, count=16 if target.suffix in (".json", ".jinja") else 4096)
    assert target.stat().st_size == size
    why = checkpoint.problem(ckpt / "step_5")
    assert why is not None and (target.name in why or "manifest.json" in why), why
    with caplog.at_level(logging.WARNING):
        assert resume_point(CheckpointCfg(resume_mode="auto"), run_dir) == ckpt / "step_4"
    assert f"checkpoint {ckpt / 'step_5'} cannot be resumed from: {why}" in caplog.text
    assert f"resuming from {ckpt / 'step_4'}, the newest checkpoint that verifies" in caplog.text


@pytest.mark.slow
def test_a_manifest_edited_into_other_valid_json_is_detected(finished, tmp_path):
    step = tmp_path / "step_5"
    shutil.copytree(finished[0] / "checkpoints" / "step_5", step)
    text = (step / "manifest.json").read_text()
    assert '"global_step": 5' in text
    (step / "manifest.json").write_text(text.replace('"global_step": 5', '"global_step": 6'))
    assert checkpoint.problem(step) == "manifest.json is damaged (its own hash does not match its content)"


@pytest.mark.slow
def test_a_manifest_without_hashes_is_still_accepted_on_sizes(finished, tmp_path, caplog):
    """Checkpoints of an older dllm_rl (sizes only) keep resuming; a wrong size is still caught."""
    step = tmp_path / "step_5"
    shutil.copytree(finished[0] / "checkpoints" / "step_5", step)
    info = checkpoint.manifest(step)
    old = {k: info[k] for k in ("global_step", "wandb_id", "files")}
    (step / "manifest.json").write_text(json.dumps(old, indent=1))
    with caplog.at_level(logging.WARNING, logger="dllm_rl.checkpoint"):
        assert checkpoint.problem(step) is None
    assert "has no content hashes" in caplog.text and "file sizes only" in caplog.text
    shard = next(step.glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert checkpoint.problem(step) == f"{shard.name} has 100 bytes, {info['files'][shard.name]} when saved"


# ----------------------------------------------------------------------------- saves on a real engine

TINY = ModelCfg(name="tiny", hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64, dtype="float32")


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def engine(request):
    """A policy and its DeepSpeed engine at ZeRO stage 2 or 3 (partitioned for real)."""
    import deepspeed

    from dllm_rl.distributed import init_distributed

    init_distributed("gloo")
    policy = build_tiny(TINY, "01234", seed=0)
    zero = {"stage": request.param}
    if request.param == 3:
        zero["stage3_param_persistence_threshold"] = 0
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=policy.model, model_parameters=list(policy.model.parameters()), config=config
    )
    policy.forward_module = engine
    return policy, engine


def save(engine, root: Path, tag: str, keep_last: int = 2) -> Path:
    policy, engine = engine
    return checkpoint.save(engine, policy, root, tag, {"global_step": 1}, keep_last, rank_state={"x": torch.ones(2)})


def poisoned(engine, name: str):
    """A context in which parameter ``name`` holds a NaN (written through ZeRO-3's gather)."""
    import contextlib

    import deepspeed

    @contextlib.contextmanager
    def context():
        param = dict(engine.module.named_parameters())[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            saved = param.data.clone()
            param.data.view(-1)[3] = float("nan")
        try:
            yield
        finally:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(saved)

    return context()


def test_nan_weights_are_never_saved_nor_exported(engine, tmp_path):
    from dllm_rl.trainer import BEST, LAST_GOOD

    policy, ds = engine
    root = tmp_path / "checkpoints"
    save(engine, root, "step_1")
    before = sorted(p.name for p in root.iterdir())
    name = [n for n, _ in ds.module.named_parameters()][2]
    with poisoned(ds, name):
        assert checkpoint.first_nonfinite(ds) == name
        for tag in ("step_2", LAST_GOOD, "final"):
            with pytest.raises(NonFiniteError) as err:
                save(engine, root, tag)
            message = str(err.value)
            assert f"checkpoint {tag} not saved: parameter {name} holds non-finite values" in message
            assert "\n" not in message
        with pytest.raises(NonFiniteError, match=f"export {BEST} not saved: parameter {name}"):
            checkpoint.export(ds, policy, root, BEST)
    assert sorted(p.name for p in root.iterdir()) == before
    assert (root / "latest").read_text() == "step_1" and checkpoint.problem(root / "step_1") is None
    assert checkpoint.first_nonfinite(ds) is None


def _no_leftovers(root: Path) -> None:
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_a_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(engine, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(engine, root, "step_1", keep_last=1)
    real_save, calls = torch.save, []

    def crash_on_second(obj, f, *args, **kwargs):  # after DeepSpeed's first shard is on disk
        calls.append(f)
        if len(calls) == 2:
            raise RuntimeError("injected crash")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_second)
    with pytest.raises(RuntimeError, match="injected crash"):
        save(engine, root, "step_2", keep_last=1)
    monkeypatch.undo()
    assert (root / "latest").read_text() == "step_1" and checkpoint.problem(root / "step_1") is None
    assert not (root / "step_2").exists()
    # What a killed save leaves behind (nothing ran to clean it up) does not disturb the next one.
    shutil.copytree(root / "step_1", root / ".staging-step_2" / "step_2")
    shutil.copytree(root / "step_1", root / ".old-step_1")
    (root / ".latest.tmp-12345").write_text("step_9")
    save(engine, root, "step_2", keep_last=1)
    assert (root / "latest").read_text() == "step_2" and checkpoint.problem(root / "step_2") is None
    assert not (root / "step_1").exists()  # rotated out once step_2 verified
    _no_leftovers(root)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(engine, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(engine, root, "step_1", keep_last=1)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # half a file written, then ENOSPC
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:64])
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DllmRlError) as err:
        save(engine, root, "step_2", keep_last=1)
    monkeypatch.undo()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint step_2 could not be written in {root}: No space left on device (")
    assert message.endswith(f"; latest still names {root / 'step_1'}")
    assert (root / "latest").read_text() == "step_1" and checkpoint.problem(root / "step_1") is None
    _no_leftovers(root)  # the partial files are gone, their space given back
    save(engine, root, "step_2", keep_last=1)
    assert checkpoint.problem(root / "step_2") is None and not (root / "step_1").exists()


def test_rotation_waits_until_the_new_checkpoint_verifies(engine, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(engine, root, "step_1", keep_last=1)
    monkeypatch.setattr(checkpoint, "verify", lambda path: "rank0_state.pt is damaged (injected)")
    with pytest.raises(DllmRlError, match="checkpoint step_2 does not verify right after it was written"):
        save(engine, root, "step_2", keep_last=1)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]
    assert checkpoint.problem(root / "step_1") is None


def test_rotation_never_removes_the_checkpoint_just_saved(engine, tmp_path):
    """A run resumed from step_4 (a newer step_6 was damaged) writes step_5: step_6 belongs to the
    abandoned timeline and goes; before, keep_last=1 kept step_6 and removed the step_5 just written."""
    root = tmp_path / "checkpoints"
    save(engine, root, "step_4", keep_last=1)
    shutil.copytree(root / "step_4", root / "step_6")
    damage(next((root / "step_6").glob("*optim_states.pt")))
    save(engine, root, "step_5", keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_5"]
    assert checkpoint.resumable(root) == (root / "step_5", [])


# ----------------------------------------------------------------------------- last_good


@pytest.mark.slow
def test_last_good_resumes_at_the_last_applied_step_and_runs_to_train_steps(finished, tmp_path, monkeypatch):
    """Steps 4-6 get a NaN loss (step 4 is inner step 1 of round 1): three skips in a row abort after
    step 6 with last_good at step 3, inside round 1. Resumed with the fault gone, the run redoes steps
    4-6 from round 1's rollouts and ends where the run that never failed ended."""
    from dllm_rl.objectives.base import OBJECTIVES
    from dllm_rl.trainer import LAST_GOOD

    reference, cache = finished
    run_dir = tmp_path / "run"
    cfg = run_config(run_dir, cache, "checkpoint.every_n_steps=0")
    objective = OBJECTIVES[cfg["objective"]["name"]]
    real_loss = objective.loss

    def nan_loss(self, batch, policy, inner_step):
        loss, metrics = real_loss(self, batch, policy, inner_step)
        return (loss * float("nan"), metrics) if (batch.round, inner_step) >= (1, 1) else (loss, metrics)

    monkeypatch.setattr(objective, "loss", nan_loss)
    with pytest.raises(NonFiniteError, match=r"steps 4-6: .*last applied step \(step 3\)"):
        train(cfg)
    monkeypatch.undo()
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == LAST_GOOD
    assert checkpoint.manifest(ckpt / LAST_GOOD)["global_step"] == 3

    summary = train(cfg)
    assert summary["steps"] == 6 and summary["resumed_from"] == str(ckpt / LAST_GOOD)
    records = step_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert not any(r["skipped"] for r in records)
    drop = ("seconds", "per_s")
    same = [{k: v for k, v in r.items() if not k.endswith(drop)} for r in step_records(reference)]
    assert [{k: v for k, v in r.items() if not k.endswith(drop)} for r in records] == same
    a, b = (load_file(d / "checkpoints" / "final" / "hf" / "model.safetensors") for d in (run_dir, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the hash's cost


def test_checkpoint_hash_bench_measures_the_hash_and_the_save(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "checkpoint_hash", Path(__file__).parents[1] / "bench" / "checkpoint_hash.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "hash.json"
    assert (
        bench.main(["--size-mb=1", "--repeats=1", f"--json={out}", f"cache_dir={tmp_path}", "task.train_size=50"]) == 0
    )
    info = json.loads(out.read_text())
    chosen = [r for r in info["hashes"] if r["chosen"]]
    assert {r["where"] for r in chosen} == {"memory", "file (page cache)"} and info["hash"] == checkpoint.HASH
    assert all(r["s_per_gb"] > 0 for r in info["hashes"]) and {r["hash"] for r in info["hashes"]} >= {"sha256"}
    save = info["save"]
    assert save["checkpoint_bytes"] > 0 and save["files"] >= 5 and save["save_seconds_hashed"] > 0
    assert "s/GB" in capsys.readouterr().out
