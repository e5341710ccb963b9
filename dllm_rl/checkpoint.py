"""Atomic, checksummed DeepSpeed checkpoints.

DeepSpeed's ``save_checkpoint`` writes shards in place, so a crash mid-save would leave a
half-written directory under its final name. Here every checkpoint is written under a temporary
name (``.staging-<tag>``), described by a manifest of every file's size and content hash (xxh3-128,
see docs/RELIABILITY.md for its cost), verified against it, renamed into place and only then named
in ``latest``; older step checkpoints are rotated out after that. A reader sees the previous
checkpoint or the new one, never a partial one, and resume detects a damaged file (same size,
different bytes) and falls back to an older checkpoint. Weights with non-finite values are never
written. Each checkpoint also carries a ``save_pretrained`` export (hf/) that loads with
``model.path=<checkpoint>/hf``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import xxhash

from dllm_rl.errors import DllmRlError, NonFiniteError
from dllm_rl.models.policy import Policy

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"  # every file of a complete checkpoint with its size and hash, written last
# Non-cryptographic: it detects damaged bytes, not tampering. Its cost per GB: bench/checkpoint_hash.py,
# docs/RELIABILITY.md.
HASH = "xxh3_128"
_CHUNK = 8 << 20  # bytes read per hash update
T = TypeVar("T")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank_state_file(rank: int) -> str:
    """Per-rank state that DeepSpeed's client_state (rank 0 only) cannot hold: RNGs, the rollout buffer."""
    return f"rank{rank}_state.pt"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order."""
    if _world() == 1:
        return [value]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, value)
    return out


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_digest(path: Path) -> str:
    """The content hash the manifest records for a file (HASH, hex)."""
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(min(_CHUNK, os.fstat(f.fileno()).st_size) or 1)  # small files: no 8 MB buffer
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def _manifest_digest(info: dict[str, Any]) -> str:
    """The manifest's hash of its own entries, so that damage to manifest.json itself shows too."""
    body = {k: v for k, v in info.items() if k != "digest"}
    return xxhash.xxh3_128(json.dumps(body, sort_keys=True).encode()).hexdigest()


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

    Refused (NonFiniteError, nothing written) when a parameter holds NaN or Inf. ``rank_state`` (this
    rank's RNG states, rollout buffer) goes to rank<r>_state.pt beside DeepSpeed's files; the manifest
    of every file's size and hash is written last and the directory verified against it; only then is
    it renamed into place, named in ``latest`` and are older step checkpoints rotated out. A failed
    write (a full disk) is one DllmRlError line; the previous checkpoint and ``latest`` stay as they were.
    """
    refuse_nonfinite(engine, f"checkpoint {tag}", root)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{tag}"
    if _is_main():
        _remove_leftovers(root)
    _barrier()
    # A LoRA run's frozen base never changes and lives in its own checkpoint: store only what trains.
    frozen_base = any(not p.requires_grad for p in policy.model.parameters())

    def shards() -> None:
        engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, exclude_frozen_parameters=frozen_base)
        if rank_state is not None:
            torch.save(rank_state, staging / tag / rank_state_file(_rank()))

    try:
        _each_rank(root, tag, shards)
        weights = _gathered_weights(engine)
        _each_rank(root, tag, lambda: policy.save(staging / tag / "hf", state_dict=weights) if _is_main() else None)
        mine = _each_rank(root, tag, lambda: _hash_share(staging / tag))
        digests = {name: digest for share in _gather(mine) for name, digest in share.items()}
        _each_rank(root, tag, lambda: _write_manifest(staging / tag, client_state, digests) if _is_main() else None)
        why = verify(staging / tag)
        if why is not None:
            raise DllmRlError(f"checkpoint {tag} does not verify right after it was written: {why}")
        _each_rank(root, tag, lambda: _publish(root, tag, keep_last) if _is_main() else None)
    except BaseException:
        if _is_main():
            shutil.rmtree(staging, ignore_errors=True)  # give the space back (the next save would anyway)
        raise
    return root / tag


def _publish(root: Path, tag: str, keep_last: int) -> None:
    """Rename the verified staging directory into place, name it in ``latest``, rotate (rank 0)."""
    final, old = root / tag, root / f".old-{tag}"
    # An older directory of the same tag is renamed aside first: a crash leaves one of the two.
    if final.exists():
        os.replace(final, old)
    os.replace(root / f".staging-{tag}" / tag, final)
    write_text_atomic(root / LATEST, tag)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(root / f".staging-{tag}", ignore_errors=True)
    _prune(root, keep_last, tag)


def _each_rank(root: Path, tag: str, step: Callable[[], T]) -> T:
    """This rank's part of a collective save, then a barrier at which the ranks agree: when it failed
    with an OSError (a full disk, a vanished directory) on any rank, every rank raises the same
    one-line DllmRlError."""
    result, reason = None, None
    try:
        result = step()
    except OSError as exc:
        reason = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    failures = [(rank, r) for rank, r in enumerate(_gather(reason)) if r is not None]
    if failures:
        rank, reason = failures[0]
        previous = _named_by_latest(root)
        kept = f"latest still names {previous}" if previous is not None else "there is no earlier checkpoint"
        on_rank = f" (rank {rank})" if _world() > 1 else ""
        raise DllmRlError(f"checkpoint {tag} could not be written in {root}{on_rank}: {reason}; {kept}")
    return result  # type: ignore[return-value]


def export(engine: Any, policy: Policy, root: Path, tag: str) -> str:
    """A save_pretrained export alone (no optimizer state) as root/<tag>/hf, replaced atomically
    (collective). Used for checkpoints/best, which is only ever loaded for evaluation. Refused
    (NonFiniteError) when a parameter holds NaN or Inf; a failed write keeps the previous export."""
    refuse_nonfinite(engine, f"export {tag}", root)
    weights = _gathered_weights(engine)
    _each_rank(root, tag, lambda: _replace_export(policy, root, tag, weights) if _is_main() else None)
    return str(root / tag / "hf")


def _replace_export(policy: Policy, root: Path, tag: str, weights: dict[str, Any] | None) -> None:
    final, staging, old = root / tag, root / f".staging-{tag}", root / f".old-{tag}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        policy.save(staging / "hf", state_dict=weights)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Rename the old export aside first so that a crash leaves either the old or the new one.
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def first_nonfinite(engine: Any) -> str | None:
    """The first parameter (in module order) holding NaN or Inf on any rank, or None (collective).

    Under ZeRO-3 each rank checks its own partition (``ds_tensor``); together they cover every weight.
    """
    bad = None
    for index, (name, p) in enumerate(engine.module.named_parameters()):
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        if any(not torch.isfinite(part).all() for part in local.detach().reshape(-1).split(1 << 26)):
            bad = (index, name)
            break
    found = [b for b in _gather(bad) if b is not None]
    return min(found)[1] if found else None


def refuse_nonfinite(engine: Any, what: str, root: Path) -> None:
    """Raise NonFiniteError naming ``what`` and the first non-finite parameter, if there is one."""
    name = first_nonfinite(engine)
    if name is not None:
        raise NonFiniteError(
            f"{what} not saved: parameter {name} holds non-finite values (NaN or Inf), so the weights are "
            f"corrupt; nothing was written and the checkpoints already in {root} are kept"
        )


def _gathered_weights(engine: Any) -> dict[str, Any] | None:
    """Under ZeRO-3 the module's own tensors are empty partitions, so the export needs the weights
    gathered (collective, one layer at a time, complete on rank 0 only); None: the module holds them."""
    if not engine.zero_optimization_partition_weights():
        return None
    return engine._zero3_consolidated_16bit_state_dict()


def _remove_leftovers(root: Path) -> None:
    """What an interrupted save left behind: staging directories, set-aside old ones, temporary files."""
    for p in root.iterdir():
        if p.name.startswith((".staging-", ".old-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{LATEST}.tmp-") and p.is_file():
            p.unlink(missing_ok=True)


def _step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(n, path) of every step_<n> directory, oldest first."""
    return sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)) and p.is_dir()
    )


