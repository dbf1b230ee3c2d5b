"""A code change of the base pretraining that makes another base for the same settings and data is seen:
RECIPE_VERSION is part of the base's key. Before, a base pretrained by the older code was reused because its
settings matched."""

from __future__ import annotations

import json
from pathlib import Path

from avatars.training import base_pretraining


def test_a_new_recipe_version_changes_the_base_key(tmp_path, monkeypatch):
    shards = tmp_path / "shards" / "000"
    shards.mkdir(parents=True)
    (shards / "manifest.json").write_text(json.dumps({"person": "000", "shards": {}}))
    config = base_pretraining.BasePretrainConfig(shard_root=Path(tmp_path / "shards"), persons="000")
    before = base_pretraining.base_key(config)
    assert base_pretraining.full_fingerprint(config)["recipe"] == base_pretraining.RECIPE_VERSION
    monkeypatch.setattr(base_pretraining, "RECIPE_VERSION", base_pretraining.RECIPE_VERSION + 1)
    assert base_pretraining.base_key(config) != before
