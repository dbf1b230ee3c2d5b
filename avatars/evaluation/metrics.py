"""PSNR, SSIM, LPIPS, JOD (+ optional AKD/CSIM) per frame and per video, masked and unmasked,
plus face-region metrics inside the rasterized mask.

Images are (T, H, W, 3) arrays, uint8 or float in [0, 1]; masks are (T, H, W) in [0, 1]
(uint8 0..255 and bool are accepted). Anything else (floats in [-1, 1] or [0, 255], NaN, a uint8
mask of 0/1) is refused with a ValueError naming the argument, not scored wrongly.

"Masked" follows the official DiffusionAvatars evaluation script: prediction and ground truth
are both composited onto a white background with the ground-truth foreground mask and quantised
to uint8 before any metric, i.e. ``masked = round(255 * (m * img + (1 - m) * background)) / 255``. The metrics are then
computed over the full image (background pixels agree exactly, so they count as perfect).

PSNR follows the official evaluator (torchmetrics PSNR over batches of 16 frames, i.e. the
squared error pooled over a batch, averaged over the batches of a sequence): the headline
"psnr". The mean of per-frame PSNRs ("psnr_frame") is systematically higher (a frame with a
small error adds more dB than a bad frame removes). "jod" is the paper's FovVideoVDP
(display ``standard_4k``, 24 fps, as the official evaluator); "cvvdp" is ColorVideoVDP.

Face metrics look only at the rasterized face (the mask of the fitted mesh the model is given),
where the person's appearance is: background and silhouette, which the geometry alone explains,
dominate full-frame PSNR. "psnr_face": PSNR of the pixels inside the mask; "lpips_face": the
LPIPS distance map averaged inside the mask; "colour_error": CIE76 ΔE between the mean colours
of render and ground truth inside the mask (a brownish head on a pink person scores ~20).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from avatars.evaluation.face_models import FaceModelConfig, FaceModels
from avatars.evaluation.lpips_weights import LpipsConfig, load_lpips
from avatars.evaluation.metric_names import DEFAULT_METRICS, FACE_METRICS, MASKABLE

#: How far float frames and masks may stray outside [0, 1] (rounding in a resize or a colour conversion);
#: within it they are clamped, beyond it refused: [-1, 1] or [0, 255] data would give wrong numbers silently.
RANGE_TOLERANCE = 1e-3


def _unit_float(t: torch.Tensor, name: str) -> torch.Tensor:
    """Float ``t`` checked to be finite and in [0, 1] (up to RANGE_TOLERANCE, then clamped)."""
    t = t.float()
    if t.numel() == 0:
        return t
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"{name} must be float in [0, 1] (or uint8), got values in [{lo:.4g}, {hi:.4g}]")
    return t.clamp(0, 1)


def to_float_frames(x: np.ndarray | torch.Tensor, name: str = "frames") -> torch.Tensor:
    """(T, H, W, 3) uint8 or float in [0, 1] -> float32 tensor (T, 3, H, W) in [0, 1]; ValueError naming
    ``name`` for another range ([-1, 1], [0, 255] floats) or non-finite values."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected {name} of shape (T, H, W, 3), got {tuple(t.shape)}")
    t = t.float() / 255.0 if t.dtype == torch.uint8 else _unit_float(t, name)
    return t.permute(0, 3, 1, 2).contiguous()


def to_float_mask(mask: np.ndarray | torch.Tensor, frames: int, name: str = "mask") -> torch.Tensor:
    """(T, H, W[, 1]) bool / uint8 (0..255) / float ([0, 1]) mask -> float32 tensor (T, 1, H, W) in [0, 1].
    A uint8 mask whose largest value is 1 is refused: 0/1 and a faint 0..255 mask cannot be told apart."""
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[0] != frames:
        raise ValueError(f"expected {name} of shape (T={frames}, H, W), got {tuple(m.shape)}")
    if m.dtype == torch.uint8:
        if m.numel() and int(m.max()) == 1:
            raise ValueError(f"{name} is uint8 with values 0/1: uint8 masks are 0..255; pass 0/1 as bool or float")
        return (m.float() / 255.0)[:, None]
    return _unit_float(m, name)[:, None]


