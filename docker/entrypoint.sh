#!/bin/sh
# Entrypoint of the distopt image: arguments that start with "-" (or none) go to the training
# job, on one rank per visible GPU (NPROC_PER_NODE overrides); anything else runs as a command.
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    nproc="${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
    if [ "$nproc" -gt 1 ]; then
        exec torchrun --standalone --nproc-per-node "$nproc" -m distopt.job.train "$@"
    fi
    exec distopt train "$@"
fi
exec "$@"
