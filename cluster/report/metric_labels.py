"""How the report shows the metrics of results.json: labels, which direction is better, order.

The names are those ``avatars.evaluation`` computes (``avatars/evaluation/metric_names.py``;
a test checks that every one has a label here). Unknown names are shown as given.
"""

from __future__ import annotations

#: Metric name -> (display label, higher is better), in table order. Masked variants carry the
#: suffix "_masked".
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
    known = [m for m in METRIC_INFO if m in names]
    known += [m + MASKED_SUFFIX for m in METRIC_INFO if m + MASKED_SUFFIX in names]
    return known + sorted(set(names) - set(known))
