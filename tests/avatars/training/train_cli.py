"""The jobs/train_person.py command line the training tests run: person 000 of the tiny shards, no
validation renders, no LPIPS weights, one torch thread (bitwise-reproducible CPU math)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from avatars.training.rendezvous import environment_without_group

REPO = Path(__file__).resolve().parents[3]
TRAIN_PERSON = REPO / "jobs" / "train_person.py"


def train_person_args(shards: Path, out: Path, *options: str) -> list[str]:
    """The script and its arguments (callers put ``python`` or ``torchrun`` in front); ``options`` add
    flags or override these (the last of a repeated flag wins)."""
    return [str(TRAIN_PERSON), "--person", "000", "--shards", str(shards), "--out", str(out),
            "--validate-every", "0", "--val-samples", "1", "--val-inference-steps", "1",
            "--lpips-weights", str(out / "no-lpips"), *options]


def single_thread_env() -> dict[str, str]:
    """The environment of a training subprocess: outside any torchrun group, one OpenMP thread."""
    return {**environment_without_group(), "OMP_NUM_THREADS": "1"}


def run_side_by_side(commands: dict[str, list[str]], logs: Path, timeout: float = 900) -> None:
    """Runs every command at once in `single_thread_env` (one thread each: a second core works instead of idling)
    and fails naming the first that did not succeed, with its stderr (``logs/<name>.err``: a file, since a pipe
    nobody reads yet would block its writer). The others are killed when one fails."""
    procs = {}
    try:
        for name, cmd in commands.items():
            with open(logs / f"{name}.err", "w") as err:
                procs[name] = subprocess.Popen(cmd, env=single_thread_env(), stdout=subprocess.DEVNULL, stderr=err)
        for name, proc in procs.items():
            assert proc.wait(timeout=timeout) == 0, (name, (logs / f"{name}.err").read_text()[-3000:])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
