"""End to end: jobs/launch_all.py on a real local Ray head, 2 persons train in parallel, 1 corrupt fails alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_DATA = ["--synthetic.persons", "3", "--synthetic.sequences", "3", "--synthetic.frames", "2",
             "--synthetic.cameras", "3", "--synthetic.image-size", "48", "--synthetic.n-lat", "24",
             "--synthetic.n-lon", "32", "--synthetic.expression-dim", "10", "--synthetic.seed", "3",
             "--ingest.held-out-sequences", "1", "--shards.samples-per-shard", "8", "--workers", "2"]
TINY_TRAIN = ["--train.steps", "3", "--train.batch-size", "4", "--train.checkpoint-every", "3",
              "--train.validate-every", "0", "--train.val-samples", "1", "--train.val-inference-steps", "1",
              "--train.num-workers", "0", "--eval-inference-steps", "2"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Data for 3 persons (person 002's capture then corrupted) and a tiny base with random weights
    (what the orchestration needs; the base pretraining itself is tests/avatars/training/
    test_base_pretraining.py's and, inside launch_all, test_launch_all_reruns.py's)."""
    import tyro
    from pipeline_helpers import random_tiny_base

    from jobs.launch_all import LaunchAllArgs, _data
    from jobs.make_synthetic import MakeSyntheticArgs
    from jobs.make_synthetic import main as make_synthetic

    work = tmp_path_factory.mktemp("launch")
    args = tyro.cli(LaunchAllArgs, args=["--workdir", str(work), *TINY_DATA])
    make_synthetic(MakeSyntheticArgs(out=work / "captures", synthetic=args.synthetic, workers=2))
    bad = sorted((work / "captures" / "002" / "sequences").glob("*/timesteps/frame_00000/images/*.png"))[0]
    bad.write_bytes(b"not a png")
    ready, failed = _data(args)
    assert ready == ["000", "001"] and list(failed) == ["002"] and "unreadable image" in failed["002"]
    return work, random_tiny_base(work / "base")


@pytest.mark.ray
def test_launch_all_on_ray_head(prepared, ray_head):
    work, base = prepared
    cmd = [sys.executable, str(REPO / "jobs" / "launch_all.py"), "--persons", "all", "--workdir", str(work),
           *TINY_DATA, *TINY_TRAIN, "--train.base-model", str(base), "--ray-address", ray_head.address,
           "--job-cpus", "1", "--max-retries", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]  # one person failed
    summary_json = json.loads((work / "runs" / "summary.json").read_text())
    assert summary_json["exit_code"] == 1
    summary = {r["person"]: r for r in summary_json["results"]}
    assert {p: r["ok"] for p, r in summary.items()} == {"000": True, "001": True, "002": False}, out[-4000:]
    assert "unreadable image" in summary["002"]["error"]
    for p in ("000", "001"):
        assert (work / "runs" / p / "model" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
        assert summary[p]["result"]["steps"] == 3
        status = json.loads((work / "status" / f"{p}.json").read_text())
        assert status["state"] == "succeeded" and status["step"] == 3
    assert "002" in out and "FAILED" in out
    # Readable output: stages, one progress display, worker output in per-person files, no Serve
    # shutdown noise, a short summary with the report (tests/jobs/test_console.py has the parts).
    assert "[3/4] training 2 persons on ray" in out and "[4/4] evaluation of 2 persons" in out
    assert "training 2 persons: 2 done" in out
    for p in ("000", "001"):
        assert f"train {p}" in (work / "logs" / f"{p}.log").read_text()  # its progress bar
        assert f"train {p}:" not in out
    assert "listen_for_change" not in out and "repeated" not in out and "Unhandled error" not in out
    assert "summary:" in out and "mean self-reenactment: PSNR" in out and "report: " in out
    # the person that failed at the data stage is in the status files too (jobs/status.py lists it)
    status = json.loads((work / "status" / "002.json").read_text())
    assert status["state"] == "failed" and "unreadable image" in status["message"]
    results = sorted((work / "reports" / "runs").glob("*/results.json"))
    assert results, out[-3000:]
    data = json.loads(results[-1].read_text())
    assert sorted(data["persons"]) == ["000", "001"]
    assert set(data["persons"]["000"]) >= {"self_reenactment", "novel_view", "cross_reenactment"}
    assert list((work / "reports" / "site").glob("*/index.html"))
    stages = json.loads((work / "runs" / "stages.json").read_text())["stages"]
    assert [r["stage"] for r in stages] == ["synthetic data", "ingest", "shards", "base model", "training",
                                            "evaluation", "total"]
    training = stages[4]
    assert training["cpu_s"] > 0 and training["wall_s"] > 0  # the Ray workers' CPU time is counted


@pytest.mark.slurm
def test_launch_all_on_slurm_array(prepared, slurm_cluster, tmp_path):
    """The same pipeline with --backend slurm: the persons train as a real SLURM job array."""
    work, base = prepared
    cmd = [sys.executable, str(REPO / "jobs" / "launch_all.py"), "--persons", "000,001", "--workdir", str(work),
           *TINY_DATA, *TINY_TRAIN, "--train.base-model", str(base)]
    cmd += ["--backend", "slurm", "--slurm.time-min", "10", "--slurm.poll-interval-s", "1", "--slurm.log-dir",
            str(tmp_path / "slurm"), "--slurm.status-dir", str(tmp_path / "status"), "--job-cpus", "1",
            "--max-retries", "0", "--no-evaluate", "--train.steps", "4", "--train.checkpoint-every", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((work / "runs" / "summary.json").read_text())
    assert summary["exit_code"] == 0
    assert {r["person"]: (r["ok"], r["result"]["steps"]) for r in summary["results"]} == \
        {"000": (True, 4), "001": (True, 4)}
    for p in ("000", "001"):
        status = json.loads((tmp_path / "status" / f"{p}.json").read_text())
        assert status["state"] == "succeeded" and status["step"] == 4
    assert list((tmp_path / "slurm").rglob("*_log.out"))  # submitit's logs of the array tasks
