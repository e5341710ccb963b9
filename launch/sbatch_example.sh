#!/usr/bin/env bash
# Submit one run by hand, without Hydra's submitit launcher (cluster=slurm does all of this for you):
#   sbatch launch/sbatch_example.sh objective=spg task=sudoku model=llada_8b_instruct model.path=/ckpt
# Several nodes: sbatch --nodes=2 launch/sbatch_example.sh ... (global rank = node rank x tasks per node
# + local rank; the config gets cluster.nodes and cluster.nproc from SLURM below).
# Arguments are dllm_rl overrides. sbatch options given on the command line replace the #SBATCH lines,
# e.g. the CPU test cluster of launch/slurm_local.sh:
#   sbatch --gpus-per-node=0 --cpus-per-task=1 --ntasks-per-node=2 --partition=debug \
#     launch/sbatch_example.sh cluster.device=cpu cluster.backend=gloo
# One task per GPU: srun starts the ranks (never torchrun inside srun); each reads its rank and world
# size from SLURM. Run directory: outputs/<job name>/<job id>; a requeued job keeps its id, so it
# finds its checkpoints there and resumes (checkpoint.resume_mode=auto).
#SBATCH --job-name=dllm_rl
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
# USR1 two minutes before the time limit: the run checkpoints after the current step and stops
#SBATCH --signal=USR1@120
# the job may go back in the queue (below, after such a stop; SLURM, after preemption or node failure)
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# module load cuda; source .venv/bin/activate    # whatever this cluster needs
python="${PYTHON:-python}"

run_dir="outputs/$SLURM_JOB_NAME/$SLURM_JOB_ID"
# Compose, validate and resolve once (here, in the batch script): writes $run_dir/config.yaml, trains nothing.
"$python" -m dllm_rl cluster=slurm hydra.mode=RUN cluster.launcher=external \
    cluster.nodes="$SLURM_JOB_NUM_NODES" cluster.nproc="$SLURM_NTASKS_PER_NODE" \
    hydra.run.dir="$run_dir" "$@"

status=0
srun "$python" -m dllm_rl.worker "$run_dir/config.yaml" || status=$?
if ((status == 128 + 10)); then  # stopped on SIGUSR1 after its checkpoint: queue it again
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
