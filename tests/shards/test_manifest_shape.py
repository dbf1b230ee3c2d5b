"""A shard manifest that is valid JSON of another shape (`shards` not an object, an entry not an object: a hand
edit, another program's file) is a ShardError naming the manifest and the field, for the preprocess (that person
fails, the others are written) and for the loader's check. Before, AttributeError or TypeError, and the preprocess
stopped for every person."""

from __future__ import annotations

import json
import shutil

import pytest

from shards.integrity import MANIFEST, ShardError, verify_against_manifests
from shards.testing import TINY_SHARDS
from shards.writer import plan_shards, write_shards

SHAPES = {
    "shards-a-list": (lambda m: {**m, "shards": list(m["shards"])}, 'field "shards" is a list, not an object'),
    "entry-a-string": (lambda m: {**m, "shards": {k: "sha256" for k in m["shards"]}},
                       'field "shards"."{first}" is a string, not an object'),
}


@pytest.fixture
def shard_copy(tiny_dataset, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(tiny_dataset[2], root)
    return root


def _reshape(root, person, shape):
    path = root / person / MANIFEST
    manifest = json.loads(path.read_text())
    reshape, problem = SHAPES[shape]
    path.write_text(json.dumps(reshape(manifest)))
    return path, problem.format(first=next(iter(manifest["shards"])))


@pytest.mark.parametrize("shape", SHAPES)
def test_the_preprocess_fails_that_person_naming_the_manifest_and_the_field(tiny_dataset, shard_copy, shape):
    path, problem = _reshape(shard_copy, "000", shape)
    before = path.read_text()
    stores = [tiny_dataset[1] / "000.zarr", tiny_dataset[1] / "001.zarr"]
    plan = plan_shards(stores, shard_copy, TINY_SHARDS, write_index=False)  # launch_all --dry-run's planning
    assert plan.failed["000"].startswith(f"{path}: {problem}") and "001" in plan.tasks
    result = write_shards(stores, shard_copy, TINY_SHARDS, workers=1, progress=False)
    assert set(result.failed) == {"000"} and result.failed["000"].startswith(f"{path}: {problem}")
    assert result.skipped and all(name.startswith("001/") for name in result.skipped)
    assert path.read_text() == before  # not overwritten unread


@pytest.mark.parametrize("shape", SHAPES)
def test_the_loaders_check_names_the_manifest_and_the_field(shard_copy, shape):
    path, problem = _reshape(shard_copy, "000", shape)
    with pytest.raises(ShardError) as err:
        verify_against_manifests(sorted((shard_copy / "000").glob("*.tar")))
    assert str(err.value).startswith(f"{path}: {problem}")
