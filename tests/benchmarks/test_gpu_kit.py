"""benchmarks/gpu_kit.sh: a step whose share of the device call's budget is gone is skipped, never run unlimited."""

from __future__ import annotations

import subprocess
from pathlib import Path

KIT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kit.sh"


def test_a_step_without_time_left_is_skipped_not_run_without_a_limit(tmp_path):
    """`first` gives its tests what the call's budget leaves (`CALL_BUDGET - SECONDS - 250`): after a slow install
    that was 0 or less, and `timeout 0` runs a command with no limit at all (a negative one fails at once)."""
    (tmp_path / "timeout").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/ran\n")
    (tmp_path / "timeout").chmod(0o755)
    functions = subprocess.run(["sed", "-n", "/^no_time_left()/,/^}/p;/^bench_for()/,/^}/p;/^tests_for()/,/^}/p",
                                str(KIT)], capture_output=True, text=True, check=True).stdout
    script = (f"{functions}\nout_dir() {{ echo {tmp_path}; }}\nnvidia-smi() {{ :; }}\n"
              "tests_for 0 x; tests_for -5 x; bench_for 3 --only render; tests_for 60 y\n")
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert run.stdout.count("[gpu_kit] skipped:") == 3, run.stdout + run.stderr
    assert (tmp_path / "ran").read_text().split("\n")[0].startswith("-k 10 60 python3 -m pytest")
    assert len((tmp_path / "ran").read_text().splitlines()) == 1
