"""Step time of the same run on 1 and on N processes, through the real entry point.

    python bench/scale.py                              # tiny Sudoku model, 1 vs 2 CPU processes (gloo)
    python bench/scale.py --nproc 1 2 4 --device cuda --backend nccl -- model=tiny_llada
    python bench/scale.py --json out.json -- deepspeed=zero3

Every configuration trains the same global batch (rollout.prompts_per_step x samples_per_prompt) for
``--steps`` optimizer steps with ``python -m dllm_rl`` (Hydra, elastic launch for N > 1, DeepSpeed) and
reads the run's metrics.jsonl: the median time of a whole rollout round (rollout + inner steps), of
its rollout, and of one optimizer step without the rollout. Evaluation is limited to a few examples
and not timed. Extra Hydra overrides after ``--`` apply to every configuration. Nothing is asserted:
the table is what this machine measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASE = [
    "task=sudoku",
    "objective=spg",
    "train.steps=16",
    # per-process batches that every compared process count divides (128 completions per round)
    "rollout.micro_batch=32",
    "train.micro_batch_per_gpu=32",
    "eval.every_n_steps=0",
    "eval.before_train=false",
    "eval.num_examples=8",
    "logging=none",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (cluster.threads)")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--device", default="cpu", help="cluster.device")
    p.add_argument("--backend", default="gloo", help="cluster.backend")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    return p.parse_args(argv)


def measure(nproc: int, args: argparse.Namespace, root: Path) -> dict:
    run_dir = root / f"nproc{nproc}"
    command = [
        sys.executable,
        "-m",
        "dllm_rl",
        *BASE,
        f"train.steps={args.steps}",
        f"cluster.nproc={nproc}",
        f"cluster.threads={args.threads}",
        f"cluster.device={args.device}",
        f"cluster.backend={args.backend}",
        f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"nproc={nproc} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    first = [r for r in train if r["inner_step"] == 0]
    # A round = its rollout (charged to inner step 0) plus every inner step of it.
    rounds: dict[int, float] = {}
    round_index = -1
    for r in train:
        round_index += r["inner_step"] == 0
        rounds[round_index] = rounds.get(round_index, 0.0) + r["step_seconds"]
    update = [r["step_seconds"] - (r.get("rollout_seconds", 0.0) if r["inner_step"] == 0 else 0.0) for r in train]
    # The first round includes warm-up (allocations, kernels); leave it out where there are others.
    round_times = list(rounds.values())[1:] or list(rounds.values())
    return {
        "nproc": nproc,
        "threads_per_process": args.threads,
        "steps": len(train),
        "round_s": statistics.median(round_times),
        "rollout_s": statistics.median(r["rollout_seconds"] for r in first[1:] or first),
        "update_step_s": statistics.median(update[len(update) // 4 :]),
        "final_loss": train[-1]["loss"],
        "command": " ".join(command),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dllm_rl-scale-") as tmp:
        rows = [measure(n, args, Path(tmp)) for n in args.nproc]
    base = rows[0]
    print(
        f"{'processes':>9} | {'threads/proc':>12} | {'round (s)':>9} | {'rollout (s)':>11} | "
        f"{'update step (s)':>15} | {'round speed-up':>14}"
    )
    for r in rows:
        speedup = base["round_s"] / r["round_s"]
        print(
            f"{r['nproc']:>9} | {r['threads_per_process']:>12} | {r['round_s']:>9.3f} | {r['rollout_s']:>11.3f} | "
            f"{r['update_step_s']:>15.3f} | {speedup:>13.2f}x"
        )
    if args.json:
        info = {"machine": platform.platform(), "cpus": os.cpu_count(), "overrides": args.overrides, "rows": rows}
        args.json.write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
