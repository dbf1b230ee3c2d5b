"""Per-person DeepSpeed training of a DiffusionAvatars model."""

from .config import PRESETS, TrainConfig
from .trainer import train_person

__all__ = ["PRESETS", "TrainConfig", "train_person"]
