"""Samples with no foreground, or whose mesh is not on the person, are refused before they are trained on.

The loss is an unmasked MSE over the whole image: a sample whose camera does not see the mesh (an empty
rasterized mask), whose mesh lies beside the person, or whose alpha map is empty or a 0/1 mask (the target matted
to pure background) would teach the model to draw a head from nothing or to erase one it draws.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.io import DataError
from shards import writer
from shards.codec import decode_raw, encode_sample
from shards.contract import PersonCapture
from shards.ingest import IngestConfig, ingest_person
from shards.store import SPLITS
from shards.testing import TINY_SHARDS
from shards.writer import MANIFEST, plan_person, shard_paths, write_shards

CFG = IngestConfig(held_out_sequences=1, io_threads=2)
HELD_OUT = "222200037"  # the tiny set's held-out (frontal) camera
TRAIN_CAMERA = "221501007"


def _first_alpha(root: Path, serial: str = TRAIN_CAMERA) -> Path:
    cap = PersonCapture(root, "000")
    seq = cap.sequences()[0]
    return cap.alpha_path(seq, cap.timesteps(seq)[0], serial)


def _edit_calibration(root: Path, change) -> Path:
    p = PersonCapture(root, "000").calibration_path
    calib = json.loads(p.read_text())
    change(calib)
    p.write_text(json.dumps(calib))
    return p


def _look_away(serial: str):
    """Turn camera ``serial`` by 180 degrees about its y axis: still a rigid transform, but the head is behind it."""
    def change(calib: dict) -> None:
        w2c = np.array(calib["world_2_cam"][serial])
        flip = np.diag([-1.0, 1.0, -1.0])
        w2c[:3, :3], w2c[:3, 3] = flip @ w2c[:3, :3], flip @ w2c[:3, 3]
        calib["world_2_cam"][serial] = w2c.tolist()
    return change


def _shift_principal_point(serial: str, pixels: float):
    def change(calib: dict) -> None:
        calib["intrinsics"][serial][0][2] += pixels
    return change


def _keys_of_listed_shards(shard_dir: Path, person: str) -> list[str]:
    manifest = json.loads((shard_dir / person / MANIFEST).read_text())
    keys = []
    for name in manifest["shards"]:
        with tarfile.open(shard_dir / person / name) as tar:
            keys += [m.name for m in tar.getmembers() if m.name.endswith(".json")]
    return keys


# ---- the ingest: alpha maps with no foreground or 0/1 values -------------------------------------------------------

@pytest.mark.parametrize("values,message", [
    (lambda a: np.zeros_like(a), "alpha map is all zero"),
    (lambda a: (a > 127).astype(np.uint8), "alpha map is 8-bit with values 0/1: 8-bit alpha maps are 0..255"),
])
def test_the_ingest_refuses_an_empty_or_0_1_alpha_map_naming_it(values, message, capture_copy, tmp_path):
    alpha = _first_alpha(capture_copy)
    with Image.open(alpha) as im:
        assert im.mode == "L"
        Image.fromarray(values(np.asarray(im)), "L").save(alpha)
    with pytest.raises(DataError) as err:
        ingest_person(capture_copy, "000", tmp_path / "zarr", CFG)
    assert err.value.path == alpha and message in str(err.value)
    assert not (tmp_path / "zarr" / "000.zarr").exists()


def test_a_1_bit_alpha_map_is_still_accepted_and_matted_as_0_255(capture_copy, tmp_path):
    alpha = _first_alpha(capture_copy)
    with Image.open(alpha) as im:
        im.convert("1").save(alpha)
    store = ingest_person(capture_copy, "000", tmp_path / "zarr", CFG).path
    res = write_shards([store], tmp_path / "shards", TINY_SHARDS, progress=False)
    assert not res.failed and shard_paths(tmp_path / "shards", "000", "train")


def test_stores_ingested_before_the_alpha_checks_are_validated_again(capture_copy, tmp_path, monkeypatch):
    """The checks are part of the store's fingerprint: a store an older ingest accepted is not 'up to date'."""
    from shards import ingest

    assert not ingest_person(capture_copy, "000", tmp_path / "zarr", CFG).skipped
    assert ingest_person(capture_copy, "000", tmp_path / "zarr", CFG).skipped
    monkeypatch.setattr(ingest, "VALIDATION_VERSION", ingest.VALIDATION_VERSION - 1)
    assert not ingest_person(capture_copy, "000", tmp_path / "zarr", CFG).skipped


# ---- the shard writer: the rasterized mesh against the alpha map ---------------------------------------------------

@pytest.mark.parametrize("serial", [TRAIN_CAMERA, HELD_OUT])
def test_a_camera_that_does_not_see_the_mesh_fails_its_person_alone(serial, capture_copy, tmp_path):
    """A camera looking away from the head (a 180-degree error in its extrinsics) gives empty rasterized masks: the
    person fails at the shards with the store, sequence, frame, camera and what to check named; the other person
    is written, and training refuses the failed person's shards saying why."""
    calib_path = _edit_calibration(capture_copy, _look_away(serial))
    stores = [ingest_person(capture_copy, p, tmp_path / "zarr", CFG).path for p in ("000", "001")]  # ingest passes
    res = write_shards(stores, tmp_path / "shards", TINY_SHARDS, progress=False)
    assert list(res.failed) == ["000"], res.failed
    error = res.failed["000"]
    assert error.startswith(f"DataError: {stores[0]}: sequence "), error
    for part in (f"camera {serial} (sample 000/", "the fitted mesh covers no pixel of the image",
                 f"camera {serial}'s world_2_cam and intrinsics in {calib_path}", "coordinate frame"):
        assert part in error, error
    # no sample of the blind camera in any listed shard; the other person complete
    assert not [k for k in _keys_of_listed_shards(tmp_path / "shards", "000") if f"cam_{serial}" in k]
    for split in SPLITS:
        assert shard_paths(tmp_path / "shards", "001", split)
    with pytest.raises(DataError, match=rf"incomplete \(the last preprocess failed: .*camera {serial}"):
        shard_paths(tmp_path / "shards", "000", "test_cam" if serial == HELD_OUT else "train")


