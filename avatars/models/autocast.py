"""Autocast state queries that work for any device type (meta tensors included)."""

from __future__ import annotations

import contextlib

import torch

#: Device types autocast knows; ``torch.is_autocast_enabled`` raises for others (e.g. "meta").
_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu", "xla", "mtia", "maia")


def is_active(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` here (False for a type autocast does not know)."""
    return device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


def suspended(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for ``device_type`` inside (nothing to do when it is not on)."""
    if not is_active(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
