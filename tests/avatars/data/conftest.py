from __future__ import annotations

from pathlib import Path

import pytest

from shards.testing import build_tiny


@pytest.fixture(scope="session")
def loader_shards(tmp_path_factory) -> Path:
    """Shard root of the tiny data set."""
    return build_tiny(tmp_path_factory.mktemp("tiny-loader"))[2]
