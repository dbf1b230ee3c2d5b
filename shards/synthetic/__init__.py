"""Synthetic multi-view head captures for tests, benchmarks and the default main job."""

from .generate import FRONTAL_SERIAL, SyntheticConfig, generate, generate_person

__all__ = ["FRONTAL_SERIAL", "SyntheticConfig", "generate", "generate_person"]
