"""benchmarks/bench_gpu.py runs every code path on CPU (tiny config; the numbers are not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avatars.models.diffusion_avatars import load_trainable_weights

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; on a GPU the benchmark itself is the check")
def test_bench_gpu_smoke_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    out = tmp_path / "bench_gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--out", str(out),
                           "--workdir", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training, batch 2 (eager)" in proc.stdout and "rendering 2 DDPM steps, batch 1" in proc.stdout
    data = json.loads(out.read_text())
    results = data["results"]
    assert results["device"].startswith("CPU") and results["matmul_bf16_peak_TFLOPs"] is None
    train = results["train_eager"]
    assert train["samples_per_s"] > 0 and train["first_step_s"] > 0 and len(train["windows_samples_per_s"]) >= 2
    assert load_trainable_weights(tmp_path / "work" / "runs-eager" / "000" / "model")  # the avatar was saved
    assert results["train_compiled"].startswith("skipped on CPU")
    assert results["flops"]["train_GFLOP_per_sample"] > 0 and results["flops"]["denoise_GFLOP_per_frame"] > 0
    assert [r["batch"] for r in results["render"]] == [1, 2]
    assert all(r["frames_per_s"] > 0 and r["host_syncs_per_call"].startswith("not measurable")
               for r in results["render"])
    assert [r["batch"] for r in results["peer_render"]] == [1, 2] and results["peer_train"][0]["samples_per_s"] > 0
    assert results["peer_train"][0]["train_GFLOP_per_sample"] > 0
    rows = {r["work"]: r for r in data["rows"]}
    assert rows["training, batch 2 (eager)"]["stock diffusers"] > 0
    assert all(r.get("goal") is None for r in data["rows"])  # the goals are GPU goals
