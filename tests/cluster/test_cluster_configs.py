"""Static checks of the cluster configs and SLURM templates in the repository."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_ray_cluster_yaml_is_a_valid_ray_up_config():
    pytest.importorskip("ray")
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "auth", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in raw, key
    assert raw["provider"]["type"] == "local"
    assert any("-c constraints.txt" in c for c in raw["setup_commands"])
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert not any("0.0.0.0" in c for c in starts)  # the dashboard stays on the head's loopback (ray dashboard)
    cfg = prepare_config(copy.deepcopy(raw))  # what `ray up` does before validating
    validate_config(cfg)
    node_type = cfg["available_node_types"][cfg["head_node_type"]]
    assert node_type["max_workers"] == len(raw["provider"]["worker_ips"])


@pytest.mark.parametrize("name", ["train_person.sbatch", "train_array.sbatch", "ray_on_slurm.sbatch",
                                  "run_requeueable.sh", "local/start-slurm.sh", "local/stop-slurm.sh",
                                  "nightly_render.sbatch", "nightly_report.sbatch"])
def test_slurm_scripts_parse(name):
    subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], check=True)


def _fake_bin(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(f"#!/bin/bash\n{body}\n")
    (folder / name).chmod(0o755)
    return folder


@pytest.mark.parametrize("requeue_works", [True, "killed", False])
def test_a_requeue_that_slurm_refuses_fails_the_job(tmp_path, requeue_works):
    """run_requeueable.sh on USR2 (the time limit is near): a requeue that SLURM accepts ends the batch shell with
    0 (SLURM restarts the job), also when the requeue's SIGTERM to the job's processes ended scontrol before it
    exited ("killed"); one that it refuses (requeue disabled, a QOS rule) still stops the command, and the job
    fails, instead of ending COMPLETED with its training cut short."""
    import os
    import signal
    import time

    refused = 'echo "scontrol: error: Requested operation is presently disabled for job $2" >&2; exit 1'
    body = {True: "exit 0", "killed": "kill -TERM $$", False: refused}[requeue_works]
    fake = _fake_bin(tmp_path / "bin", "scontrol", body)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / "run_requeueable.sh"), "sleep", "60"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the trap is set and the command runs
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=30)
    if requeue_works:
        assert proc.returncode == 0 and "requeued job 4242" in out, (out, err)
    else:
        assert proc.returncode != 0 and "scontrol requeue of job 4242 failed" in err, (proc.returncode, out, err)


def test_the_requeue_wrapper_passes_sigterm_on_and_waits_for_the_command(tmp_path):
    """SIGTERM to the job (scancel, the time limit, a requeue) reaches the batch shell too: run_requeueable.sh
    hands it to the command and waits for it to record how it stopped (cluster.run_person writes its status
    file then). A shell that died at once let SLURM kill the rest of the job."""
    import os
    import signal
    import time

    cmd = tmp_path / "cmd.sh"
    cmd.write_text(f'''#!/bin/bash
trap 'sleep 1; echo stopped > "{tmp_path}/recorded"; exit 143' TERM
sleep 60 & wait
''')
    cmd.chmod(0o755)
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / "run_requeueable.sh"), str(cmd)],
                            env={**os.environ, "SLURM_JOB_ID": "4242"})
    time.sleep(1.0)  # the traps are set and the command runs
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert (tmp_path / "recorded").read_text() == "stopped\n"  # written before the batch shell ended


@pytest.mark.parametrize("wrote_results", [True, False])
def test_the_nightly_render_job_fails_on_a_python_error_but_not_on_failed_persons(tmp_path, wrote_results):
    """render_eval exits 1 when some persons failed (the night's results.json lists them: the job succeeds, the
    report follows) and Python exits 1 on any uncaught error too: without a results.json written by this run the
    job fails, so that the report job (afterok) does not publish a night without its numbers."""
    import os

    repo, reports = tmp_path / "repo", tmp_path / "reports"
    write = f'mkdir -p "{reports}/runs/2026-01-02" && echo {{}} > "{reports}/runs/2026-01-02/results.json"; ' \
        if wrote_results else 'echo "RuntimeError: ray.init: node timed out during startup" >&2; '
    _fake_bin(repo / ".venv" / "bin", "python", write + "exit 1")
    env = {**os.environ, "REPO": str(repo), "REPORTS_ROOT": str(reports), "DATE": "2026-01-02", "DATA": str(tmp_path)}
    run = subprocess.run(["bash", str(REPO / "slurm" / "nightly_render.sbatch")], env=env, capture_output=True,
                         text=True, timeout=60)
    if wrote_results:
        assert run.returncode == 0 and "WARNING: some persons failed" in run.stderr, run.stderr
    else:
        assert run.returncode == 1 and "WARNING" not in run.stderr, run.stderr


def test_the_nightly_cron_line_gives_both_jobs_one_date_and_makes_the_log_folder(tmp_path):
    """The crontab example, run with a stand-in sbatch: logs/ exists before sbatch opens the jobs' output files
    in it, and the render and report jobs get the same DATE (a render job queued past midnight would otherwise
    report on the next day's night)."""
    import os
    import re

    line = next(x for x in (REPO / "slurm" / "nightly.cron").read_text().splitlines() if x.startswith("0 1 * * *"))
    command = line.split(None, 5)[5].replace("\\%", "%")  # cron's escaped %
    repo = tmp_path / "repo"
    repo.mkdir()
    calls = tmp_path / "sbatch-calls"
    fake = _fake_bin(tmp_path / "bin", "sbatch", f'test -d logs || exit 9; echo "$@" >> "{calls}"; echo 17')
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "REPO": str(repo), "REPORTS_ROOT": "/r"}
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60)
    render, report = calls.read_text().splitlines()
    dates = [re.search(r"DATE=(\S+?)(,|\s)", c).group(1) for c in (render, report)]
    assert dates[0] == dates[1] and re.fullmatch(r"\d{4}-\d{2}-\d{2}", dates[0])
    assert "nightly_render.sbatch" in render and "--dependency=afterok:17" in report


