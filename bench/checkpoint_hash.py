"""What the checkpoint content hashes cost: seconds per GB of the hash, and the time they add to a save.

    python bench/checkpoint_hash.py                          # tiny model, 512 MB of hash input, CPU
    python bench/checkpoint_hash.py --size-mb 2048 --json out.json model=tiny_llada

Two parts:

    hash      the manifest's hash (checkpoint.HASH, xxh3-128) beside two stdlib alternatives (sha256,
              blake2b) on the same --size-mb random bytes in memory, fed in the chunks checkpoint.py
              reads; then checkpoint.file_digest on a file of those bytes (just written, so read from
              the page cache: the case of the verification inside a save; a cold read adds the disk's
              own seconds per GB, which no hash choice changes). Median of --repeats, in s/GB and GB/s
              (GB = 1e9 bytes).
    save      checkpoint.save of the composed model (random weights; the DeepSpeed engine, its
              optimizer states and the hf/ export, as a run writes them) --repeats times with the
              hashes and --repeats times with the hash replaced by a constant, interleaved; the median
              of each, their difference (the cost of hashing at write plus verifying before the rename),
              and the checkpoint's size and file count.

Trailing KEY=VALUE arguments are Hydra overrides of the composed config (model=..., deepspeed=zero3).
Nothing is asserted: the tables are what this machine measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import xxhash

from dllm_rl import checkpoint

HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256, "blake2b": hashlib.blake2b}
GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=512, help="bytes hashed per measurement, in MB (1e6)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per row; the median is reported")
    p.add_argument("--device", default="cpu", help="cluster.device of the saved model's engine")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the composed config (model=tiny_llada ...)")
    return p.parse_args(argv)


def median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_hashes(size: int, repeats: int, workdir: Path) -> list[dict[str, Any]]:
    data = os.urandom(size)
    view = memoryview(data)
    chunk = checkpoint._CHUNK

    def in_memory(make: Any) -> None:
        h = make()
        for lo in range(0, size, chunk):
            h.update(view[lo : lo + chunk])
        h.hexdigest()

    rows = []
    for name, make in HASHES.items():
        seconds = median_seconds(lambda make=make: in_memory(make), repeats)
        rows.append({"hash": name, "where": "memory", "bytes": size, "seconds": seconds})
    path = workdir / "hash-input.bin"
    path.write_bytes(data)
    seconds = median_seconds(lambda: checkpoint.file_digest(path), repeats)
    rows.append({"hash": checkpoint.HASH, "where": "file (page cache)", "bytes": size, "seconds": seconds})
    path.unlink()
    for row in rows:
        row["s_per_gb"] = row["seconds"] / (row["bytes"] / GB)
        row["gb_per_s"] = row["bytes"] / GB / row["seconds"]
        row["chosen"] = row["hash"] == checkpoint.HASH
    return rows


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """The resolved plain dict a worker receives (random weights: no warm-start)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import dllm_rl  # noqa: F401  (registers the config schemas)
    from dllm_rl.config import validate

    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        cfg = compose("config", overrides=["warmstart.enabled=false", "logging=none", *overrides])
    OmegaConf.to_object(cfg)
    validate(cfg)
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def measure_save(cfg: dict[str, Any], repeats: int, workdir: Path) -> dict[str, Any]:
    """checkpoint.save with and without content hashes, interleaved (one engine, keep_last 1)."""
    import torch

    from dllm_rl.build import build_policy, build_training, quiet_libraries
    from dllm_rl.config import run_config
    from dllm_rl.distributed import init_distributed, run_device
    from dllm_rl.tasks import get_task

    quiet_libraries()
    run = run_config(cfg)  # the typed view the components read, as worker.run makes it of the same dict
    init_distributed(run.cluster.backend)
    task = get_task(run.task.name, run.task, Path(run.cache_dir).expanduser())
    policy, _ = build_policy(run, task)
    _, _, engine = build_training(run, policy, run_device(run.cluster.device))
    root = workdir / "checkpoints"
    rank_state = {"rng": torch.get_rng_state()}
    real_digest = checkpoint.file_digest
    timings: dict[str, list[float]] = {"hashed": [], "unhashed": []}
    for i in range(2 * repeats + 1):  # the first save warms up (directories, lazy imports)
        mode = "hashed" if i % 2 else "unhashed"
        checkpoint.file_digest = real_digest if mode == "hashed" else (lambda path: "0")
        try:
            start = time.perf_counter()
            checkpoint.save(engine, policy, root, f"step_{i}", {"global_step": i}, 1, rank_state=rank_state)
            seconds = time.perf_counter() - start
        finally:
            checkpoint.file_digest = real_digest
        if i:
            timings[mode].append(seconds)
    saved = root / f"step_{2 * repeats}"
    files = [f for f in saved.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    hashed, unhashed = statistics.median(timings["hashed"]), statistics.median(timings["unhashed"])
    return {
        "model": cfg["model"]["name"],
        "deepspeed_stage": cfg["deepspeed"].get("zero_optimization", {}).get("stage"),
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "checkpoint_bytes": size,
        "files": len(files),
        "save_seconds_hashed": hashed,
        "save_seconds_unhashed": unhashed,
        "hash_overhead_seconds": hashed - unhashed,
        "hash_overhead_fraction": (hashed - unhashed) / unhashed,
        "seconds": timings,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = compose_config([f"cluster.device={args.device}", *args.overrides])
    with tempfile.TemporaryDirectory(prefix="dllm_rl-hash-") as tmp:
        hashes = measure_hashes(args.size_mb * 10**6, args.repeats, Path(tmp))
        save = measure_save(cfg, args.repeats, Path(tmp))
    print(f"hash cost, {args.size_mb} MB, median of {args.repeats} ({platform.processor() or platform.machine()})")
    print(f"{'hash':>10} | {'where':>17} | {'s/GB':>7} | {'GB/s':>6}")
    for r in hashes:
        mark = " *" if r["chosen"] else "  "
        print(f"{r['hash'] + mark:>10} | {r['where']:>17} | {r['s_per_gb']:>7.3f} | {r['gb_per_s']:>6.2f}")
    print("(* checkpoint.HASH, the one the manifest records)\n")
    print(
        f"checkpoint.save of model={save['model']} (ZeRO {save['deepspeed_stage']}, {save['parameters']:,} "
        f"parameters): {save['checkpoint_bytes'] / 1e6:.1f} MB in {save['files']} files, median of {args.repeats}"
    )
    print(f"{'with hashes (s)':>15} | {'without (s)':>11} | {'hashing adds (s)':>16} | {'adds':>6}")
    print(
        f"{save['save_seconds_hashed']:>15.4f} | {save['save_seconds_unhashed']:>11.4f} | "
        f"{save['hash_overhead_seconds']:>16.4f} | {100 * save['hash_overhead_fraction']:>5.1f}%"
    )
    if args.json:
        info = {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "xxhash": xxhash.VERSION,
            "hash": checkpoint.HASH,
            "hashes": hashes,
            "save": save,
            "config": cfg,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
