"""Shard integrity without hashing every shard at every launch: per-sample checksums, the size + mtime up-to-date
check of the preprocess (`verified.json`), the rebuild of shards a reader marked corrupt, and `--verify-all`."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from shards import integrity, writer
from shards.codec import MEMBERS, decode_raw, decode_sample, encode_sample
from shards.integrity import MANIFEST
from shards.testing import TINY_SHARDS, rot_bit
from shards.writer import write_shards


def _members() -> dict[str, bytes]:
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    return encode_sample(np.zeros((4, 5, 3), np.uint8), mask.astype(np.uint8) * 255, mask,
                         np.where(mask, 1.0, 0.0) + np.arange(5) * 0.01, np.zeros((4, 5, 5)),
                         np.zeros((4, 5, 3)), np.arange(3, dtype=np.float32) + 0.5, {"timestep": 17, "K": []})


def _flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


@pytest.mark.parametrize("member", MEMBERS)
def test_a_flipped_byte_in_any_member_fails_the_samples_checksum(member):
    """Even where it would decode to a valid sample: a float32 expression value's lowest bit, a digit of the
    timestep in the json, a byte of a compressed member, or the checksum itself."""
    members = _members()
    decode_sample("k", members)
    data = members[member]
    if member == "json":
        at = data.index(b'"timestep": 17') + len(b'"timestep": ')  # 17 -> 07: valid json, another frame
    else:  # expr.npy: the lowest byte of its last float32 (a finite value still)
        at = len(data) - 4 if member == "expr.npy" else len(data) // 2
    with pytest.raises(ValueError, match="sample checksum mismatch"):
        decode_raw("k", {**members, member: _flipped(data, at)})
    with pytest.raises(ValueError, match="lacks sha256"):
        decode_raw("k", {k: v for k, v in members.items() if k != "sha256"})


# ---- the preprocess's up-to-date check ------------------------------------------------------------------------------

def _copy(tiny_shards: Path, dst: Path) -> Path:
    """The tiny shards of person 000, copied with their mtimes (as `cp -p` and rsync -t do)."""
    shutil.copytree(tiny_shards / "000", dst / "000")
    return dst / "000"


def _no_hashing(monkeypatch) -> None:
    """Makes every whole-shard hash fail the test."""
    def refuse(path):
        raise AssertionError(f"{path} was hashed")
    monkeypatch.setattr(integrity, "file_sha256", refuse)


def _counting_hashes(monkeypatch) -> list[str]:
    hashed, real = [], integrity.file_sha256

    def count(path):
        hashed.append(Path(path).name)
        return real(path)
    monkeypatch.setattr(integrity, "file_sha256", count)
    return hashed


def _member_offset(path: Path, ext: str) -> int:
    with tarfile.open(path) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith("." + ext))
    return m.offset_data + m.size // 2


def test_up_to_date_shards_are_not_read_when_size_and_mtime_match(tiny_stores, tiny_shards, tmp_path, monkeypatch):
    _copy(tiny_shards, tmp_path)
    _no_hashing(monkeypatch)
    res = write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert not res.written and not res.failed and len(res.skipped) == len(list((tmp_path / "000").glob("*.tar")))


def test_a_shard_with_another_mtime_is_hashed_kept_when_intact_and_rebuilt_when_corrupt(tiny_stores, tiny_shards,
                                                                                         tmp_path, monkeypatch):
    person = _copy(tiny_shards, tmp_path)
    touched, damaged = person / "train-000000.tar", person / "train-000001.tar"
    original = damaged.read_bytes()
    manifest = (person / MANIFEST).read_bytes()
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # touched: same bytes
    rot_bit(damaged, _member_offset(damaged, "json"))  # the same size...
    os.utime(damaged, ns=(damaged.stat().st_atime_ns, damaged.stat().st_mtime_ns + 2 * 10**9))  # ...another mtime
    hashed = _counting_hashes(monkeypatch)
    res = write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert sorted(hashed) == [touched.name, damaged.name]
    assert list(res.rebuilt) == [f"000/{damaged.name}"] and "sha256" in res.rebuilt[f"000/{damaged.name}"]
    assert res.written == [f"000/{damaged.name}"] and f"000/{touched.name}" in res.skipped
    assert damaged.read_bytes() == original
    # The touched shard's new mtime is recorded beside the manifest, whose bytes (which key the evaluation and the
    # base pretraining) stay as they were: a touched or copied shard changes no digest.
    assert (person / MANIFEST).read_bytes() == manifest
    recorded = integrity.load_verified(person)
    assert recorded[touched.name]["mtime_ns"] == touched.stat().st_mtime_ns
    assert recorded[damaged.name]["mtime_ns"] == damaged.stat().st_mtime_ns
    hashed.clear()
    res = write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert not hashed and not res.written  # verified once, trusted after


def test_shards_listed_without_a_record_are_hashed_once(tiny_stores, tiny_shards, tmp_path, monkeypatch):
    """A manifest written before `verified.json` existed: every shard is hashed once, then trusted."""
    person = _copy(tiny_shards, tmp_path)
    (person / integrity.VERIFIED).unlink()
    hashed = _counting_hashes(monkeypatch)
    res = write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert not res.written and sorted(hashed) == sorted(p.name for p in person.glob("*.tar"))
    hashed.clear()
    write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert not hashed


def test_a_shard_marked_corrupt_by_a_reader_is_rebuilt_and_the_marker_removed(tiny_stores, tiny_shards, tmp_path,
                                                                               monkeypatch):
    person = _copy(tiny_shards, tmp_path)
    victim = person / "test_cam-000000.tar"
    original = victim.read_bytes()
    rot_bit(victim, _member_offset(victim, "expr.npy"))
    (person / "train-000099.tar.corrupt").write_text("left over from a larger plan")
    integrity.mark_corrupt(victim, "sample 000/x: sample checksum mismatch")
    _no_hashing(monkeypatch)
    res = write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert res.written == [f"000/{victim.name}"] and "checksum mismatch" in res.rebuilt[f"000/{victim.name}"]
    assert victim.read_bytes() == original
    assert not list(person.glob("*.corrupt"))


def test_shards_of_the_previous_codec_are_rebuilt(tiny_stores, tmp_path, monkeypatch):
    """Codec 2 shards carry no per-sample checksum: the codec version in the spec digest rebuilds them."""
    with monkeypatch.context() as m:
        m.setattr(writer, "CODEC_VERSION", 2)
        first = write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    again = write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert first.written and sorted(again.written) == sorted(first.written) and not again.skipped


def test_verify_all_hashes_every_shard_and_finds_bitrot_bit(tiny_stores, tiny_shards, tmp_path, capsys):
    """Bit rot keeps size and mtime: the nightly check keeps the shard (its samples fail when read and mark it),
    `jobs/preprocess.py --verify-all` hashes it and rebuilds it."""
    from jobs.preprocess import PreprocessArgs, main

    person = _copy(tiny_shards, tmp_path / "shards")
    victim = person / "train-000001.tar"
    original = victim.read_bytes()
    rot_bit(victim, _member_offset(victim, "json"))
    args = PreprocessArgs(stores=tiny_stores, out=tmp_path / "shards", persons="000", shards=TINY_SHARDS, workers=1)
    assert not main(args).written
    res = main(PreprocessArgs(**{**vars(args), "verify_all": True}))
    assert res.written == [f"000/{victim.name}"] and "sha256" in res.rebuilt[f"000/{victim.name}"]
    assert victim.read_bytes() == original and hashlib.sha256(original).hexdigest() in (person / MANIFEST).read_text()
    assert "sha256 checked" in capsys.readouterr().out


def test_readers_marking_the_same_shard_at_once_leave_one_whole_marker(tmp_path):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"x")
    reasons = {f"sample {i}: checksum mismatch " + "x" * 2000 for i in range(8)}
    seen, stop = set(), threading.Event()

    def look():
        while not stop.is_set():
            seen.add(integrity.corrupt_mark(shard))

    watcher = threading.Thread(target=look)
    watcher.start()
    writers = [threading.Thread(target=lambda r=r: [integrity.mark_corrupt(shard, r) for _ in range(20)])
               for r in reasons]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    watcher.join()
    assert seen - {None} <= reasons and integrity.corrupt_mark(shard) in reasons
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard.name, shard.name + ".corrupt"]  # no temporary left
