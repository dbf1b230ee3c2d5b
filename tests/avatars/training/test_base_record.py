"""The base an avatar was trained on: recorded by content, and another base is a mismatch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from train_cli import single_thread_env, train_person_args

from avatars.training.base_record import BaseMismatch, base_fingerprint, mismatch, read_record, write_record


def _base(path, weights: bytes):
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "weights.bin").write_bytes(weights)
    return path


def test_a_copied_base_matches_a_rewritten_one_does_not(tmp_path):
    base = _base(tmp_path / "base", b"abc")
    copy = _base(tmp_path / "elsewhere", b"abc")
    run = tmp_path / "run"
    assert mismatch(run, base_fingerprint(base)) is None  # nothing trained yet: any base fits
    (run / "checkpoints" / "step_0000003").mkdir(parents=True)
    assert "no base.json" in mismatch(run, base_fingerprint(base))  # trained before bases were recorded
    write_record(run, base, base_fingerprint(base))
    assert read_record(run)["path"] == str(base)
    assert mismatch(run, base_fingerprint(copy)) is None  # content, not the path
    (base / "unet" / "weights.bin").write_bytes(b"abd")  # the base folder rewritten in place
    problem = mismatch(run, base_fingerprint(base))
    assert problem and str(base) in problem and "was trained on the base" in problem
    assert "a random base" in mismatch(run, None)
    (run / "base.json").write_text(json.dumps({"path": None}))
    with pytest.raises(BaseMismatch, match="fingerprint"):
        mismatch(run, None)


def test_a_record_without_training_state_binds_nothing(tmp_path):
    """A run that failed before its first checkpoint trained nothing on its base: another base may train."""
    run = tmp_path / "run"
    write_record(run, tmp_path / "a-base", "aaaa")
    assert mismatch(run, "bbbb") is None and mismatch(run, None) is None
    (run / "model").mkdir()
    assert "was trained on the base" in mismatch(run, "bbbb")


def test_a_run_that_fails_in_set_up_records_no_base(train_shards, tmp_path):
    """A base that cannot be built fails the run before it is recorded, so the corrected run is not
    refused as trained on another base."""
    broken = tmp_path / "broken-base" / "unet"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    args = ["--steps", "1", "--num-workers", "0", "--batch-size", "2"]
    proc = subprocess.run([sys.executable, *train_person_args(train_shards, tmp_path, *args, "--base-model",
                                                              str(broken.parent))],
                          env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and not (tmp_path / "000" / "base.json").exists()
    proc = subprocess.run([sys.executable, *train_person_args(train_shards, tmp_path, *args)],
                          env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_record(tmp_path / "000") == {"path": None, "fingerprint": None}
