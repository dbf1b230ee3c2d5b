"""The whole main job submitted to a running Ray cluster with the Ray Jobs API, as users of a
shared cluster do: `ray job submit --address http://<head>:8265 -- python jobs/launch_all.py ...`.
The entrypoint runs on the cluster and joins it through RAY_ADDRESS (no --ray-address)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from pipeline_helpers import LAUNCH_ALL, TINY_DATA, TINY_TRAIN, random_tiny_base

from cluster.status import read_status

pytest.importorskip("ray")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_main_job_submitted_with_ray_jobs(tmp_path, ray_head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    base = random_tiny_base(tmp_path / "base")
    work = tmp_path / "work"
    entrypoint = [sys.executable, str(LAUNCH_ALL), "--persons", "all", "--workdir", str(work),
                  "--synthetic.persons", "2", *TINY_DATA, *TINY_TRAIN, "--train.base-model", str(base),
                  "--job-cpus", "1", "--max-retries", "0", "--no-evaluate", "--min-free-gb", "0"]
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # A fresh head's job agent starts after its dashboard answers ("No available agent to submit
    # job, please try again later", seen on a loaded machine): retry as Ray asks, for a minute.
    agent_deadline = time.time() + 60
    while True:
        submit = subprocess.run([ray_bin, "job", "submit", "--address", ray_head.dashboard_url, "--no-wait",
                                 "--submission-id", "da-main-job", "--", *entrypoint],
                                capture_output=True, text=True, timeout=120)
        if submit.returncode == 0 or "No available agent" not in submit.stdout + submit.stderr:
            break
        assert time.time() < agent_deadline, submit.stdout + submit.stderr
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    client = JobSubmissionClient(ray_head.dashboard_url)
    deadline = time.time() + 800
    while client.get_job_status("da-main-job") not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, client.get_job_logs("da-main-job")[-3000:]
        time.sleep(0.5)
    logs = client.get_job_logs("da-main-job")
    assert client.get_job_status("da-main-job") == JobStatus.SUCCEEDED, logs[-4000:]
    assert "all 2 persons succeeded" in logs
    summary = json.loads((work / "runs" / "summary.json").read_text())
    assert [(r["person"], r["ok"], r["result"]["steps"]) for r in summary["results"]] == \
        [("000", True, 3), ("001", True, 3)]
    assert {s.person: s.state for s in read_status(work / "status")} == {"000": "succeeded", "001": "succeeded"}
    # the persons trained as tasks of the submitted job on the cluster, not in an embedded Ray
    info = client.get_job_info("da-main-job")
    from ray.util.state import list_tasks

    # this head's own API server: without an address the state API looks for "a" cluster on the
    # machine (it timed out on a stale one another test run left behind)
    tasks = list_tasks(address=ray_head.dashboard_url, filters=[("job_id", "=", info.job_id)], limit=1000,
                       raise_on_missing_output=False)
    assert {t.name for t in tasks} >= {"train-000", "train-001"}
