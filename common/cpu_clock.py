"""Wall and CPU time of a process *and every process it starts*, per named stage.

The main job's work happens in worker processes (data preparation pools, Ray's raylet and
workers, Serve replicas), which ``resource.getrusage`` does not see while they run and never
sees at all when they are not direct children. On a shared machine wall-clock time says little,
so a stage's cost is its CPU time: :class:`ProcessTreeClock` samples the CPU times (user + system)
of this process and all its descendants every ``interval`` seconds in a background thread and
keeps the last value seen of every process (keyed by pid and start time, so a reused pid is a new
process). A process that lives shorter than one interval is missed, and the last interval of a
process that exits is lost (at most ``interval`` CPU-seconds per process).

    clock = ProcessTreeClock()
    with clock.stage("data"):
        ...
    clock.rows()  # [{"stage": "data", "wall_s": ..., "cpu_s": ...}, ...]
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import psutil


class ProcessTreeClock:
    """CPU seconds of a process tree (see module docstring); a daemon sampler thread."""

    def __init__(self, pid: int | None = None, interval: float = 0.5):
        self._root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self._seen: dict[tuple[int, float], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stages: list[dict] = []
        self.sample()
        self._thread = threading.Thread(target=self._run, name="cpu-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> float:
        """Samples the tree now; returns the CPU seconds of every process seen so far."""
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            procs = []
        values = {}
        for proc in procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
                values[key] = times.user + times.system
            except psutil.Error:  # exited between listing and reading
                continue
        with self._lock:
            for key, cpu in values.items():
                self._seen[key] = max(cpu, self._seen.get(key, 0.0))
            return sum(self._seen.values())

    def cpu_seconds(self) -> float:
        return self.sample()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Records the wall and CPU seconds spent inside the block under ``name``."""
        wall, cpu = time.time(), self.cpu_seconds()
        try:
            yield
        finally:
            self._stages.append({"stage": name, "wall_s": time.time() - wall, "cpu_s": self.cpu_seconds() - cpu})

    def rows(self) -> list[dict]:
        """One dict per finished stage, in order, plus a "total" row over them."""
        rows = [dict(r) for r in self._stages]
        if rows:
            rows.append({"stage": "total", "wall_s": sum(r["wall_s"] for r in rows),
                         "cpu_s": sum(r["cpu_s"] for r in rows)})
        return rows

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def format_stage_table(rows: list[dict]) -> str:
    """A small text table of :meth:`ProcessTreeClock.rows`."""
    width = max([len("stage")] + [len(r["stage"]) for r in rows])
    lines = [f"{'stage'.ljust(width)}  {'wall':>8}  {'CPU':>8}"]
    for r in rows:
        lines.append(f"{r['stage'].ljust(width)}  {r['wall_s']:7.1f}s  {r['cpu_s']:7.1f}s")
    return "\n".join(lines)
