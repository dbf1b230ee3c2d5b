"""What the main job prints: one progress display, worker output in files, a short summary.

The per-person workers (training processes, Ray workers) write everything they print
(DeepSpeed and torch notices, progress bars, tracebacks) into ``<workdir>/logs/<person>.log``
(:func:`output_to`); the launching terminal shows the stages, one progress line for all
persons (:class:`TrainingProgress`, from the status files the jobs write) and the final
summary (:func:`final_summary`). ``launch_all --verbose`` lets the workers print as before.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cluster.status import PersonStatus, check_running, format_duration, read_status


@contextlib.contextmanager
def output_to(path: Path | str) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ and child
    processes too) to the end of ``path`` while the block runs; restored afterwards (a Ray
    worker runs other tasks next)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", buffering=1) as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} ====\n")
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def progress_line(statuses: list[PersonStatus], persons: list[str], since: float, now: float | None = None) -> str:
    """One line for every person of this run: done / running / queued / lost / stale / failed, steps and ETA.

    A status file not written since this stage started (``since``) belongs to an earlier run
    and counts as queued. A running or queued person whose process is gone is counted ``lost`` (one that
    cannot be checked and is silent for an hour ``stale``), as jobs/status.py shows it (``check_running``)."""
    now = time.time() if now is None else now
    by_person = {s.person: s for s in check_running([s for s in statuses if (s.updated_at or 0) >= since], now=now)}
    counts = {"done": 0, "running": 0, "queued": 0, "lost": 0, "stale": 0, "failed": 0}
    done_steps: dict[str, int] = {}
    totals: list[int] = []
    rate = 0.0
    for p in persons:
        s = by_person.get(p)
        key = {"succeeded": "done", "running": "running", "lost": "lost", "stale": "stale",
               "failed": "failed"}.get(s.state if s else "", "queued")
        counts[key] += 1
        if s is not None and s.total_steps and key != "failed":
            totals.append(s.total_steps)
            done_steps[p] = s.total_steps if key == "done" else min(s.step or 0, s.total_steps)
            rate += (s.steps_per_s or 0.0) if key == "running" else 0.0
    noun = "person" if len(persons) == 1 else "persons"
    text = f"training {len(persons)} {noun}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    if totals:
        # A person not started yet has as many steps as the average one that has.
        per_person = sum(totals) / len(totals)
        todo = len(persons) - counts["failed"]
        total = sum(totals) + per_person * (todo - len(totals))
        steps = sum(done_steps.values())
        text += f"; steps {steps}/{total:.0f}"
        if rate > 0 and total > steps:
            text += f", ETA {format_duration((total - steps) / rate)}"
    return text


def _terminal():
    """A stream on the terminal the run started on: a duplicate of file descriptor 1, so the
    progress line stays there while :func:`output_to` sends a local-backend worker's output
    (the same process) to its log file."""
    try:
        return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):  # no real descriptor (captured output)
        return sys.stdout


class TrainingProgress:
    """Prints :func:`progress_line` while the training stage runs: rewritten in place on a
    terminal, a new line every ``interval_s`` otherwise (logs, CI)."""

    def __init__(self, status_dir: Path, persons: list[str], interval_s: float | None = None, stream=None):
        self.status_dir, self.persons = Path(status_dir), list(persons)
        self._owned = stream is None
        self.stream = stream or _terminal()
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if interval_s is not None else (1.0 if self.tty else 30.0)
        self.since = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="training-progress", daemon=True)
        self._last = ""
        #: The last error of the display, if any (it is not raised).
        self.error: Exception | None = None

    def _show(self, final: bool = False) -> None:
        line = progress_line(read_status(self.status_dir, self.persons), self.persons, self.since)
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        elif final or line != self._last:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last = line

    def _show_safely(self, final: bool = False) -> None:
        """The display is a courtesy: an error in it (a status file it cannot use, a closed terminal)
        skips this refresh (kept in ``error``) and never reaches the training it shows."""
        try:
            self._show(final)
        except Exception as e:
            self.error = e

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._show_safely()

    def __enter__(self) -> "TrainingProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._show_safely(final=True)
        if self._owned and self.stream is not sys.stdout:
            with contextlib.suppress(OSError):
                self.stream.close()


def final_summary(results, evaluation, logs_dir: Path | None) -> str:
    """Per person: training and evaluation verdict and headline numbers; the averages; where the
    report is and how to open it; where the worker logs are."""
    from cluster.report import RunResults

    night = RunResults.load(evaluation.results_path) if evaluation is not None else None
    lines = ["", "summary:"]
    numbers: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": []}
    for r in results:
        if not r.ok:
            first = (r.error or "").strip().splitlines()
            lines.append(f"  {r.person}  training FAILED: {first[0] if first else 'unknown error'}")
            continue
        text = f"  {r.person}  trained ({(r.result or {}).get('steps', '?')} steps)"
        if evaluation is not None and r.person in evaluation.failed:
            text += f", evaluation FAILED: {evaluation.failed[r.person]}"
        elif night is not None and r.person in night.persons:
            task = night.persons[r.person].get("self_reenactment")
            metrics = task.metrics if task is not None else {}
            shown = [f"{k.upper()} {metrics[k]:.{2 if k == 'psnr' else 3}f}" for k in numbers
                     if metrics.get(k) is not None]
            for k in numbers:
                if metrics.get(k) is not None:
                    numbers[k].append(metrics[k])
            reused = " (up to date, not rendered again)" if r.person in evaluation.reused else ""
            text += ", held-out " + " / ".join(shown) + reused if shown else ", evaluated" + reused
        lines.append(text)
    if any(numbers.values()):
        lines.append("  mean self-reenactment: " + " / ".join(
            f"{k.upper()} {sum(v) / len(v):.{2 if k == 'psnr' else 3}f}" for k, v in numbers.items() if v))
    if evaluation is not None and evaluation.report_index is not None:
        index = Path(evaluation.report_index).resolve()
        lines.append(f"report: {index}")
        lines.append(f"  open it: xdg-open {index}  (or: python -m http.server -b 127.0.0.1 -d {index.parent}, "
                     "then http://127.0.0.1:8000/)")
    if logs_dir is not None:
        lines.append(f"worker logs: {Path(logs_dir).resolve()}/<person>.log  (--verbose prints them here)")
    return "\n".join(lines)
