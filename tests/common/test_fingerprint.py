"""Content fingerprints (common/fingerprint.py): what they cover, linked folders included."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from common.fingerprint import file_digest, folder_sha256, tree_fingerprint, walk_tree


def _tree(root: Path) -> Path:
    for rel, data in {"a.txt": b"a", "unet/w.bin": b"weights", "unet/cfg/x.json": b"{}", ".tmp-partial": b"x",
                      "B.txt": b"upper"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_the_fingerprint_of_a_tree_without_links_is_the_one_of_before(tmp_path):
    """Bases and avatars record the fingerprint of the base they were made on: a tree without links must keep
    the value it had when the files were listed by ``sorted(root.rglob("*"))``, or every avatar already trained
    would be refused as trained on another base."""
    root = _tree(tmp_path / "base")
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):  # the listing of before
        rel = path.relative_to(root)
        if not any(part.startswith(".") for part in rel.parts) and path.is_file():
            h.update(f"{rel.as_posix()}\0{file_digest(path)}\n".encode())
    assert tree_fingerprint(root) == h.hexdigest()


def test_a_change_in_a_linked_folder_changes_the_fingerprint(tmp_path):
    """A base whose UNet folder links to shared weights: new weights there are a new base (before, Path.rglob did
    not enter the link and the fingerprint stayed, so avatars and evaluations were reused on other weights)."""
    shared = tmp_path / "shared_unet"
    shared.mkdir()
    (shared / "w.bin").write_bytes(b"weights v1")
    base = _tree(tmp_path / "base")
    (base / "linked_unet").symlink_to(shared, target_is_directory=True)
    before = tree_fingerprint(base)
    assert "linked_unet/w.bin" in folder_sha256(base)
    (shared / "w.bin").write_bytes(b"weights v2")
    assert tree_fingerprint(base) != before


def test_a_link_back_up_the_tree_is_walked_once_and_an_unreadable_folder_raises(tmp_path, monkeypatch):
    """A link to an ancestor (or two folders linking to each other) would make the walk endless: each real folder
    is entered once per path down (a folder linked from two places is walked under both). A folder that cannot be
    read is an error, not a silently smaller tree."""
    root = _tree(tmp_path / "root")
    (root / "unet" / "up").symlink_to(root, target_is_directory=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "back").symlink_to(root / "unet", target_is_directory=True)
    (root / "other").symlink_to(tmp_path / "other", target_is_directory=True)
    walked = sorted(os.path.relpath(d, root) for d, _, _ in walk_tree(root))
    assert walked == [".", "other", "other/back", "other/back/cfg", "unet", "unet/cfg"]  # a folder linked twice: both
    assert list(walk_tree(tmp_path / "absent")) == []
    scandir = os.scandir

    def refused(path):
        if os.fspath(path).endswith("cfg"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refused)  # what os.walk lists a folder with (chmod 0 does not stop root)
    with pytest.raises(PermissionError):
        tree_fingerprint(root)
