"""launch_all against a Ray cluster of several nodes on this machine (`ray.cluster_utils.Cluster`:
a head without CPUs and three worker raylets with one CPU and 3 GiB each, sharing the file
system), persons spread over the nodes; one worker node is killed mid-training. Its person is
rescheduled on a surviving node and resumes from its last checkpoint; the others finish."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from pipeline_helpers import LAUNCH_ALL, REPO, TINY_DATA, TINY_TRAIN, free_port, random_tiny_base

from cluster.status import read_status

ray = pytest.importorskip("ray")
PERSONS = ["000", "001", "002"]
#: Enough steps that a status file (written at most once a second) shows a person between its first
#: checkpoint and its end however fast the machine is (an idle one trains ~4 steps/s).
STEPS = 32


def _task_nodes() -> dict[str, str]:
    """Ray task name -> id of the node it ran (or runs) on, for every training task."""
    from ray.util.state import list_tasks

    tasks = list_tasks(filters=[("name", "!=", "")], limit=1000, raise_on_missing_output=False)
    return {t.name: t.node_id for t in tasks if t.name.startswith("train-") and t.node_id}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_launch_all_on_a_multinode_cluster_survives_losing_a_node(tmp_path, ray_env):
    from ray.cluster_utils import Cluster

    node_args = dict(node_ip_address="127.0.0.1", object_store_memory=80 * 2**20)
    # The head has no CPUs (nothing trains there) and the dashboard (the state API reads task placement).
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(), **node_args))
    workers = [cluster.add_node(num_cpus=1, memory=3 * 2**30, include_dashboard=False, **node_args)
               for _ in range(3)]
    proc = None
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        base = random_tiny_base(tmp_path / "base")
        work = tmp_path / "work"
        args = ["--workdir", str(work), "--synthetic.persons", str(len(PERSONS)), *TINY_DATA, *TINY_TRAIN,
                "--train.steps", str(STEPS), "--train.checkpoint-every", "2", "--train.base-model", str(base),
                "--ray-address", cluster.address, "--job-cpus", "1", "--job-memory-gb", "1", "--max-retries", "1",
                "--no-evaluate", "--min-free-gb", "0"]
        log = open(tmp_path / "launch_all.log", "w")
        proc = subprocess.Popen([sys.executable, str(LAUNCH_ALL), *args], stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO)
        # Wait until every person was placed (one per node) and one is past its first checkpoint.
        victim = None
        deadline = time.time() + 600
        while victim is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            st = {s.person: s for s in read_status(work / "status")}
            if not all(st.get(p) for p in PERSONS):
                continue
            # running, past step 2's checkpoint, far from the end
            ready = [p for p in PERSONS if st[p].state == "running" and 3 <= (st[p].step or 0) <= STEPS - 12]
            if ready:
                victim = ready[0]
        assert victim is not None, (tmp_path / "launch_all.log").read_text()[-3000:]
        nodes = _task_nodes()
        assert len({nodes[f"train-{p}"] for p in PERSONS}) == 3  # spread: one person per worker node
        dead = next(w for w in workers if w.node_id == nodes[f"train-{victim}"])
        cluster.remove_node(dead, allow_graceful=False)  # the whole node: raylet, object store, workers
        killed_at_step = {s.person: s for s in read_status(work / "status")}[victim].step

        proc.wait(timeout=600)
        log.close()
        out = (tmp_path / "launch_all.log").read_text()
        assert proc.returncode == 0, out[-4000:]
        summary = {r["person"]: r for r in json.loads((work / "runs" / "summary.json").read_text())["results"]}
        assert all(r["ok"] and r["result"]["steps"] == STEPS for r in summary.values()), summary
        assert summary[victim]["attempts"] == 2
        # from a checkpoint (every 2 steps), at least the last one the status file had seen: the
        # file lags the run by up to a second, so the run may have checkpointed a step beyond it
        resumed_from = summary[victim]["result"]["resumed_from"]
        assert max(2, killed_at_step // 2 * 2 - 2) <= resumed_from < STEPS and resumed_from % 2 == 0
        assert all(summary[p]["attempts"] == 1 for p in PERSONS if p != victim)
        nodes = _task_nodes()
        assert nodes[f"train-{victim}-a2"] != dead.node_id  # rescheduled on a surviving node
        st = {s.person: s for s in read_status(work / "status")}
        assert all(st[p].state == "succeeded" and st[p].step == STEPS for p in PERSONS)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        ray.shutdown()
        cluster.shutdown()
