#!/bin/bash
# distopt training job on Slurm, one torchrun per node with c10d rendezvous.
#
#   sbatch launch/slurm/torchrun.sh --config configs/runs/llama_1b.yaml [--key value ...]
#
# Run from the repository root (or set DISTOPT_ROOT). The job resumes from the latest checkpoint
# in out_dir when there is one, so a requeued job continues where it stopped. 120 s before the
# time limit Slurm signals this script, which passes SIGTERM on to the ranks (they write a
# checkpoint after the current step) and requeues the job.
#
# torchrun is distopt's (distopt/job/torchrun.py): after the SIGTERM it gives the ranks
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default here 100, inside the 120 s warning) to finish
# their checkpoint before it kills them.
#
# Environment: NPROC_PER_NODE (default: the node's GPUs), MASTER_PORT (default 29500),
# PYTHON (default python), DISTOPT_REQUEUE=0 to not requeue.
#SBATCH --job-name=distopt-torchrun
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail
cd "${DISTOPT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"

NNODES=${SLURM_NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
HEAD_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
echo "distopt: job ${SLURM_JOB_ID:-?}: ${NNODES} node(s) x ${NPROC_PER_NODE} rank(s), rendezvous ${HEAD_NODE}:${MASTER_PORT}"

srun --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$PYTHON" -m distopt.job.torchrun \
    --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-id="${SLURM_JOB_ID:-0}" --rdzv-backend=c10d --rdzv-endpoint="${HEAD_NODE}:${MASTER_PORT}" \
    -m distopt.job.train "$@" --resume &
pid=$!

. launch/slurm/wait_and_requeue.sh  # SIGTERM: checkpoint, stop, requeue
