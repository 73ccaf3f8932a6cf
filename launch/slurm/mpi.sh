#!/bin/bash
# distopt training job on Slurm, one task per GPU started by srun (PMIx) or mpirun; every rank
# learns its place from mpi4py (pip install 'distopt[mpi]'), and rank 0 shares its address.
#
#   sbatch launch/slurm/mpi.sh --config configs/runs/llama_1b.yaml [--key value ...]
#
# MPI_LAUNCH=srun (default) uses `srun --mpi=$SLURM_MPI` (default pmix); MPI_LAUNCH=mpirun uses
# the MPI's own launcher inside the allocation. Run from the repository root (or set
# DISTOPT_ROOT). The job resumes from the latest checkpoint in out_dir when there is one.
#SBATCH --job-name=distopt-mpi
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail
cd "${DISTOPT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"

export DISTOPT_LAUNCHER=mpi
PYTHON=${PYTHON:-python}
NTASKS=${SLURM_NTASKS:-1}
PER_NODE=${SLURM_NTASKS_PER_NODE:-$NTASKS}
PER_NODE=${PER_NODE%%(*}  # "8(x2)" -> "8"
echo "distopt: job ${SLURM_JOB_ID:-?}: ${NTASKS} rank(s) via ${MPI_LAUNCH:-srun}"

if [ "${MPI_LAUNCH:-srun}" = srun ]; then
    srun --mpi="${SLURM_MPI:-pmix}" --kill-on-bad-exit=1 "$PYTHON" -m distopt.job.train "$@" --resume &
else
    mpirun -np "$NTASKS" --map-by "ppr:${PER_NODE}:node" \
        -x DISTOPT_LAUNCHER -x PATH -x "PYTHONPATH=${PYTHONPATH:-}" \
        "$PYTHON" -m distopt.job.train "$@" --resume &
fi
pid=$!

. launch/slurm/wait_and_requeue.sh  # SIGTERM: checkpoint, stop, requeue