def test_the_nightly_report_job_reports_the_night_it_is_given(tmp_path):
    """nightly_report.sbatch, run with a .venv python that records its arguments and runs the real CLI: the night
    the cron line gives both jobs (DATE) reaches the report as --run-date, render_eval's name for it (the report
    called it --date), and that night's page is built and published."""
    import os
    import shutil
    import sys

    from cluster.report import RunResults, TaskResult

    repo, reports, publish = tmp_path / "repo", tmp_path / "reports", tmp_path / "www"
    for day, psnr in (("2026-01-01", 25.0), ("2026-01-02", 26.0), ("2026-01-03", 27.0)):
        RunResults(day, {"p1": {"self_reenactment": TaskResult({"psnr": psnr}, frames=4)}}).save(reports)
    calls = tmp_path / "python-calls"
    _fake_bin(repo / ".venv" / "bin", "python", f'echo "$@" >> "{calls}"; cd "{REPO}" && exec "{sys.executable}" "$@"')
    env = {**os.environ, "REPO": str(repo), "REPORTS_ROOT": str(reports), "DATE": "2026-01-02",
           "PUBLISH": str(publish) if shutil.which("rsync") else ""}
    run = subprocess.run(["bash", str(REPO / "slurm" / "nightly_report.sbatch")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert calls.read_text().split() == ["-m", "jobs.nightly_report", "--reports-root", str(reports),
                                         "--run-date", "2026-01-02"]
    assert [p.name for p in (reports / "site").iterdir()] == ["2026-01-02"]
    if shutil.which("rsync"):  # PUBLISH (a folder not made yet) gets the night's site and a 'latest' link to it
        assert (publish / "2026-01-02" / "index.html").is_file() and os.readlink(publish / "latest") == "2026-01-02"
