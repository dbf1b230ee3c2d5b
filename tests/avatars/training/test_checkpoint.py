"""Checkpoint folders: the marker's checksums, checked before a resume loads any file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from avatars.training import checkpoint
from common.io import DataError


class Engine:
    """DeepSpeed's part of a checkpoint: a weights file in the folder; loading records the tag."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def save_checkpoint(self, folder, tag, **kwargs):
        (Path(folder) / tag).mkdir(parents=True)
        (Path(folder) / tag / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 4)

    def load_checkpoint(self, folder, tag, **kwargs):
        self.loaded.append(tag)
        return folder, None


def _save(ckpt_dir: Path, step: int) -> Path:
    state = checkpoint.TrainerState(step=step)
    return checkpoint.save(Engine(), ckpt_dir, state, torch.Generator(), keep_last=2, average={"w": torch.ones(3)})


def test_the_marker_lists_every_file_with_its_sha256(tmp_path):
    folder = _save(tmp_path, 2)
    marker = json.loads((folder / checkpoint.MARKER).read_text())
    assert sorted(marker["sha256"]) == ["mp_rank_00_model_states.pt", "rank000_trainer_state.pt",
                                        "weight_average.pt"]
    engine = Engine()
    assert checkpoint.load_latest(engine, tmp_path, torch.Generator()).step == 2 and engine.loaded == [folder.name]


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "weight_average.pt"])
def test_a_flipped_byte_is_refused_before_anything_loads(tmp_path, name):
    """A flipped byte inside a tensor loads as another weight without any error: the checksum catches it."""
    _save(tmp_path, 2)
    file = _save(tmp_path, 4) / name
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    engine = Engine()
    with pytest.raises(DataError, match="sha256 differs.*remove the folder") as error:
        checkpoint.load_latest(engine, tmp_path, torch.Generator())
    assert error.value.path == file and engine.loaded == []


def test_a_checkpoint_written_before_checksums_resumes_with_a_warning(tmp_path):
    folder = _save(tmp_path, 2)
    (folder / checkpoint.MARKER).write_text(json.dumps({"step": 2}))  # what earlier versions wrote
    with pytest.warns(UserWarning, match="written before checkpoints recorded the sha256"):
        assert checkpoint.load_latest(Engine(), tmp_path, torch.Generator()).step == 2


def test_the_options_are_saved_with_the_checkpoint_and_checked_when_read(tmp_path):
    assert checkpoint.saved_options(tmp_path) is None  # no checkpoint yet
    state = checkpoint.TrainerState(step=2)
    folder = checkpoint.save(Engine(), tmp_path, state, torch.Generator(), keep_last=2, options={"seed": 3})
    assert "train_config.json" in json.loads((folder / checkpoint.MARKER).read_text())["sha256"]
    assert checkpoint.saved_options(tmp_path) == (folder / "train_config.json", {"seed": 3})
    (folder / "train_config.json").write_text(json.dumps({"seed": 4}))
    with pytest.raises(DataError, match="sha256 differs"):
        checkpoint.saved_options(tmp_path)
    (folder / "train_config.json").unlink()  # a checkpoint from before the options were saved: it recorded none
    assert checkpoint.saved_options(tmp_path) == (folder, {})


@pytest.mark.parametrize("marker", ['{"step": 2, "sha256": {"tr', '[2]', '{"step": 2, "sha256": [1]}'])
def test_a_damaged_marker_is_a_data_error_naming_it_when_the_options_are_read(tmp_path, marker):
    """launch_all reads the options of every person's newest checkpoint before any job starts: a marker cut off
    or of the wrong shape is that person's DataError (with what to do), not a traceback that ends the launch."""
    state = checkpoint.TrainerState(step=2)
    folder = checkpoint.save(Engine(), tmp_path, state, torch.Generator(), keep_last=2, options={"seed": 3})
    (folder / checkpoint.MARKER).write_text(marker)
    for read in (checkpoint.saved_options, lambda d: checkpoint.verify(folder)):
        with pytest.raises(DataError, match="complete.json") as e:
            read(tmp_path)
        assert "remove the folder" in str(e.value)
