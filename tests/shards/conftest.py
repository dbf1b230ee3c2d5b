from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shards.synthetic import SyntheticConfig
from shards.testing import TINY


@pytest.fixture(scope="session")
def tiny_data(tiny_dataset) -> tuple[Path, Path, Path]:
    """(captures, stores, shards) of the tiny data set, shared read-only (tests/conftest.py)."""
    return tiny_dataset


@pytest.fixture(scope="session")
def tiny_captures(tiny_data) -> Path:
    return tiny_data[0]


@pytest.fixture(scope="session")
def tiny_stores(tiny_data) -> Path:
    return tiny_data[1]


@pytest.fixture(scope="session")
def tiny_shards(tiny_data) -> Path:
    return tiny_data[2]


@pytest.fixture(scope="session")
def tiny_cfg() -> SyntheticConfig:
    """The tiny synthetic config the shared data was generated with."""
    return TINY


@pytest.fixture
def capture_copy(tiny_captures, tmp_path) -> Path:
    """A private copy of the tiny capture root that a test may break."""
    dst = tmp_path / "captures"
    shutil.copytree(tiny_captures, dst)
    return dst
