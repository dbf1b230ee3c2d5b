"""Per-person DeepSpeed training of a DiffusionAvatars model."""

from .callbacks import TrainerCallback, default_callbacks
from .config import PRESETS, TrainConfig, TrainOptions, train_preset
from .trainer import Trainer, train_person

__all__ = ["PRESETS", "TrainConfig", "TrainOptions", "Trainer", "TrainerCallback", "default_callbacks", "train_person",
           "train_preset"]
