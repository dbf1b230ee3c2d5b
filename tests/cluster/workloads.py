"""Test workload for the orchestration tests and the launch benchmark (NOT training).

``count_steps`` behaves like a resumable trainer without any model: each step extends a
SHA-256 hash chain (real, deterministic CPU work), writes a checkpoint after the step,
reports progress, and on start resumes from the checkpoint. Because the chain is
deterministic, ``expected_digest`` proves that a resumed run produced exactly what an
uninterrupted run would have, and ``runs.jsonl`` records where every run started.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.status import StatusReporter
from common.io import atomic_write_json


def write_input(data_dir: Path, person: str, corrupt: bool = False) -> Path:
    """A person's input file; a corrupt one is not valid JSON."""
    path = Path(data_dir) / f"{person}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{corrupt" if corrupt else json.dumps({"person": person, "seed": person}))
    return path


def _step(digest: bytes, step: int, hash_rounds: int) -> bytes:
    for _ in range(hash_rounds):
        digest = hashlib.sha256(digest + step.to_bytes(8, "little")).digest()
    return digest


def expected_digest(person: str, steps: int, hash_rounds: int = 1) -> str:
    d = hashlib.sha256(person.encode()).digest()
    for s in range(steps):
        d = _step(d, s, hash_rounds)
    return d.hex()


def count_steps(
    person: str,
    *,
    data_dir: str,
    work_dir: str,
    steps: int = 5,
    hash_rounds: int = 1,
    step_seconds: float = 0.0,
    crash_once: bool = False,
    status: StatusReporter | None = None,
) -> dict:
    """Run ``steps`` hash-chain steps for ``person``, resuming from ``work_dir``.

    ``hash_rounds``: SHA-256 rounds per step (CPU work). ``step_seconds``: minimum wall time
    per step (sleeps the remainder), for tests that need a run to last. ``crash_once``: the
    first run SIGKILLs its own process after one step (a killed worker). ``status``: the attempt's
    status reporter (``run_attempt`` passes it), which gets every step.
    Raises ValueError when the person's input file is corrupt or missing.
    """
    inp = Path(data_dir) / f"{person}.json"
    try:
        meta = json.loads(inp.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{inp}: corrupt or missing input ({e})") from e
    if meta.get("person") != person:
        raise ValueError(f"{inp}: input belongs to {meta.get('person')!r}, not {person!r}")

    wdir = Path(work_dir) / person
    wdir.mkdir(parents=True, exist_ok=True)
    ckpt = wdir / "ckpt.json"
    if ckpt.exists():
        state = json.loads(ckpt.read_text())
        start, digest = state["step"], bytes.fromhex(state["digest"])
    else:
        start, digest = 0, hashlib.sha256(person.encode()).digest()
    with open(wdir / "runs.jsonl", "a") as f:
        f.write(json.dumps({"event": "start", "start_step": start, "pid": os.getpid(), "time": time.time(),
                            "attempt": status and status.attempt, "restarts": status and status.restarts,
                            "mark": os.environ.get("DA_TEST_MARK"),
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
    if status is not None:
        status.progress(start, steps)
    crash = crash_once and not (wdir / "crashed").exists()
    for s in range(start, steps):
        t0 = time.monotonic()
        digest = _step(digest, s, hash_rounds)
        rest = step_seconds - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)
        atomic_write_json(ckpt, {"step": s + 1, "digest": digest.hex()})
        if status is not None:
            status.progress(s + 1, steps)
        if crash:
            (wdir / "crashed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
    with open(wdir / "runs.jsonl", "a") as f:
        f.write(json.dumps({"event": "end", "pid": os.getpid(), "time": time.time()}) + "\n")
    return {"person": person, "steps": steps, "digest": digest.hex(), "resumed_from": start}


def report_from_child(person: str, *, step: int, total_steps: int, status: StatusReporter) -> dict:
    """Reports progress from a child process (as a launcher's worker would): the child learns its
    status file from its arguments, not from its environment."""
    code = ("import sys; from cluster.status import StatusReporter; "
            "d, p, a, r, step, total = sys.argv[1:]; "
            "assert StatusReporter(d, p, int(a), int(r)).progress(int(step), int(total))")
    subprocess.run([sys.executable, "-c", code, str(status.status_dir), status.person, str(status.attempt),
                    str(status.restarts), str(step), str(total_steps)], check=True)
    return {"person": person}


def echo_status(person: str, status: StatusReporter | None = None) -> dict:
    """Returns where the reporter ``run_attempt`` handed over writes (None: no reporter)."""
    if status is None:
        return {"status": None}
    return {"status": [str(status.status_dir), status.person, status.attempt, status.restarts]}


def returns_list(person: str) -> list:
    """A broken target: returns a list instead of a dict."""
    return [person]


def read_runs(work_dir: Path, person: str, event: str = "start") -> list[dict]:
    """The ``event`` ("start" or "end") records of every run of ``person``."""
    path = Path(work_dir) / person / "runs.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]
