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

from cluster.status import report_progress
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
) -> dict:
    """Run ``steps`` hash-chain steps for ``person``, resuming from ``work_dir``.

    ``hash_rounds``: SHA-256 rounds per step (CPU work). ``step_seconds``: minimum wall time
    per step (sleeps the remainder), for tests that need a run to last. ``crash_once``: the
    first run SIGKILLs its own process after one step (a killed worker).
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
                            "attempt": os.environ.get("DA_ATTEMPT"), "restarts": os.environ.get("DA_RESTARTS"),
                            "mark": os.environ.get("DA_TEST_MARK"),
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
    report_progress(start, steps)
    crash = crash_once and not (wdir / "crashed").exists()
    for s in range(start, steps):
        t0 = time.monotonic()
        digest = _step(digest, s, hash_rounds)
        rest = step_seconds - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)
        atomic_write_json(ckpt, {"step": s + 1, "digest": digest.hex()})
        report_progress(s + 1, steps)
        if crash:
            (wdir / "crashed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
    with open(wdir / "runs.jsonl", "a") as f:
        f.write(json.dumps({"event": "end", "pid": os.getpid(), "time": time.time()}) + "\n")
    return {"person": person, "steps": steps, "digest": digest.hex(), "resumed_from": start}


def report_from_child(person: str, *, step: int, total_steps: int) -> dict:
    """Reports progress from a child process (as a DeepSpeed launcher's worker would)."""
    code = f"from cluster.status import report_progress; assert report_progress({step}, {total_steps})"
    subprocess.run([sys.executable, "-c", code], check=True)
    return {"person": person}


def returns_list(person: str) -> list:
    """A broken target: returns a list instead of a dict."""
    return [person]


def read_runs(work_dir: Path, person: str, event: str = "start") -> list[dict]:
    """The ``event`` ("start" or "end") records of every run of ``person``."""
    path = Path(work_dir) / person / "runs.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]
