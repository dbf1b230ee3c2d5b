"""Exact resume: a run SIGKILLed between checkpoints and resumed equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from avatars.models.diffusion_avatars import load_trainable_weights

REPO = Path(__file__).resolve().parents[3]
STEPS, EVERY = 14, 6


def _cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "train_person.py"), "--person", "000", "--shards", str(shards),
            "--out", str(out), "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--validate-every", "0",
            "--log-every", "1", "--num-workers", "2", "--val-samples", "1", "--val-inference-steps", "1",
            "--batch-size", "4", "--lpips-weights", str(out / "no-lpips"), *extra]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # same thread count in every run: bitwise-reproducible CPU math
    return env


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "000" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(train_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(_cmd(train_shards, out))
    return out


def test_sigkill_between_checkpoints_then_resume_matches(train_shards, uninterrupted, tmp_path):
    kill_at = random.Random().randint(EVERY + 1, 2 * EVERY - 1)  # strictly between two checkpoints
    proc = subprocess.Popen(_cmd(train_shards, tmp_path), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    jsonl = tmp_path / "000" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if jsonl.is_file() and any(json.loads(line)["step"] >= kill_at for line in jsonl.read_text().splitlines() if line):
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted(p.name for p in (tmp_path / "000" / "checkpoints").glob("step_*"))
    assert ckpts[-1] == f"step_{EVERY:07d}", f"killed at {kill_at} but checkpoints are {ckpts}"
    assert not (tmp_path / "000" / "model").exists()

    _run(_cmd(train_shards, tmp_path, "--resume", "auto"))
    result = json.loads((tmp_path / "000" / "result.json").read_text())
    assert result["resumed_from"] == EVERY and result["steps"] == STEPS
    a, b = _losses(uninterrupted), _losses(tmp_path)
    assert sorted(b) == list(range(1, STEPS + 1))  # lines of the killed run past the checkpoint were dropped
    assert b == a  # the whole loss curve, bit for bit
    wa = load_trainable_weights(uninterrupted / "000" / "model")
    wb = load_trainable_weights(tmp_path / "000" / "model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], torch.zeros_like(wa[k])) for k in wa)


def test_resume_never_starts_over_and_keep_last(train_shards, uninterrupted, tmp_path):
    ckpts = sorted(p.name for p in (uninterrupted / "000" / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{2 * EVERY:07d}", f"step_{STEPS:07d}"]  # keep_last=2 deleted step 6
    import shutil

    shutil.copytree(uninterrupted / "000", tmp_path / "000")
    _run(_cmd(train_shards, tmp_path, "--resume", "never", "--steps", "3", "--checkpoint-every", "3"))
    assert json.loads((tmp_path / "000" / "result.json").read_text())["resumed_from"] == 0
    assert sorted(_losses(tmp_path)) == [1, 2, 3]


def test_resuming_on_another_base_is_refused(train_shards, uninterrupted, tmp_path):
    """Checkpoints trained on one base never continue on another (here: a random base, then a
    pretrained one): a clear error before any step, and --resume never is the way out."""
    import shutil

    shutil.copytree(uninterrupted / "000", tmp_path / "000")
    assert json.loads((tmp_path / "000" / "base.json").read_text()) == {"path": None, "fingerprint": None}
    other = tmp_path / "other-base" / "unet"
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")
    proc = subprocess.run(_cmd(train_shards, tmp_path, "--base-model", str(other.parent)), env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "BaseMismatch" in proc.stderr and "was trained on the base None" in proc.stderr
    assert "--resume never" in proc.stderr
