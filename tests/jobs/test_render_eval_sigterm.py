"""render_eval stopped by SIGTERM (a SLURM time limit or scancel: SLURM sends SIGTERM, then SIGKILL after its
KillWait): the persons finished by then are saved in the night's results.json before the process waits for anything,
and it exits 143. Before, Python's default ended the process at once and everything since the last periodic save
(up to a minute, or the whole night before the first) was lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

_NIGHT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from cluster.eval_driver import EvalDriverConfig, driver
    from cluster.eval_driver.person import EvalRun
    from cluster.eval_driver.tasks import Clip, TaskFrames
    from cluster.report import TaskResult
    from cluster.serve import deployment
    from cluster.serve.renderer import RenderResult
    import jobs.render_eval as render_eval

    tmp = Path(sys.argv[1])
    zero = lambda c: np.zeros((c, 4, 4), np.float32)
    CONDITIONING = {"mask": zero(1), "depth": zero(1), "normals": zero(3), "canonical": zero(5),
                    "expression": np.zeros(2, np.float32)}

    class Response:
        def __init__(self, value):
            self.value = value
        def result(self, timeout_s=None):
            return self.value
        def cancel(self):
            pass

    class Handle:
        def __init__(self):
            self.info = self
        def options(self, multiplexed_model_id):
            return self
        def remote(self, request=None):
            if request is None:
                return Response({"resolution": 4})
            return Response(RenderResult(np.zeros((4, 4, 3), np.float32), request.key, 1, 0.0))

    def evaluate(self, frames, rendered):
        n = sum(len(images) for _, images in rendered)
        if frames.person == "slow":  # still being scored when the job is stopped
            (tmp / "slow-started").touch()
            while not (tmp / "release").exists():
                time.sleep(0.05)
        return TaskResult({"psnr": 1.0}, frames=n)

    finished = driver._Night.finished
    def marked(self, person):
        finished(self, person)
        (tmp / f"{person}-finished").touch()

    for p in ("fast", "slow"):
        (tmp / "runs" / p / "model").mkdir(parents=True)
        (tmp / "runs" / p / "model" / "config.json").write_text("{}")
    driver._base_problem = lambda *a: None
    driver.evaluation_key = lambda *a, **kw: "a" * 64
    driver.connect_ray = lambda *a, **kw: True
    driver.leave_ray = lambda *a: None
    deployment.deploy_renderer = lambda *a, **kw: Handle()
    driver._Night.finished = marked
    EvalRun.task_frames = lambda self, person, task, drv, resolution: TaskFrames(
        person, task, [Clip("s", ["k0"], [CONDITIONING], None, None)], True)
    EvalRun.evaluate = evaluate
    config = EvalDriverConfig(runs=tmp / "runs", shards=tmp, stores=tmp, reports_root=tmp / "reports",
                              persons=("fast", "slow"), tasks=("self_reenactment",), metrics=("psnr",),
                              run_date="2025-03-01", build_report=False)
    sys.exit(render_eval.main(config))
    """)


def _wait_for(path: Path, proc: subprocess.Popen, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_sigterm_saves_the_finished_persons_before_it_exits(tmp_path):
    script = tmp_path / "night.py"
    script.write_text(_NIGHT)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=repo, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        _wait_for(tmp_path / "fast-finished", proc)
        _wait_for(tmp_path / "slow-started", proc)
        results = tmp_path / "reports" / "runs" / "2025-03-01" / "results.json"
        assert not results.exists()  # no periodic save yet (at most one a minute)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30  # saved while "slow" is still being scored: not after it
        while not results.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert results.exists(), proc.communicate(timeout=10)[1][-3000:] if proc.poll() is not None else "not saved"
        night = json.loads(results.read_text())
        assert list(night["persons"]) == ["fast"] and night["persons"]["fast"]["self_reenactment"]["frames"] == 1
    finally:
        (tmp_path / "release").touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM; the persons finished by then are saved" in err
