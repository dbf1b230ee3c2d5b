"""--workers of ingest, preprocess and make_synthetic: below 1 is refused when the command line is parsed (it was
taken as 1 without a word), as launch_all refuses it."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from jobs import _parallel

ROOT = Path(__file__).resolve().parents[2]
#: each command with options that keep its work small (what the old code ran, taking the flag as 1)
SMALL = ["--synthetic.persons", "1", "--synthetic.sequences", "1", "--synthetic.frames", "1", "--synthetic.cameras",
         "2", "--synthetic.image-size", "8", "--synthetic.n-lat", "4", "--synthetic.n-lon", "4"]
COMMANDS = {"ingest": [], "preprocess": [], "make_synthetic": SMALL}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("workers", ["0", "-2"])
def test_the_commands_refuse_workers_below_1_before_any_work(command, workers, tmp_path, monkeypatch, capsys):
    script = ROOT / "jobs" / f"{command}.py"
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [str(script), "--out", str(out), *COMMANDS[command], "--workers", workers])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    said = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert exit_.value.code == 2 and f"--workers must be at least 1, got {workers}" in said, said
    assert not out.exists()


def test_the_pool_refuses_them_too():
    with pytest.raises(ValueError, match="--workers must be at least 1, got 0"):
        _parallel.map_persons_tolerant(str.upper, ["a"], workers=0, desc="test")
    assert _parallel.map_persons_tolerant(str.upper, ["a"], workers=1, desc="test") == ({"a": "A"}, {})
