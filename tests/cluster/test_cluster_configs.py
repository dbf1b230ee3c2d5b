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
                                  "run_requeueable.sh", "local/start-slurm.sh", "local/stop-slurm.sh"])
def test_slurm_scripts_parse(name):
    subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], check=True)
