"""jobs/train_person.py, jobs/pretrain_base.py and jobs/make_synthetic.py on bad input: exit code 2 and one line
naming the file or the option, no traceback. The scripts run as ``__main__`` in this process (runpy), so the
model's import is paid once, not per case."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_shards(tiny_dataset) -> Path:
    """The shard root of the shared tiny data set (tests/conftest.py), read-only."""
    return tiny_dataset[2]


def _run(script: str, argv: list[str], monkeypatch, capsys) -> tuple[int | str | None, str]:
    """(exit code, stderr) of ``python jobs/<script> <argv>``."""
    monkeypatch.setattr(sys, "argv", [str(REPO / "jobs" / script), *map(str, argv)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "jobs" / script), run_name="__main__")
    return exit_.value.code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_train_person_refuses_missing_shards_and_base_with_one_line(tiny_shards, tmp_path, monkeypatch, capsys):
    """No shards of the person, or a --base-model that is no diffusers directory: exit code 2 and one line naming the
    file (checked before the model's import; was: a traceback ending in DataError / FileNotFoundError)."""
    code, err = _run("train_person.py", ["--person", "999", "--shards", tmp_path / "nonexistent"], monkeypatch, capsys)
    assert code == 2
    assert f"{tmp_path / 'nonexistent' / '999' / 'manifest.json'}: shard manifest is missing" in _one_line(err)
    for base in (tmp_path / "no-base", tmp_path):  # no folder; a folder without unet/config.json
        code, err = _run("train_person.py", ["--person", "000", "--shards", tiny_shards, "--out", tmp_path / "runs",
                                             "--base-model", base], monkeypatch, capsys)
        assert code == 2 and "--base-model" in _one_line(err) and str(base) in err
    assert not (tmp_path / "runs").exists()


def _shards_without(tiny_shards: Path, root: Path, split: str) -> Path:
    """A shard root with person 000 whose manifest lists no `split` shards."""
    shutil.copytree(tiny_shards / "000", root / "000")
    manifest = json.loads((root / "000" / "manifest.json").read_text())
    manifest["shards"] = {k: v for k, v in manifest["shards"].items() if v["split"] != split}
    (root / "000" / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_pretrain_base_refuses_missing_shards_with_one_line(tiny_shards, tmp_path, monkeypatch, capsys):
    """A shard root that does not exist, a person without shards, an empty --persons, and persons whose shards have
    no held-out sequences (ingested before --ingest.held-out-sequences 0 was refused) or no training camera: exit
    code 2 and one line naming the option or the folder (was: a FileNotFoundError / ValueError traceback)."""
    out = ["--output", tmp_path / "base"]
    cases = {
        ("--shard-root", tmp_path / "nonexistent"): f"error: {tmp_path / 'nonexistent'}: shard root does not exist "
                                                     "(--shard-root)",
        ("--shard-root", tiny_shards, "--persons", "000,005"): "error: --persons '000,005': "
                                                               f"{tiny_shards / '005' / 'manifest.json'} not found",
        ("--shard-root", tiny_shards, "--persons", ","): "error: --persons ',': ",
        ("--shard-root", tmp_path): "error: --shard-root: shard root",
        ("--shard-root", _shards_without(tiny_shards, tmp_path / "no-test-seq", "test_seq")):
            "no 'test_seq' shards for persons 000: they were ingested without held-out sequences "
            "(--ingest.held-out-sequences)",
        ("--shard-root", _shards_without(tiny_shards, tmp_path / "no-train", "train")):
            "no 'train' shards for persons 000: every camera of the persons is the held-out camera "
            "(--ingest.held-out-camera)",
    }
    for argv, message in cases.items():
        code, err = _run("pretrain_base.py", [*argv, *out], monkeypatch, capsys)
        assert code == 2 and message in _one_line(err), (argv, err)
    assert not (tmp_path / "base").exists()


def test_make_synthetic_refuses_bad_options_and_an_unwritable_out(tmp_path, monkeypatch, capsys):
    """--synthetic.fit-noise -1 and --synthetic.n-lat 1 are refused when the command line is parsed (exit code 2,
    naming the field; were a ValueError / IndexError traceback from a worker); an --out under a file is one line."""
    small = ["--synthetic.persons", "1", "--synthetic.sequences", "1", "--synthetic.frames", "1",
             "--synthetic.cameras", "2", "--synthetic.image-size", "8", "--synthetic.n-lat", "4",
             "--synthetic.n-lon", "4", "--workers", "1"]
    for flag, value, field in (("--synthetic.fit-noise", "-1", "fit_noise"), ("--synthetic.n-lat", "1", "n_lat")):
        code, err = _run("make_synthetic.py", ["--out", tmp_path / "captures", *small, flag, value], monkeypatch,
                         capsys)
        assert code == 2 and f"{field} must be" in err and "Traceback" not in err, err
    assert not (tmp_path / "captures").exists()
    (tmp_path / "file").write_text("")
    code, err = _run("make_synthetic.py", ["--out", tmp_path / "file" / "captures", *small], monkeypatch, capsys)
    *progress, line = err.strip().splitlines()  # the progress bar, then the error
    assert code == 2 and str(tmp_path / "file") in _one_line(line) and "Traceback" not in err, err


def test_train_person_that_diverges_says_so_in_one_line_with_exit_code_1(tiny_shards, tmp_path, monkeypatch, capsys):
    """A learning rate that makes the loss NaN: a failed run, one line with the step and what to try (was: a
    traceback, after NaN checkpoints and a NaN model had been saved)."""
    code, err = _run("train_person.py", ["--person", "000", "--shards", tiny_shards, "--out", tmp_path / "runs",
                                         "--lr-networks", "1e12", "--lr-features", "1e12", "--steps", "4",
                                         "--checkpoint-every", "2", "--log-every", "100", "--batch-size", "2",
                                         "--num-workers", "0", "--validate-every", "0", "--latent-cache-mib", "0",
                                         "--lpips-weights", tmp_path / "none"], monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # beside the progress bar
    assert code == 1 and "TrainingDiverged" not in err and len(errors) == 1, err  # not a traceback of it
    assert "training diverged at step" in errors[0] and "--lr-networks" in errors[0], errors
    assert not (tmp_path / "runs" / "000" / "model").exists()


def _finished_run(root: Path) -> Path:
    """A stand-in for a trained avatar of person 000 under ``root``: what ``--resume never`` clears."""
    run = root / "000"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "result.json").write_text('{"person": "000"}')
    return run


def test_paper_without_base_model_is_refused_before_resume_never_clears_the_run(tiny_shards, tmp_path, monkeypatch,
                                                                                  capsys):
    """``train_person.py paper --resume never`` with --base-model forgotten: exit code 2 and one line naming
    --base-model, and the person's earlier avatar is still there (was: the trainer's set-up deleted result.json and
    model/, then the model refused the missing base with a traceback)."""
    run = _finished_run(tmp_path / "runs")
    code, err = _run("train_person.py", ["paper", "--person", "000", "--shards", tiny_shards, "--out",
                                         tmp_path / "runs", "--resume", "never"], monkeypatch, capsys)
    assert code == 2 and "--base-model is required" in _one_line(err)
    assert (run / "result.json").is_file() and (run / "model" / "config.json").is_file()


def test_run_refuses_random_base_with_a_base_model_before_resume_never_clears_the_run(tiny_shards, tmp_path):
    """The cluster entry point (``run``, what an sbatch job's --kwargs-json reaches) with random_base and a
    base_model, or a paper preset without base_model: refused before the trainer, the earlier avatar kept (was:
    refused only in the set-up, after --resume never had cleared it)."""
    from jobs import train_person as train_job

    run = _finished_run(tmp_path / "runs")
    base = tmp_path / "base"
    base.mkdir()
    common = {"shards": str(tiny_shards), "out": str(tmp_path / "runs")}
    with pytest.raises(ValueError, match="random_base"):
        train_job.run("000", {"resume": "never", "base_model": str(base)}, random_base=True, **common)
    assert (run / "result.json").is_file() and (run / "model" / "config.json").is_file()
    with pytest.raises(ValueError, match="--base-model is required"):
        train_job.run("000", {"resume": "never"}, preset="paper", **common)
    assert (run / "result.json").is_file() and (run / "model" / "config.json").is_file()
