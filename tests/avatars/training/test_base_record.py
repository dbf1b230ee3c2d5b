"""The base an avatar was trained on: recorded by content, and another base is a mismatch."""

from __future__ import annotations

import json

import pytest

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
