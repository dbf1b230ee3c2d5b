"""Metric names, labels and directions, importable without torch (the report uses them)."""

from __future__ import annotations

#: Metric name -> (display label, higher is better). Masked variants carry the suffix "_masked".
#: "psnr" is the paper's protocol (squared error pooled over batches of 16 frames, averaged over
#: the batches of a sequence, then over sequences); "psnr_frame" the mean of per-frame PSNRs.
#: "jod" is the paper's JOD (FovVideoVDP), "cvvdp" ColorVideoVDP's JOD (a different metric).
#: The "_face" metrics and "colour_error" look only inside the rasterized face mask.
METRIC_INFO: dict[str, tuple[str, bool]] = {
    "psnr": ("PSNR", True),
    "psnr_frame": ("PSNR per-frame mean", True),
    "ssim": ("SSIM", True),
    "lpips": ("LPIPS", False),
    "jod": ("JOD (FovVideoVDP)", True),
    "cvvdp": ("JOD (ColorVideoVDP)", True),
    "psnr_face": ("PSNR in face mask", True),
    "lpips_face": ("LPIPS in face mask", False),
    "colour_error": ("face colour error (ΔE)", False),
    "akd": ("AKD", False),
    "csim": ("CSIM", True),
}
DEFAULT_METRICS: tuple[str, ...] = tuple(METRIC_INFO)
#: Metrics that have a masked variant (AKD/CSIM are identity/landmark measures on the full frame;
#: the face metrics are restricted to the rasterized mask already).
MASKABLE: tuple[str, ...] = ("psnr", "psnr_frame", "ssim", "lpips", "jod", "cvvdp")
#: Metrics computed only inside the rasterized face mask (skipped without one).
FACE_METRICS: tuple[str, ...] = ("psnr_face", "lpips_face", "colour_error")
MASKED_SUFFIX = "_masked"


def base_metric(name: str) -> str:
    """'psnr_masked' -> 'psnr'."""
    return name.removesuffix(MASKED_SUFFIX)


def metric_label(name: str) -> str:
    """'lpips_masked' -> 'LPIPS (masked)'; unknown names are shown as given."""
    label = METRIC_INFO.get(base_metric(name), (base_metric(name), True))[0]
    return f"{label} (masked)" if name.endswith(MASKED_SUFFIX) else label


def higher_is_better(name: str) -> bool:
    return METRIC_INFO.get(base_metric(name), ("", True))[1]


def metric_order(names: set[str] | list[str]) -> list[str]:
    """Known metrics in table order (unmasked, then masked), then unknown ones alphabetically."""
    known = [m for m in DEFAULT_METRICS if m in names] + [m + MASKED_SUFFIX for m in DEFAULT_METRICS if m + MASKED_SUFFIX in names]
    return known + sorted(set(names) - set(known))
