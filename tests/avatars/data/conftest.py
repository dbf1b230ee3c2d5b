from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def loader_shards(tiny_dataset) -> Path:
    """Shard root of the tiny data set, shared read-only (tests/conftest.py)."""
    return tiny_dataset[2]
