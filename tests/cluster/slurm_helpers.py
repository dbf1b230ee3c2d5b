"""Helpers for the tests that submit sbatch scripts to the local SLURM (imported by path, like workloads.py)."""

from __future__ import annotations

import re
import subprocess
import time

#: Job states after which SLURM does nothing more with a job (REQUEUED and the like are not among them).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


def job_states(job_id: str, env: dict) -> list[tuple[str, str]]:
    """(state, exit code) of the job, one per array task (tasks not started yet: one PENDING row), as the
    controller knows them now (``sacct`` lags seconds behind and lists an array's tasks late)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [(re.search(r"\bJobState=(\S+)", line).group(1), re.search(r"\bExitCode=(\S+)", line).group(1))
            for line in out.splitlines() if line.strip()]


def sbatch_wait(args: list[str], env: dict, timeout: float = 800, poll_s: float = 0.5) -> subprocess.CompletedProcess:
    """``sbatch --parsable *args`` and wait until the job (every task of an array) has ended, as ``sbatch --wait``
    does, but asking the controller every `poll_s`: sbatch's own wait backs off to 32 s between polls (a 20 s job
    returned after 42 s, measured), which the tests spent waiting. The return code is 0 when every task
    completed with exit code 0, else 1 (``--wait`` returns the highest exit code); stdout holds the job id."""
    submit = subprocess.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True, timeout=60)
    if submit.returncode != 0:
        return submit
    job_id = submit.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = job_states(job_id, env)
        if states and all(state in FINAL_STATES for state, _ in states):
            ok = all(state == "COMPLETED" and code == "0:0" for state, code in states)
            return subprocess.CompletedProcess(submit.args, 0 if ok else 1, job_id, repr(states))
        time.sleep(poll_s)
    # What kept it: its state and reason (a pending job's), and what else held the node.
    job = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=60)
    queue = subprocess.run(["squeue", "-o", "%i %j %T %r %M %N"], env=env, capture_output=True, text=True, timeout=60)
    subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=60)  # not left running for later tests
    raise TimeoutError(f"SLURM job {job_id} did not end within {timeout} s (cancelled)\n{job.stdout}{job.stderr}"
                       f"queue:\n{queue.stdout}{queue.stderr}")