def _prune(root: Path, keep_last: int, saved: str) -> None:
    """Keep the newest ``keep_last`` step checkpoints (named step_<n>) up to the one just saved, which
    is never removed; others like 'final' stay. Step checkpoints newer than a just-saved step_<n>
    belong to a timeline the run left when it resumed from an older checkpoint: they go too."""
    steps = _step_checkpoints(root)
    m = re.fullmatch(r"step_(\d+)", saved)
    if m:
        newest = int(m.group(1))
        for n, path in steps:
            if n > newest:
                log.info("removing %s: the run resumed from an older checkpoint and went on from there", path)
                shutil.rmtree(path, ignore_errors=True)
        steps = [(n, p) for n, p in steps if n <= newest]
    for _, path in steps[:-keep_last] if keep_last > 0 else steps:
        if path.name != saved:
            shutil.rmtree(path, ignore_errors=True)


def _files(path: Path) -> list[str]:
    return sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file())


def _hash_share(path: Path) -> dict[str, str]:
    """Hashes of this rank's share of the files under ``path`` (every world-th, from its rank)."""
    return {name: file_digest(path / name) for name in _files(path)[_rank() :: _world()]}


def _write_manifest(path: Path, client_state: dict[str, Any], digests: dict[str, str]) -> None:
    """manifest.json: where the checkpoint continues, and every file's size and hash (rank 0)."""
    names = _files(path)
    info: dict[str, Any] = {
        "global_step": client_state.get("global_step"),
        "wandb_id": client_state.get("wandb_id"),
        "files": {name: (path / name).stat().st_size for name in names},
        "hash": HASH,
        "digests": {name: digests[name] for name in names},
    }
    info["digest"] = _manifest_digest(info)
    write_text_atomic(path / MANIFEST, json.dumps(info, indent=1))


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) or (None, why it cannot be trusted)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None, f"no {MANIFEST} (the save did not finish)"
    try:
        info = json.loads(manifest.read_bytes())
        files = info["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return None, f"{MANIFEST} is not valid JSON"
    if "digests" not in info:
        log.warning("checkpoint %s has no content hashes (saved by an older dllm_rl): checked on file sizes only", path)
        return info, None
    if info.get("hash") != HASH or info.get("digest") != _manifest_digest(info):
        return None, f"{MANIFEST} is damaged (its own hash does not match its content)"
    if not isinstance(info["digests"], dict) or set(info["digests"]) != set(files):
        return None, f"{MANIFEST} is damaged (files and hashes do not match)"
    return info, None


def _size_problem(path: Path, info: dict[str, Any], name: str) -> str | None:
    f = path / name
    if not f.is_file():
        return f"{name} is missing"
    size = f.stat().st_size
    if size != info["files"][name]:
        return f"{name} has {size} bytes, {info['files'][name]} when saved"
    return None


def _hash_problem(path: Path, info: dict[str, Any], name: str) -> str | None:
    if "digests" in info and file_digest(path / name) != info["digests"][name]:
        return f"{name} is damaged: its content does not match its {HASH} hash in {MANIFEST}"
    return None


def problem(path: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why the checkpoint directory cannot be resumed from (None: complete, every file at its size and
    hash). Every size is checked first (cheap), then the hashes; a manifest without hashes (written by
    an older dllm_rl) is checked on sizes only. ``share`` = (i, n): check only every n-th file from i."""
    if not path.is_dir():
        return "it does not exist"
    info, why = _read_manifest(path)
    if info is None:
        return why
    names = list(info["files"])[share[0] :: share[1]]
    for check in (_size_problem, _hash_problem):
        for name in names:
            if (why := check(path, info, name)) is not None:
                return why
    return None


def verify(path: Path) -> str | None:
    """problem(path), the files shared out over the ranks (collective; every rank gets the answer)."""
    found = [why for why in _gather(problem(path, (_rank(), _world()))) if why is not None]
    return found[0] if found else None


def _named_by_latest(root: Path) -> Path | None:
    """The checkpoint directory root/latest names (None: no pointer, or one that names no directory)."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    return root / name if name and "/" not in name and not name.startswith(".") else None


def candidates(root: Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one ``latest`` names, then step_<n> newest first.

    ``final`` (a finished run) and last_good (a run stopped on non-finite steps) are only used
    when ``latest`` names them.
    """
    if not root.is_dir():
        return []
    ordered = [p for _, p in reversed(_step_checkpoints(root))]
    named = _named_by_latest(root)
    if named is not None:
        ordered = [named, *[p for p in ordered if p != named]]
    return ordered


def resumable(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under root that verifies, and a warning for each newer one that does not
    (collective: rank 0 lists the candidates, every rank hashes a share of each one's files)."""
    warnings = []
    for path in _gather(candidates(root))[0]:
        why = verify(path)
        if why is None:
            return path, warnings
        warnings.append(f"checkpoint {path} cannot be resumed from: {why}")
    return None, warnings


def manifest(path: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint: global_step, wandb_id, files (sizes), hash, digests."""
    return json.loads((path / MANIFEST).read_text())


def load_rank_state(path: Path) -> dict[str, Any] | None:
    """This rank's saved state (weights-only load: tensors and plain Python values)."""
    f = path / rank_state_file(_rank())
    return torch.load(f, weights_only=True) if f.is_file() else None
