"""Per-person DeepSpeed training of a DiffusionAvatars model."""

from .config import PRESETS, TrainConfig, TrainOptions
from .trainer import train_person

__all__ = ["PRESETS", "TrainConfig", "TrainOptions", "train_person"]