def composite_on_background(
    frames: torch.Tensor, mask: torch.Tensor, background: Sequence[float] = (1.0, 1.0, 1.0), quantize: bool = True
) -> torch.Tensor:
    """m * img + (1 - m) * background, optionally rounded to uint8 levels like the official script."""
    bg = torch.tensor(background, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    out = mask * frames + (1.0 - mask) * bg
    return torch.round(out * 255.0) / 255.0 if quantize else out


def psnr_from_mse(mse: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of a mean squared error (the one PSNR formula of the project); 0 gives +inf."""
    return 10.0 * torch.log10(data_range**2 / mse)


def psnr(pred: torch.Tensor, gt: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-frame PSNR in dB of (T, 3, H, W) tensors; identical frames give +inf."""
    mse = ((pred.double() - gt.double()) ** 2).flatten(1).mean(1)
    return psnr_from_mse(mse, data_range).float()


def psnr_protocol(pred: torch.Tensor, gt: torch.Tensor, batch: int = 16, data_range: float = 1.0) -> float:
    """The official evaluator's PSNR of one sequence: per batch of ``batch`` consecutive frames the
    squared error pooled over all its pixels, PSNR per batch, mean over the batches. A batch without
    any error (+inf) is left out of the mean like a non-finite frame (see `_summary`); NaN if no batch
    has a finite PSNR."""
    values = []
    for i in range(0, pred.shape[0], batch):
        mse = ((pred[i : i + batch].double() - gt[i : i + batch].double()) ** 2).mean()
        values.append(float(psnr_from_mse(mse, data_range)))
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def masked_psnr(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-frame PSNR over the pixels where ``mask`` (T, 1, H, W) > 0.5; NaN for an empty mask."""
    m = (mask > 0.5).double()
    se = (((pred.double() - gt.double()) ** 2) * m).flatten(1).sum(1)
    n = m.flatten(1).sum(1) * pred.shape[1]
    mse = torch.where(n > 0, se / n.clamp_min(1), torch.full_like(se, float("nan")))
    return psnr_from_mse(mse, data_range).float()


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) sRGB in [0, 1] -> CIELAB (D65)."""
    rgb = rgb.double().clamp(0, 1)
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
    xyz = lin @ m.T / torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
    eps = 216 / 24389
    f = torch.where(xyz > eps, xyz ** (1 / 3), (24389 / 27 * xyz + 16) / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def mean_colour_error(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-frame CIE76 ΔE between the mean colours inside ``mask`` (T, 1, H, W); NaN if empty."""
    m = (mask > 0.5).double()
    n = m.flatten(1).sum(1).clamp_min(1)[:, None]
    mean_p = (pred.double() * m).flatten(2).sum(2) / n
    mean_g = (gt.double() * m).flatten(2).sum(2) / n
    err = (srgb_to_lab(mean_p) - srgb_to_lab(mean_g)).norm(dim=-1)
    return torch.where(m.flatten(1).sum(1) > 0, err, torch.full_like(err, float("nan"))).float()


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def ssim(
    pred: torch.Tensor, gt: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Per-frame SSIM (Wang et al. 2004): Gaussian window 11 / sigma 1.5, K1=0.01, K2=0.03.

    Valid-region filtering (no padding) and the mean over channels, which equals
    skimage's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`.
    """
    if min(pred.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs frames of at least {win_size}x{win_size}, got {tuple(pred.shape[-2:])}")
    x, y = pred.double(), gt.double()
    c = x.shape[1]
    g = _gaussian_window(win_size, sigma, x.dtype)
    wh = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    wv = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, wh, groups=c), wv, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


#: Serialises :func:`_import_vvdp` (see there).
_VVDP_IMPORT_LOCK = threading.Lock()


def _import_vvdp(name: str):
    """Imports ``pycvvdp`` or ``pyfvvdp``. Both put their own folder on ``sys.path`` and import
    top-level modules named ``interp`` and ``third_party`` from it, so whichever loads second
    would get the other's; the second is imported with the first's modules set aside. Under one lock:
    the evaluation's person threads load the metrics concurrently, and two of them juggling
    ``sys.modules`` / ``sys.path`` at once would hand each other the wrong ``interp``."""
    import importlib
    import importlib.util
    import sys

    def shared() -> list[str]:
        # list(sys.modules): a snapshot, since other threads may import meanwhile, and iterating
        # the live dict then fails ("dictionary changed size")
        return [k for k in list(sys.modules) if k == "interp" or k == "third_party" or k.startswith("third_party.")]

    with _VVDP_IMPORT_LOCK:
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{name} is not installed")
        folder = list(spec.submodule_search_locations)[0]
        aside = {k: sys.modules.pop(k) for k in shared()}
        sys.path.insert(0, folder)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(folder)
            if aside:  # leave the first package's modules where its own lazy imports expect them
                for k in shared():
                    sys.modules.pop(k)
            sys.modules.update(aside)


def _cvvdp(display: str, device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        pycvvdp = _import_vvdp("pycvvdp")
    except ImportError as e:
        raise ImportError("'cvvdp' needs ColorVideoVDP: pip install cvvdp==0.5.7 (or drop it from the metrics)") from e
    return pycvvdp.cvvdp(display_name=display, quiet=True, device=torch.device(device))


def _fvvdp(display: str, device: str):
    try:
        pyfvvdp = _import_vvdp("pyfvvdp")
    except ImportError as e:
        raise ImportError("'jod' needs FovVideoVDP: pip install pyfvvdp==1.2.2 (or drop it from the metrics)") from e
    return pyfvvdp.fvvdp(display_name=display, heatmap=None, quiet=True, device=torch.device(device))


def jod(pred_u8: np.ndarray, gt_u8: np.ndarray, fps: float, metric) -> float:
    """Quality in JOD (10 = identical) of a whole uint8 video (T, H, W, 3) under ``metric``, a loaded
    ``pyfvvdp.fvvdp`` (the paper's JOD) or ``pycvvdp.cvvdp``; both share this ``predict`` API.

    JOD is a video-level score (it models temporal masking), so there is no per-frame value.
    A single frame is evaluated as an image.
    """
    pred_t, gt_t = torch.from_numpy(np.ascontiguousarray(pred_u8)), torch.from_numpy(np.ascontiguousarray(gt_u8))
    if pred_u8.shape[0] == 1:
        q, _ = metric.predict(pred_t[0], gt_t[0], dim_order="HWC")
    else:
        q, _ = metric.predict(pred_t, gt_t, dim_order="FHWC", frames_per_second=fps)
    return float(q)


@dataclass
class EvalConfig:
    """What `Evaluator` computes and with which local model files.

    metrics: subset of DEFAULT_METRICS; masked variants are added when a mask is given.
    lpips: LPIPS weights config; required when "lpips" is requested.
    face_models: optional user-provided landmark / face-identity TorchScript files (AKD / CSIM).
    background: RGB in [0, 1] the masked variants composite onto (white, as the paper's script).
    fps: frame rate for JOD (the official evaluator: 24).
    jod_display: FovVideoVDP display model ("standard_4k", the official evaluator's).
    cvvdp_display: ColorVideoVDP display model.
    psnr_batch: frames per pooled-error batch of the protocol PSNR (the official evaluator: 16).
    device: torch device for JOD and the face models (LPIPS runs on ``lpips.device``).
    """

    metrics: tuple[str, ...] = DEFAULT_METRICS
    lpips: LpipsConfig | None = None
    face_models: FaceModelConfig = field(default_factory=FaceModelConfig)
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    fps: float = 24.0
    jod_display: str = "standard_4k"
    cvvdp_display: str = "standard_fhd"
    psnr_batch: int = 16
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - set(DEFAULT_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(DEFAULT_METRICS)}")
        for name in ("lpips", "lpips_face"):
            if name in self.metrics and self.lpips is None:
                raise ValueError(f"'{name}' requested but no LpipsConfig(weights_path=...) given (--lpips-weights)")


def _summary(values: torch.Tensor | list[float] | None, mean: float | None = None) -> dict:
    """{"mean", "per_frame"} of a metric. The mean is over the frames with a finite value: NaN is a frame the
    metric does not apply to (an empty mask), +inf a PSNR without error (identical frames, or composites); either
    would wipe out the mean of the other frames. The per-frame values keep them (results.json: null)."""
    if values is None:
        return {"mean": mean if mean is not None and np.isfinite(mean) else None, "per_frame": None}
    per_frame = [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    defined = [v for v in per_frame if np.isfinite(v)]
    return {"mean": float(np.mean(defined)) if defined else None, "per_frame": per_frame}


def _undefined_where(summary: dict, empty: torch.Tensor) -> dict:
    """``summary`` with its frames flagged in ``empty`` set to NaN (undefined), the mean recomputed."""
    if summary["per_frame"] is None or not bool(empty.any()):
        return summary
    return _summary([float("nan") if e else v for v, e in zip(summary["per_frame"], empty.tolist())])


class Evaluator:
    """Holds the loaded networks so one renderer process evaluates many videos cheaply."""

    def __init__(self, config: EvalConfig):
        self.config = config
        wants_lpips = {"lpips", "lpips_face"} & set(config.metrics)
        self._lpips = load_lpips(config.lpips) if wants_lpips and config.lpips else None
        self._faces = FaceModels(config.face_models, device=config.device)
        self._fvvdp = _fvvdp(config.jod_display, config.device) if "jod" in config.metrics else None
        self._cvvdp = _cvvdp(config.cvvdp_display, config.device) if "cvvdp" in config.metrics else None

    @torch.no_grad()
    def lpips(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Per-frame LPIPS (AlexNet, v0.1) of (T, 3, H, W) tensors in [0, 1]."""
        assert self._lpips is not None and self.config.lpips is not None
        out, bs, dev = [], self.config.lpips.batch_size, self.config.lpips.device  # where the network is
        for i in range(0, pred.shape[0], bs):
            d = self._lpips(pred[i : i + bs].to(dev), gt[i : i + bs].to(dev), normalize=True)
            out.append(d.flatten().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def lpips_in_mask(self, pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-frame LPIPS distance map averaged over ``mask`` (T, 1, H, W) > 0.5 (NaN if empty)."""
        assert self._lpips is not None and self.config.lpips is not None
        out, bs, dev = [], self.config.lpips.batch_size, self.config.lpips.device  # where the network is
        spatial = self._lpips.spatial
        self._lpips.spatial = True  # the distance map at image resolution instead of its mean
        try:
            for i in range(0, pred.shape[0], bs):
                d = self._lpips(pred[i : i + bs].to(dev), gt[i : i + bs].to(dev), normalize=True).cpu()
                m = (mask[i : i + bs] > 0.5).float()
                n = m.flatten(1).sum(1)
                v = (d * m).flatten(1).sum(1) / n.clamp_min(1)
                out.append(torch.where(n > 0, v, torch.full_like(v, float("nan"))))
        finally:
            self._lpips.spatial = spatial
        return torch.cat(out)

    def _image_metrics(self, pred: torch.Tensor, gt: torch.Tensor, suffix: str, result: dict) -> None:
        metrics = self.config.metrics
        if "psnr" in metrics:
            result[f"psnr{suffix}"] = _summary(None, psnr_protocol(pred, gt, self.config.psnr_batch))
        if "psnr_frame" in metrics:
            result[f"psnr_frame{suffix}"] = _summary(psnr(pred, gt))
        if "ssim" in metrics:
            result[f"ssim{suffix}"] = _summary(ssim(pred, gt))
        if "lpips" in metrics:
            result[f"lpips{suffix}"] = _summary(self.lpips(pred, gt))
        to_u8 = lambda t: (t.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # noqa: E731
        for name, metric in (("jod", self._fvvdp), ("cvvdp", self._cvvdp)):
            if name in metrics:
                result[f"{name}{suffix}"] = _summary(None, jod(to_u8(pred), to_u8(gt), self.config.fps, metric))

    def _face_metrics(self, pred: torch.Tensor, gt: torch.Tensor, face: torch.Tensor, result: dict) -> None:
        metrics = self.config.metrics
        if "psnr_face" in metrics:
            result["psnr_face"] = _summary(masked_psnr(pred, gt, face))
        if "lpips_face" in metrics:
            result["lpips_face"] = _summary(self.lpips_in_mask(pred, gt, face))
        if "colour_error" in metrics:
            result["colour_error"] = _summary(mean_colour_error(pred, gt, face))

    def evaluate_video(
        self, gt: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None = None,
        face_mask: np.ndarray | torch.Tensor | None = None,
    ) -> dict:
        """Evaluate one rendered video against its ground truth.

        ``mask``: the ground-truth foreground (the "_masked" variants); ``face_mask``: the
        rasterized mask of the fitted mesh (the face metrics), both (T, H, W).

        Returns ``{"frames": T, "metrics": {name: {"mean": float, "per_frame": [..] | None}},
        "skipped": {name: reason}}`` with names like "psnr" and "psnr_masked".
        """
        g, p = to_float_frames(gt, "gt"), to_float_frames(pred, "pred")
        if g.shape != p.shape:
            raise ValueError(f"ground truth {tuple(g.shape)} and prediction {tuple(p.shape)} differ in shape")
        metrics: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        self._image_metrics(p, g, "", metrics)
        if mask is not None:
            m = to_float_mask(mask, g.shape[0], "mask")
            if m.shape[-2:] != g.shape[-2:]:
                raise ValueError(f"mask {tuple(m.shape[-2:])} and frames {tuple(g.shape[-2:])} differ in size")
            bg = self.config.background
            masked_pred, masked_gt = composite_on_background(p, m, bg), composite_on_background(g, m, bg)
            masked: dict[str, dict] = {}
            self._image_metrics(masked_pred, masked_gt, "_masked", masked)
            # a frame without foreground (the person out of view) composites to the same white for both: its
            # masked per-frame values (PSNR +inf, SSIM 1, LPIPS 0) measure nothing; undefined, as for face metrics
            empty = ~(m > 0.5).flatten(1).any(1)
            metrics.update({k: _undefined_where(v, empty) for k, v in masked.items()})
        else:
            for name in self.config.metrics:
                if name in MASKABLE:
                    skipped[f"{name}_masked"] = f"{name.upper()} masked skipped: no foreground mask given"
        if face_mask is not None:
            f = to_float_mask(face_mask, g.shape[0], "face_mask")
            if f.shape[-2:] != g.shape[-2:]:
                raise ValueError(f"face mask {tuple(f.shape[-2:])} and frames {tuple(g.shape[-2:])} differ in size")
            self._face_metrics(p, g, f, metrics)
        else:
            for name in self.config.metrics:
                if name in FACE_METRICS:
                    skipped[name] = f"{name} skipped: no rasterized face mask given"
        if "akd" in self.config.metrics:
            value = self._faces.akd(p, g)
            if value is None:
                skipped["akd"] = self._faces.akd_skip_reason
            else:
                metrics["akd"] = _summary(value)
        if "csim" in self.config.metrics:
            value = self._faces.csim(p, g)
            if value is None:
                skipped["csim"] = self._faces.csim_skip_reason
            else:
                metrics["csim"] = _summary(value)
        return {"frames": int(g.shape[0]), "metrics": metrics, "skipped": skipped}


def evaluate_video(
    gt: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    face_mask: np.ndarray | torch.Tensor | None = None,
    config: EvalConfig | None = None,
    metrics: Sequence[str] | None = None,
    lpips_weights: Path | str | None = None,
) -> dict:
    """One-shot convenience wrapper around `Evaluator(config).evaluate_video` (loads models each call)."""
    if config is None:
        chosen = tuple(metrics) if metrics is not None else DEFAULT_METRICS
        config = EvalConfig(metrics=chosen, lpips=LpipsConfig(Path(lpips_weights)) if lpips_weights else None)
    return Evaluator(config).evaluate_video(gt, pred, mask, face_mask)