def test_a_mesh_that_projects_beside_the_person_is_refused(capture_copy, tmp_path):
    """A visible mesh mostly outside the alpha map's foreground (here a principal point 28 px off at 48 px: about a
    quarter of the mesh's pixels lie on the person) is refused, with the fraction and the threshold."""
    _edit_calibration(capture_copy, _shift_principal_point(TRAIN_CAMERA, 28.0))
    store = ingest_person(capture_copy, "000", tmp_path / "zarr", CFG).path
    res = write_shards([store], tmp_path / "shards", TINY_SHARDS, progress=False)
    error = res.failed["000"]
    assert f"camera {TRAIN_CAMERA}" in error and "the mesh does not project onto the person" in error, error
    assert f"at least {writer.MIN_MESH_IN_MATTE:.0%} needed" in error and "alpha > 0.5" in error
    assert str(_first_alpha(capture_copy).parent) in error  # the alpha map to check
    fraction = int(error.split("only ")[1].split("%")[0])
    assert 0 < fraction < 100 * writer.MIN_MESH_IN_MATTE


@pytest.mark.parametrize("values,message", [
    (lambda a: np.zeros_like(a), "alpha map is all zero"),
    (lambda a: (a > 127).astype(np.uint8), "alpha map is 8-bit with values 0/1"),
])
def test_an_alpha_map_broken_after_the_ingest_fails_its_person_at_the_shards(values, message, capture_copy,
                                                                            tmp_path):
    """The writer reads the alpha maps again: one made empty or 0/1 since the ingest (or a store an older ingest
    accepted) is refused naming the file, not matted to pure background."""
    store = ingest_person(capture_copy, "000", tmp_path / "zarr", CFG).path
    alpha = _first_alpha(capture_copy)
    with Image.open(alpha) as im:
        Image.fromarray(values(np.asarray(im)), "L").save(alpha)
    res = write_shards([store], tmp_path / "shards", TINY_SHARDS, progress=False)
    assert res.failed["000"].startswith(f"DataError: {alpha}: {message}"), res.failed


def test_shards_written_before_the_checks_are_rebuilt(tiny_stores, tmp_path, monkeypatch):
    """The checks are part of every shard's spec: shards an older writer wrote are not taken as up to date."""
    before = [t.spec for t in plan_person(tiny_stores / "000.zarr", tmp_path, TINY_SHARDS)]
    monkeypatch.setattr(writer, "SAMPLE_CHECKS", writer.SAMPLE_CHECKS - 1)
    after = [t.spec for t in plan_person(tiny_stores / "000.zarr", tmp_path, TINY_SHARDS)]
    assert all(a != b for a, b in zip(before, after))


def test_the_synthetic_data_lies_on_its_matte_in_every_split(tiny_shards):
    """The project's own data passes with a wide margin: >= 99% of every sample's mesh pixels are foreground."""
    from avatars.data import LoaderConfig, ShardDataset

    fractions = {}
    for person in ("000", "001"):
        for split in SPLITS:
            ds = ShardDataset(shard_paths(tiny_shards, person, split), LoaderConfig(resolution=48, num_workers=0))
            for i in range(len(ds)):
                s = ds.decoded(i)
                fractions[s.key] = writer.mesh_in_matte(s.mask[0] > 0, np.round(s.alpha[0] * 255).astype(np.uint8))
    assert len(fractions) == 2 * 18 and min(fractions.values()) >= 0.99, min(fractions.values())


# ---- the codec ------------------------------------------------------------------------------------------------------

def _sample(mask: np.ndarray, alpha: np.ndarray) -> dict[str, bytes]:
    h, w = mask.shape
    return encode_sample(np.zeros((h, w, 3), np.uint8), alpha, mask, np.where(mask, 1.0, 0.0), np.zeros((h, w, 5)),
                         np.zeros((h, w, 3)), np.zeros(3), {"K": []})


def test_the_codec_refuses_to_encode_a_sample_with_no_mesh_or_no_foreground():
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    alpha = mask.astype(np.uint8) * 255
    decode_raw("k", _sample(mask, alpha))
    with pytest.raises(ValueError, match="rasterized mask is empty"):
        _sample(np.zeros_like(mask), alpha)
    with pytest.raises(ValueError, match="alpha map is all zero"):
        _sample(mask, np.zeros_like(alpha))


@pytest.mark.parametrize("member,message", [("geom.npy.zst", "rasterized mask is empty"),
                                            ("alpha.npy.zst", "alpha map is all zero")])
def test_a_stored_sample_with_no_mesh_or_no_foreground_is_refused_on_decode(member, message):
    """Shards an older writer wrote with such samples fail when read, not train (the sample's checksum is made
    anew over the changed member: it is what such a writer wrote, not corrupt bytes)."""
    from shards.codec import _ZSTD, CHECKSUM, _npy_zst, sample_checksum

    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    members = _sample(mask, mask.astype(np.uint8) * 255)
    stored = np.load(io.BytesIO(_ZSTD.decode(members[member])))
    members[member] = _npy_zst(np.zeros_like(stored))
    members[CHECKSUM] = sample_checksum(members)
    with pytest.raises(ValueError, match=message):
        decode_raw("k", members)
