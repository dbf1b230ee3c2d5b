"""metrics.jsonl on resume: what a killed or finished run logged after its checkpoint is dropped, once."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from avatars.training.callbacks import MetricsLog, truncate_jsonl
from avatars.training.checkpoint import TrainerState
from common.io import DataError

RECORDS = [{"step": 1, "first_step_s": 0.1}, {"step": 4, "loss": 0.5}, {"step": 4, "latent_cache": {}},
           {"step": 4, "val_psnr": 9.0}]


def _write(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_line_cut_off_mid_write_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, RECORDS[:2], tail='{"step": 5, "loss": 0.35')  # a kill (or a full disk) mid-append
    with pytest.warns(UserWarning, match="cut off mid-write"):
        truncate_jsonl(path, after_step=4)
    assert _read(path) == RECORDS[:2]


def test_a_damaged_line_before_the_last_is_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, RECORDS[:1], tail='{"step": 2, "lo\n' + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl: line 2 is not a JSON object") as error:
        truncate_jsonl(path, after_step=4)
    assert error.value.path == path
    assert path.read_text().count("\n") == 3  # left as it was


def test_the_records_of_the_checkpoint_are_kept_and_the_end_of_run_lines_dropped(tmp_path):
    """A run resumed at its last checkpoint (its model/ lost) logs the end of run again: the lines it
    logged after that checkpoint go, though their step is the checkpoint's."""
    path = tmp_path / "metrics.jsonl"
    _write(path, RECORDS)
    truncate_jsonl(path, after_step=4, records=2)
    assert _read(path) == RECORDS[:2]
    _write(path, RECORDS)
    truncate_jsonl(path, after_step=1)  # a checkpoint that did not count its records: by step alone
    assert _read(path) == RECORDS[:1]


@pytest.mark.parametrize("steps, kept", [(4, RECORDS[:2]), (8, RECORDS)])
def test_a_run_ended_again_drops_its_end_of_run_lines_and_an_extended_one_keeps_them(tmp_path, steps, kept):
    """Resumed at its last checkpoint (step 4, two records counted): ended again with --steps 4 it logs the end
    of run again, so those lines go; extended to --steps 8 it does not validate step 4 again, so they stay, and
    the checkpoints it writes count them (a later resume at its own end keeps them)."""
    path = tmp_path / "metrics.jsonl"
    _write(path, RECORDS)
    trainer = SimpleNamespace(config=SimpleNamespace(resume="auto", steps=steps), state=TrainerState(step=4, records=2))
    MetricsLog(path).on_train_start(trainer)
    assert _read(path) == kept and trainer.state.records == len(kept)
