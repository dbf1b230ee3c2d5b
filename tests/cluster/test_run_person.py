"""cluster/run_person.py, the sbatch templates' CLI over run_attempt: exit codes and bad arguments."""

from __future__ import annotations

import json

import pytest

from cluster import run_person
from cluster.status import read_status


def echo(person: str, value: int = 0) -> dict:
    return {"person": person, "value": value}


@pytest.mark.parametrize("flags, error", [
    (["--person", "../017"], "--person '../017' is not a person id"),
    (["--person", "017", "--target", "no_colon"], "--target: target 'no_colon' must look like"),
    (["--person", "017", "--attempt", "-3"], "--attempt must be 1 or more, got -3"),
    (["--person", "017", "--attempt", "0"], "--attempt must be 1 or more, got 0"),
    (["--person", "017", "--kwargs-json", '{"status": 1}'], "--kwargs-json: 017: kwargs must not contain 'status'"),
])
def test_a_bad_argument_is_a_usage_error_naming_it(tmp_path, capsys, flags, error):
    """Exit code 2 and one usage line naming the option (a bad --person or --target was a traceback and
    --attempt -3 was recorded in the status file); no status file is written."""
    with pytest.raises(SystemExit) as exit_info:
        run_person.main([*flags, "--status-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and error in err and "Traceback" not in err
    assert read_status(tmp_path) == []


def test_a_good_call_runs_the_target_and_prints_its_result(tmp_path, capsys):
    code = run_person.main(["--person", "017", "--target", f"{__name__}:echo", "--kwargs-json", '{"value": 3}',
                            "--status-dir", str(tmp_path), "--attempt", "2"])
    assert code == 0 and json.loads(capsys.readouterr().out) == {"person": "017", "value": 3}
    (status,) = read_status(tmp_path)
    assert (status.state, status.attempt) == ("succeeded", 2)


@pytest.mark.parametrize("slurm", ["none", "requeued", "cancelled", "unreachable"])
def test_sigterm_leaves_the_status_file_queued_or_failed(tmp_path, workload_env, slurm):
    """SIGTERM (scancel, the time limit, a preemption, run_requeueable.sh after its requeue) ended the process
    where it stood and its status file said `running` for good. Now the attempt stops with exit code 143 and the
    file says `queued` when SLURM requeued the job (scontrol's Restarts past SLURM_RESTART_COUNT), else `failed`.
    A second SIGTERM while SLURM is asked (SLURM and the wrapper both send one) must not end it before the file
    is written. A stand-in `scontrol` plays SLURM here; the real one is in the template test of
    test_cluster_slurm.py."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from workloads import write_input

    write_input(tmp_path / "data", "sig")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if slurm != "none":
        fake = tmp_path / "bin"
        fake.mkdir()
        restarts = {"requeued": "Restarts=3", "cancelled": "Restarts=2", "unreachable": ""}[slurm]
        body = "sleep 1; " + ("exit 1" if slurm == "unreachable" else
                              f'echo "JobId=$4 JobState=COMPLETING {restarts} Requeue=1"')
        (fake / "scontrol").write_text(f"#!/bin/bash\n{body}\n")
        (fake / "scontrol").chmod(0o755)
        env.update(PATH=f"{fake}:{env['PATH']}", SLURM_JOB_ID="77", SLURM_RESTART_COUNT="2")
    kwargs = {"data_dir": str(tmp_path / "data"), "work_dir": str(tmp_path / "work"), "steps": 200,
              "step_seconds": 0.2}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.run_person", "--person", "sig", "--target",
                             "workloads:count_steps", "--kwargs-json", json.dumps(kwargs), "--status-dir",
                             str(tmp_path / "status")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not [s for s in read_status(tmp_path / "status") if (s.step or 0) >= 2] and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # SLURM's SIGTERM and run_requeueable.sh's: the second one comes while SLURM is asked
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    (status,) = read_status(tmp_path / "status")
    assert proc.returncode == 143 and "Traceback" not in err, (proc.returncode, err)
    if slurm == "requeued":
        assert (status.state, status.restarts, status.message) == ("queued", 3, "requeued by SLURM (restart 3)")
        assert "SLURM requeued the job" in err
    else:
        assert status.state == "failed" and status.message.startswith("stopped by SIGTERM"), status
        assert ("scontrol could not say" in status.message) == (slurm == "unreachable")
        assert status.restarts == (0 if slurm == "none" else 2)
    assert status.step >= 2
