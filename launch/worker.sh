#!/usr/bin/env bash
# Run a config that `python -m dllm_rl` already composed and resolved (<run_dir>/config.yaml),
# without Hydra: for process managers and schedulers that start the training process themselves.
#   launch/worker.sh outputs/elbo-sudoku-s0/<time>/config.yaml
# The run writes into the run_dir named in that file.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
exec "${PYTHON:-$repo/.venv/bin/python}" -m dllm_rl.worker "$@"
