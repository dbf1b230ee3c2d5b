"""Metric names, labels and directions, importable without torch (the report uses them)."""

from __future__ import annotations

#: Metric name -> (display label, higher is better). Masked variants carry the suffix "_masked".
METRIC_INFO: dict[str, tuple[str, bool]] = {
    "psnr": ("PSNR", True),
    "ssim": ("SSIM", True),
    "lpips": ("LPIPS", False),
    "jod": ("JOD", True),
    "akd": ("AKD", False),
    "csim": ("CSIM", True),
}
DEFAULT_METRICS: tuple[str, ...] = tuple(METRIC_INFO)
#: Metrics that have a masked variant (AKD/CSIM are identity/landmark measures on the full frame).
MASKABLE: tuple[str, ...] = ("psnr", "ssim", "lpips", "jod")
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
