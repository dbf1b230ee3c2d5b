"""Which tensors hold a NaN or an infinity: the check a diverged run meets before anything of it is written or
resumed (the trainer's checkpoints and model, a checkpoint being resumed, the base pretraining's stages)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def non_finite(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``tensors`` that hold a NaN or an infinity (one host sync)."""
    floats = {name: t for name, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point()}
    if not floats:
        return []
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(t).all() for t in floats.values()]).tolist()
    return [name for name, ok in zip(floats, finite) if not ok]


def first_names(names: list[str]) -> str:
    """The first three of ``names`` and how many more, for a message."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
