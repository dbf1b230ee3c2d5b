"""Per-person DeepSpeed training of a DiffusionAvatars model.

The options (:mod:`.config`) and the callbacks are imported with the package; the trainer on first
use (PEP 562), so that a command line parses its options, refuses bad ones and prints ``--help``
without waiting for diffusers' import (~10 s)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .callbacks import TrainerCallback, default_callbacks
from .config import PRESETS, TrainConfig, TrainOptions, train_preset

if TYPE_CHECKING:
    from .trainer import Trainer, train_person

__all__ = ["PRESETS", "TrainConfig", "TrainOptions", "Trainer", "TrainerCallback", "default_callbacks", "train_person",
           "train_preset"]


def __getattr__(name: str):
    if name in ("Trainer", "train_person"):
        return getattr(importlib.import_module(".trainer", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
