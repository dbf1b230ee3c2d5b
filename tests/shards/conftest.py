from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shards.synthetic import SyntheticConfig, generate

#: Small enough to generate in about a second on one core, big enough to have every feature.
TINY = SyntheticConfig(persons=2, sequences=3, frames=2, cameras=3, image_size=48, n_lat=24, n_lon=32,
                       expression_dim=10, seed=7)


@pytest.fixture(scope="session")
def tiny_captures(tmp_path_factory) -> Path:
    """A tiny synthetic capture root shared (read-only) by the tests of this package."""
    root = tmp_path_factory.mktemp("captures")
    generate(TINY, root)
    return root


@pytest.fixture
def capture_copy(tiny_captures, tmp_path) -> Path:
    """A private copy of the tiny capture root that a test may break."""
    dst = tmp_path / "captures"
    shutil.copytree(tiny_captures, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_cfg() -> SyntheticConfig:
    """The tiny synthetic config the shared captures were generated with."""
    return TINY
