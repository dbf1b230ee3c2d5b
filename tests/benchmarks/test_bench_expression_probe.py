"""The expression probe's measure: what 'response gain' means (no model here)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_expression_probe import measure, on_white  # noqa: E402


def _scene():
    g = torch.Generator().manual_seed(0)
    gt_zeroed = torch.rand(2, 3, 8, 8, generator=g) * 0.5
    gt_change = torch.zeros_like(gt_zeroed)
    gt_change[:, :, 2:4, 2:4] = 0.3  # the expression-only effect: 4 pixels per frame
    expr_pixels = gt_change.abs().amax(1, keepdim=True) > 0.05
    face = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    return gt_zeroed + gt_change, gt_zeroed, gt_change, expr_pixels, face


def test_response_gain_is_one_for_the_full_effect_zero_for_none_half_for_half():
    gt_real, gt_zeroed, gt_change, expr_pixels, face = _scene()
    full = measure("full", gt_real, gt_zeroed, gt_real, face, expr_pixels, gt_change)
    none = measure("none", gt_zeroed, gt_zeroed, gt_real, face, expr_pixels, gt_change)
    half = measure("half", gt_zeroed + gt_change / 2, gt_zeroed, gt_real, face, expr_pixels, gt_change)
    assert full["response gain"] == pytest.approx(1.0) and full["mean |change| elsewhere in the face"] == 0
    assert none["response gain"] == 0 and none["expression-pixel PSNR"] < full["expression-pixel PSNR"]
    assert half["response gain"] == pytest.approx(0.5)
    # a change in the wrong place earns nothing
    moved = gt_zeroed + gt_change.roll(4, dims=3)
    assert measure("moved", moved, gt_zeroed, gt_real, face, expr_pixels, gt_change)["response gain"] == 0


def test_ground_truth_is_composited_on_white_like_the_reference_frames():
    rgb = np.full((4, 4, 3), 100, np.uint8)
    alpha = np.zeros((4, 4), np.uint8)
    alpha[:2] = 255
    out = on_white(rgb, alpha, 4)
    assert torch.allclose(out[:, :2], torch.full((3, 2, 4), 100 / 255)) and torch.all(out[:, 2:] == 1)


def test_effects_split_the_expression_only_dims_and_edits_leave_the_batch_alone():
    from bench_expression_probe import EFFECTS, EXPRESSION_ONLY, FIGURE_EDITS, response_gain, with_code

    dims = [d for effect in EFFECTS.values() for d in effect]
    assert sorted(dims) == sorted(EXPRESSION_ONLY)  # each expression-only dim in exactly one effect
    assert all(set(edit) <= set(EXPRESSION_ONLY) for edit in FIGURE_EDITS.values())
    batch = {"expression": torch.ones(2, 8), "mask": torch.ones(2, 1, 4, 4)}
    edited = with_code(batch, EFFECTS["gaze"])
    assert torch.all(batch["expression"] == 1) and edited["mask"] is batch["mask"]
    assert torch.all(edited["expression"][:, list(EFFECTS["gaze"])] == 0)
    assert edited["expression"].sum() == 2 * (8 - len(EFFECTS["gaze"]))
    _, _, gt_change, expr_pixels, _ = _scene()
    assert response_gain(-gt_change, gt_change, expr_pixels) == pytest.approx(-1.0)


def test_base_vae_probe_scores_each_effect_alone():
    """bench_base_vae's probe reports the mouth interior and the gaze apart: a VAE that keeps the gaze but
    draws every mouth alike must not hide behind the overall gain (the gaze has most of the pixels)."""
    from types import SimpleNamespace

    from bench_base_vae import ExpressionProbe

    gt_real, gt_zeroed, gt_change, expr_pixels, face_mask = _scene()
    mouth = torch.zeros_like(expr_pixels)
    mouth[:, :, 2, 2] = True  # one of the four effect pixels is the mouth's, the rest the gaze's
    gaze = expr_pixels & ~mouth

    class Held:
        real, zeroed, change, pixels, face = gt_real, gt_zeroed, gt_change, expr_pixels, face_mask

        def effect(self, name):
            own = mouth if name == "mouth interior" else gaze
            return gt_real - gt_change * own, gt_change * own, own

    class GazeOnlyVAE:  # a round trip that keeps everything except the mouth pixel's change
        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

        def decode(self, z):
            base = (gt_zeroed * 2 - 1)
            return SimpleNamespace(sample=torch.where(mouth.expand_as(z), base, z))

    probe = ExpressionProbe.__new__(ExpressionProbe)
    probe.held = Held()
    row = probe.score(GazeOnlyVAE())
    assert row["gain: gaze"] == pytest.approx(1.0) and row["gain: mouth interior"] == pytest.approx(0.0, abs=1e-6)
    assert 0.5 < row["expr response gain"] < 1.0  # the overall gain alone looks fine
