"""Atomic DeepSpeed checkpoints.

DeepSpeed's ``save_checkpoint`` writes shards in place, so a crash mid-save would leave a
half-written directory under its final name. Here every checkpoint is written under a temporary
name, renamed into place when complete, and only then recorded in ``latest``: a reader sees the
previous checkpoint or the new one, never a partial one. Each checkpoint also carries a
``save_pretrained`` export (hf/) that loads with ``model.path=<checkpoint>/hf``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dllm_rl.models.policy import Policy

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"  # every file of a complete checkpoint with its size, written last


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rank_state_file(rank: int) -> str:
    """Per-rank state that DeepSpeed's client_state (rank 0 only) cannot hold: RNGs, the rollout buffer."""
    return f"rank{rank}_state.pt"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(
    engine: Any,
    policy: Policy,
    root: Path,
    tag: str,
    client_state: dict[str, Any],
    keep_last: int,
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Save a complete checkpoint as root/<tag> (collective: every rank calls it).

    ``rank_state`` (this rank's RNG states, rollout buffer) goes to rank<r>_state.pt beside DeepSpeed's
    files; the manifest listing every file and its size is written last, and only then is the
    directory renamed into place and named in ``latest``.
    """
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{tag}"
    if _is_main():
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    # A LoRA run's frozen base never changes and lives in its own checkpoint: store only what trains.
    frozen_base = any(not p.requires_grad for p in policy.model.parameters())
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, exclude_frozen_parameters=frozen_base)
    if rank_state is not None:
        torch.save(rank_state, staging / tag / rank_state_file(_rank()))
    weights = _gathered_weights(engine)
    _barrier()
    final = root / tag
    if _is_main():
        policy.save(staging / tag / "hf", state_dict=weights)
        _write_manifest(staging / tag, client_state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging / tag, final)
        shutil.rmtree(staging, ignore_errors=True)
        write_text_atomic(root / LATEST, tag)
        _prune(root, keep_last)
    _barrier()
    return final


def export(engine: Any, policy: Policy, root: Path, tag: str) -> str:
    """A save_pretrained export alone (no optimizer state) as root/<tag>/hf, replaced atomically
    (collective). Used for checkpoints/best, which is only ever loaded for evaluation."""
    weights = _gathered_weights(engine)
    final = root / tag
    if _is_main():
        staging = root / f".staging-{tag}"
        shutil.rmtree(staging, ignore_errors=True)
        policy.save(staging / "hf", state_dict=weights)
        # Rename the old export aside first so that a crash leaves either the old or the new one.
        old = root / f".old-{tag}"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return str(final / "hf")


def _gathered_weights(engine: Any) -> dict[str, Any] | None:
    """Under ZeRO-3 the module's own tensors are empty partitions, so the export needs the weights
    gathered (collective, one layer at a time, complete on rank 0 only); None: the module holds them."""
    if not engine.zero_optimization_partition_weights():
        return None
    return engine._zero3_consolidated_16bit_state_dict()


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` step checkpoints (named step_<n>); others like 'final' stay."""
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)) and p.is_dir()
    )
    for _, path in steps[:-keep_last] if keep_last > 0 else steps:
        shutil.rmtree(path, ignore_errors=True)


def _write_manifest(path: Path, client_state: dict[str, Any]) -> None:
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    info = {"global_step": client_state.get("global_step"), "wandb_id": client_state.get("wandb_id"), "files": files}
    write_text_atomic(path / MANIFEST, json.dumps(info, indent=1))


def problem(path: Path) -> str | None:
    """Why the checkpoint directory cannot be resumed from (None: complete, every file at its size)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is not valid JSON"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} when saved"
    return None


def candidates(root: Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one ``latest`` names, then step_<n> newest first.

    ``final`` (a finished run) and last_good (a run stopped on non-finite steps) are only used
    when ``latest`` names them.
    """
    if not root.is_dir():
        return []
    steps = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)) and p.is_dir()),
        reverse=True,
    )
    ordered = [p for _, p in steps]
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        ordered = [named, *[p for p in ordered if p != named]]
    return ordered


def resumable(root: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under root, and a warning for each newer one that is not."""
    warnings = []
    for path in candidates(root):
        why = problem(path) if path.is_dir() else "it does not exist"
        if why is None:
            return path, warnings
        warnings.append(f"checkpoint {path} cannot be resumed from: {why}")
    return None, warnings


def manifest(path: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint: global_step, wandb_id, files."""
    return json.loads((path / MANIFEST).read_text())


def load_rank_state(path: Path) -> dict[str, Any] | None:
    """This rank's saved state (weights-only load: tensors and plain Python values)."""
    f = path / rank_state_file(_rank())
    return torch.load(f, weights_only=True) if f.is_file() else None


def latest(root: Path) -> Path | None:
    """The checkpoint named by root/latest, if it exists and is complete."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None
