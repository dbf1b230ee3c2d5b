from __future__ import annotations

from pathlib import Path

import pytest

from shards.testing import build_tiny


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    """Shard root of the tiny data set (persons 000, 001)."""
    return build_tiny(tmp_path_factory.mktemp("tiny-train"))[2]
