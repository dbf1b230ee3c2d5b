"""Names of the metrics the evaluation computes, importable without torch.

A masked variant carries the suffix :data:`MASKED_SUFFIX`. How they are shown (labels, which
direction is better, table order) is the report's business: ``cluster/report/metric_labels.py``.
"""

from __future__ import annotations

#: Every metric, in table order. "psnr" is the paper's protocol (squared error pooled over
#: batches of 16 frames, averaged over the batches of a sequence, then over sequences);
#: "psnr_frame" the mean of per-frame PSNRs. "jod" is the paper's JOD (FovVideoVDP), "cvvdp"
#: ColorVideoVDP's JOD (a different metric). The "_face" metrics and "colour_error" look only
#: inside the rasterized face mask.
DEFAULT_METRICS: tuple[str, ...] = (
    "psnr", "psnr_frame", "ssim", "lpips", "jod", "cvvdp", "psnr_face", "lpips_face", "colour_error", "akd", "csim",
)
#: Metrics that have a masked variant (AKD/CSIM are identity/landmark measures on the full frame;
#: the face metrics are restricted to the rasterized mask already).
MASKABLE: tuple[str, ...] = ("psnr", "psnr_frame", "ssim", "lpips", "jod", "cvvdp")
#: Metrics computed only inside the rasterized face mask (skipped without one).
FACE_METRICS: tuple[str, ...] = ("psnr_face", "lpips_face", "colour_error")
MASKED_SUFFIX = "_masked"
