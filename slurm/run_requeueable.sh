#!/bin/bash
# run_requeueable.sh CMD ARGS...: run CMD; when the batch shell receives USR2 (sbatch
# --signal=B:USR2@N before the time limit, or a preemption notice), requeue this SLURM job
# and stop CMD with SIGTERM. The requeued run starts CMD again, which resumes from its own
# last checkpoint. Exit code: CMD's, or 0 after a requeue (SLURM restarts the job). A requeue that
# SLURM refuses (requeue disabled, a QOS rule, no controller) still stops CMD, and the job fails with
# CMD's code: it must not end COMPLETED with its training cut short. A scontrol ended by a signal
# counts as a requeue: the requeue ends every process of the job, scontrol too if it has not exited yet.
# SIGTERM is passed on to CMD, and the shell waits for it (until SLURM's KillWait runs out).
set -uo pipefail
requeued=0
on_usr2() {
  job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
  scontrol requeue "${job:-$SLURM_JOB_ID}"; src=$?
  if [ "$src" = 0 ] || [ "$src" -gt 128 ]; then
    # >128: scontrol was ended by a signal; it is one of the job's processes, which the requeue ends
    echo "[run_requeueable] USR2: requeued job ${job:-${SLURM_JOB_ID:-?}} (restart ${SLURM_RESTART_COUNT:-0} -> next)"
    requeued=1
  else
    echo "[run_requeueable] USR2: scontrol requeue of job ${job:-${SLURM_JOB_ID:-?}} failed; stopping, the job fails" >&2
  fi
  kill -TERM "$child" 2>/dev/null
}
trap on_usr2 USR2
# SIGTERM to the job (scancel, the time limit, the requeue above) reaches every process: wait for CMD to
# record how it stopped. A batch shell that dies at once makes SLURM SIGKILL what is left of the job.
trap 'kill -TERM "$child" 2>/dev/null' TERM
"$@" &
child=$!
while true; do
  wait "$child"; rc=$?
  # wait returns >128 when a trapped signal interrupted it; the child may still run
  if kill -0 "$child" 2>/dev/null; then continue; fi
  break
done
[ "$requeued" = 1 ] && exit 0
[ "$rc" = 0 ] && [ -n "${job+x}" ] && rc=143  # stopped for a requeue that failed, though CMD exited 0
exit "$rc"
