"""Image/video quality metrics and comparison videos for rendered avatars (issue 7).

The renderer calls :class:`Evaluator` (or :func:`evaluate_video`) once per person and
task, and :func:`write_comparison_video` for the gt | render | buffers mp4. Attributes are
imported lazily so that torch-free users (the nightly report) stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalConfig": "metrics",
    "Evaluator": "metrics",
    "composite_on_background": "metrics",
    "evaluate_video": "metrics",
    "psnr": "metrics",
    "ssim": "metrics",
    "jod": "metrics",
    "LpipsConfig": "lpips_weights",
    "LpipsWeightsMissing": "lpips_weights",
    "load_lpips": "lpips_weights",
    "FaceModelConfig": "face_models",
    "buffers_to_rgb": "video",
    "read_video": "video",
    "write_comparison_video": "video",
    "DEFAULT_METRICS": "metric_names",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'avatars.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"avatars.evaluation.{_EXPORTS[name]}"), name)
