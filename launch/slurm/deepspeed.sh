#!/bin/bash
# distopt training job on Slurm through the DeepSpeed launcher (--launcher slurm: it calls srun).
#
#   sbatch launch/slurm/deepspeed.sh --config configs/runs/llama_1b.yaml [--key value ...]
#
# ENGINE (default zero2) and DS_CONFIG (default configs/ds/<ENGINE>_galore.json) pick the ZeRO stage;
# ENGINE=ddp runs plain DDP under the same launcher. The DeepSpeed JSON's values win over the run
# config's, and --key value arguments win over both (the job prints what it took from where).
# ZeRO checkpoints resume on the same number of ranks. Run from the repository root (or set
# DISTOPT_ROOT). The job resumes from the latest checkpoint in out_dir when there is one.
#
# Environment: GPUS_PER_NODE (default: the node's GPUs), MASTER_PORT (default 29500), PYTHON.
#SBATCH --job-name=distopt-deepspeed
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

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
HEAD_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
export MASTER_ADDR=${MASTER_ADDR:-$HEAD_NODE}
export MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
ENGINE=${ENGINE:-zero2}

HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/distopt-hosts.XXXXXX")
trap 'rm -f "$HOSTFILE"' EXIT
scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | awk -v slots="$GPUS_PER_NODE" '{print $1 " slots=" slots}' > "$HOSTFILE"

ENGINE_ARGS=(--engine.name "$ENGINE")
case "$ENGINE" in
    zero*) ENGINE_ARGS+=(--engine.deepspeed_config "${DS_CONFIG:-configs/ds/${ENGINE}_galore.json}") ;;
esac
echo "distopt: job ${SLURM_JOB_ID:-?}: deepspeed --launcher slurm, $(wc -l < "$HOSTFILE") node(s) x ${GPUS_PER_NODE}, engine ${ENGINE}"

# --force_multi takes the Slurm path even on one node, and --no_ssh_check skips the ssh probe (srun
# reaches the nodes). The launcher runs `srun -n <nodes x slots> python -u launch/train.py ...`,
# and each rank finds its place from SLURM_PROCID.
"$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --launcher slurm --force_multi --no_ssh_check \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    launch/train.py "${ENGINE_ARGS[@]}" "$@" --resume &
pid=$!

. launch/slurm/wait_and_requeue.sh  # SIGTERM: checkpoint, stop, requeue
