"""benchmarks/bench_gpu.py runs every code path on CPU (tiny config; the numbers are not timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avatars.models.diffusion_avatars import load_trainable_weights
from avatars.training.rendezvous import environment_without_group

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; on a GPU the benchmark itself is the check")
def test_bench_gpu_smoke_on_cpu(tmp_path):
    env = environment_without_group()
    out = tmp_path / "bench_gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--out", str(out),
                           "--workdir", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training, batch 2 (eager)" in proc.stdout and "rendering 2 DDPM steps, batch 1 (eager)" in proc.stdout
    data = json.loads(out.read_text())
    results = data["results"]
    assert results["device"].startswith("CPU") and results["matmul_bf16_peak_TFLOPs"] is None
    train = results["train_eager"]
    assert train["samples_per_s"] > 0 and train["first_step_s"] > 0 and len(train["windows_samples_per_s"]) >= 2
    assert load_trainable_weights(tmp_path / "work" / "runs-eager" / "000" / "model")  # the avatar was saved
    assert results["train_compiled"].startswith("skipped on CPU")
    flops = results["flops"]
    assert flops["train_GFLOP_per_sample"] > 0 and flops["denoise_GFLOP_per_frame"] > 0
    # a whole render (what its MFU divides): the steps, and the VAE decode the step count leaves out
    assert flops["render_GFLOP_per_frame"] > flops["denoise_GFLOP_per_frame"] * (results["render_steps"] - 1)
    assert [(r["mode"], r["batch"]) for r in results["render"]] == [("eager", 1), ("eager", 2)]
    assert sorted(results["render_skipped"]) == ["compiled", "graphs"]  # CUDA graphs need CUDA
    assert "rendering 2 DDPM steps (graphs)" in proc.stdout and "CUDA graphs need CUDA" in proc.stdout
    assert all(r["frames_per_s"] > 0 and r["host_syncs_per_call"].startswith("not measurable")
               for r in results["render"])
    assert [r["batch"] for r in results["peer_render"]] == [1, 2] and results["peer_train"][0]["samples_per_s"] > 0
    assert results["peer_train"][0]["train_GFLOP_per_sample"] > 0
    rows = {r["work"]: r for r in data["rows"]}
    assert rows["training, batch 2 (eager)"]["stock diffusers"] > 0
    assert all(r.get("goal") is None for r in data["rows"])  # the goals are GPU goals


def _bench_gpu():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_gpu

    return bench_gpu


def _linear_step(extra_casts: bool):
    """A tiny training step; ``extra_casts`` adds a float64 round trip of the input (work the other lacks)."""
    from train_steps import Step

    def build() -> Step:
        layer, x = torch.nn.Linear(16, 16), torch.randn(4, 16)
        optimizer = torch.optim.AdamW(layer.parameters(), foreach=True)
        state = {}

        def forward():
            state["loss"] = layer(x.double().float() if extra_casts else x).square().mean()

        def update():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Step("linear", forward, lambda: state.pop("loss").backward(), update, 4,
                    {"precision": "fp32", "optimizer": "AdamW"})

    return build


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU check of the profile's bookkeeping")
def test_profile_section_writes_the_comparison(tmp_path):
    """The profile section's tables, diff, traces and summary (on two tiny steps: the real ones are
    the paper model on a GPU, `bench_gpu.py --only profile`)."""
    import tarfile

    bench_gpu = _bench_gpu()
    setup = bench_gpu.resolve(bench_gpu.BenchGpuArgs())
    summary = bench_gpu.profile_section(setup, tmp_path / "bench_gpu.json", 2,
                                        {"ours": _linear_step(True), "peer": _linear_step(False),
                                         "ours, a variant": _linear_step(False)})
    ours, peer = summary["ours"], summary["peer"]
    assert ours["aten_ops_per_step"] >= peer["aten_ops_per_step"] + 2  # the two casts
    assert ours["samples_per_s"] > 0 and ours["host_syncs_per_step"].startswith("not measurable")
    assert set(ours["categories_ms"]) == set(bench_gpu.PROFILE_CATEGORIES)
    # ours' two casts are attributed to their category (their time against the peer's is a race of microseconds on
    # a busy CPU: it failed once in a two-worker suite run; the op counts above compare the work)
    assert ours["categories_ms"]["casts and copies (_to_copy, copy_)"] > 0
    assert {"before_ms", "now_ms", "background_fraction"} <= set(summary["plane_lookup"])
    assert list(summary["variants"]) == ["ours, a variant"] and summary["variants"]["ours, a variant"]["step_s"] > 0
    text = (tmp_path / "profile.txt").read_text()
    assert "where ours spends more" in text and "aten::_to_copy" in text and "top ops by input shape" in text
    with tarfile.open(tmp_path / "profile_traces.tar.gz") as tar:
        names = tar.getnames()
        assert names == ["trace_ours_one_step.json", "trace_peer_one_step.json"]
        assert json.load(tar.extractfile(names[0]))["traceEvents"]


def test_an_interrupted_run_keeps_its_partial_figures(tmp_path, monkeypatch):
    bench_gpu = _bench_gpu()

    def cut(*args, **kwargs):
        raise SystemExit(143)  # what `timeout`'s SIGTERM becomes (bench_gpu's handler)

    monkeypatch.setattr(bench_gpu, "profile_section", cut)
    out = tmp_path / "bench_gpu.json"
    with pytest.raises(SystemExit):
        bench_gpu.run(bench_gpu.BenchGpuArgs(only=("profile",), out=out, workdir=tmp_path / "work"))
    partial = json.loads((tmp_path / "bench_gpu.partial.json").read_text())
    assert partial["interrupted"].startswith("in section profile: SystemExit")
    assert partial["device"].startswith("CPU") and "shards_s" not in partial  # profile alone makes no shards


COMPILED_STEP = """
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_gpu, gpu_profile
setup = bench_gpu.resolve(bench_gpu.BenchGpuArgs())
builders = gpu_profile.training_steps(setup, compiled=True)
step = builders["ours"]()  # built, not run: a CPU compile takes minutes
model = step.info["model"]
compiled = [n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
print("RESULT" + json.dumps({"names": list(builders), "compiled": step.info["compiled"], "blocks": len(compiled)}))
"""


def test_the_profile_can_take_the_compiled_step():
    """--profile-compiled: ours is the trainer's --compile step (its blocks compiled), against the peer,
    without the memory-format variant."""
    proc = subprocess.run([sys.executable, "-c", COMPILED_STEP, str(REPO / "benchmarks")],
                          env=environment_without_group(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["names"] == ["ours", "peer"] and out["compiled"] and out["blocks"] > 0
