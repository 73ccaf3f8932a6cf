# Sourced by the sbatch scripts after they start the launcher in the background as "$pid": on
# Slurm's SIGTERM (sent ahead of the time limit, see --signal) the ranks checkpoint and stop, and
# the job is requeued unless DISTOPT_REQUEUE=0; otherwise the script waits for the launcher.
on_term() {
    echo "distopt: SIGTERM: the ranks checkpoint and stop"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" || true
    if [ "${DISTOPT_REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
}
trap on_term TERM
wait "$pid"
