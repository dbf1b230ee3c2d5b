"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.fingerprint import tree_fingerprint
from shards.testing import build_tiny


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(captures, stores, shards) of the tiny synthetic data set (``shards.testing.TINY``), built
    once for the whole session (seconds of CPU each time) and shared read-only: a test that breaks
    or rebuilds data works on a copy. Checked at the end of the session: had a test written into
    it, the tests after it would have run on other data than they think."""
    root = tmp_path_factory.mktemp("tiny-shared")
    data = build_tiny(root)
    before = tree_fingerprint(root)
    yield data
    assert tree_fingerprint(root) == before, f"a test changed the shared tiny data set under {root}"
