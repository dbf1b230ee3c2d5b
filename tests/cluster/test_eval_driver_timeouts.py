"""The evaluation driver against a renderer that does not answer or loses its replica: a person whose model load or
frames never come back fails alone after --frame-timeout-s (its frames cancelled, the night saved), and the frames
lost with a replica that died are sent again once, so the persons that only shared the replica finish. Stand-in
renderer handles, no Ray."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from ray.exceptions import ActorDiedError

from cluster.eval_driver import EvalDriverConfig, run_evaluation
from cluster.eval_driver.person import EvalRun
from cluster.eval_driver.tasks import Clip, TaskFrames
from cluster.report import RunResults, TaskResult
from cluster.serve.renderer import RenderResult

CONDITIONING = {k: np.zeros(s, np.float32) for k, s in (("mask", (1, 4, 4)), ("depth", (1, 4, 4)),
                                                        ("normals", (3, 4, 4)), ("canonical", (5, 4, 4)),
                                                        ("expression", (2,)))}


def _frame(request) -> RenderResult:
    return RenderResult(np.zeros((4, 4, 3), np.float32), request.key, 1, 0.0)


class _Handle:
    """A renderer application's handle as `EvalRun` uses it (``options(multiplexed_model_id=...)``, ``info.remote()``,
    ``remote(request)``); `respond(person, request)` makes the response (request None: the info call)."""

    def __init__(self, respond, person=None):
        self.respond, self.person, self.info = respond, person, self

    def options(self, multiplexed_model_id):
        return _Handle(self.respond, multiplexed_model_id)

    def remote(self, request=None):
        return self.respond(self.person, request)


class _Response:
    """Ray's DeploymentResponse: ``result(timeout_s=...)`` raises TimeoutError when nothing came back in time."""

    def __init__(self, value=None, never=None):
        self.value, self.never, self.cancelled = value, never, False

    def result(self, timeout_s=None):
        if self.never is not None and not self.never.wait(timeout_s):  # set when the test ends
            raise TimeoutError("Timed out resolving to ObjectRef.")
        return self.value

    def cancel(self):
        self.cancelled = True


def _night(tmp_path, monkeypatch, persons, handle, **options):
    """run_evaluation of `persons` on `handle` (None: on the renderer the driver deploys on its embedded Ray): one
    self-reenactment task of 2 frames each, scored as PSNR 1.0; results.json in tmp_path/reports."""
    from cluster.eval_driver import driver
    from cluster.serve import deployment

    for p in persons:
        (tmp_path / "runs" / p / "model").mkdir(parents=True)
        (tmp_path / "runs" / p / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(driver, "_base_problem", lambda *a: None)
    monkeypatch.setattr(driver, "evaluation_key", lambda *a: "a" * 64)
    if handle is not None:
        monkeypatch.setattr(driver, "connect_ray", lambda *a, **kw: True)
        monkeypatch.setattr(driver, "leave_ray", lambda *a: None)
        monkeypatch.setattr(deployment, "deploy_renderer", lambda *a, **kw: handle)
    monkeypatch.setattr(EvalRun, "task_frames", lambda self, person, task, drv, resolution: TaskFrames(
        person, task, [Clip("s", ["k0", "k1"], [CONDITIONING] * 2, None, None)], True))
    monkeypatch.setattr(EvalRun, "evaluate", lambda self, frames, rendered: TaskResult(
        {"psnr": 1.0}, frames=sum(len(images) for _, images in rendered)))
    config = EvalDriverConfig(runs=tmp_path / "runs", shards=tmp_path, stores=tmp_path,
                              reports_root=tmp_path / "reports", persons=tuple(persons), tasks=("self_reenactment",),
                              metrics=("psnr",), run_date="2025-03-01", build_report=False, **options)
    return run_evaluation(config)


def _outcome_order(monkeypatch) -> list[tuple[str, float]]:
    """(person, seconds since the persons started) of each outcome evaluate_persons yields, in the order yielded."""
    from cluster.eval_driver import driver

    order, real = [], driver.evaluate_persons

    def recorded(*args):
        t0 = time.time()
        for outcome in real(*args):
            order.append((outcome[0], time.time() - t0))
            yield outcome

    monkeypatch.setattr(driver, "evaluate_persons", recorded)
    return order


@pytest.mark.timeout(120)
def test_a_person_whose_model_load_or_frames_never_come_back_fails_alone_and_the_night_is_saved(tmp_path,
                                                                                              monkeypatch):
    """Person "slow"'s frames never come back (a hung replica), "stuck"'s model load never does (its model on a dead
    file system): each fails alone after --frame-timeout-s with an error naming it and the limit, slow's frames are
    cancelled, a, b and c finish (their outcomes not held up behind slow's) and results.json is written. Before,
    the driver waited for ever and no results.json was written."""
    never = threading.Event()
    sent: dict[str, list[_Response]] = {}

    def respond(person, request):
        if request is None:
            return _Response({"resolution": 4}, never=never if person == "stuck" else None)
        response = _Response(_frame(request), never=never if person == "slow" else None)
        sent.setdefault(person, []).append(response)
        return response

    persons = ["a", "slow", "b", "c", "stuck"]
    order = _outcome_order(monkeypatch)
    done = {}
    night = threading.Thread(target=lambda: done.setdefault("summary", _night(
        tmp_path, monkeypatch, persons, _Handle(respond), parallel_persons=2, frame_timeout_s=2)), daemon=True)
    t0 = time.time()
    night.start()
    try:
        night.join(60)
        assert not night.is_alive(), f"the evaluation still waits after 60 s; outcomes so far: {order}"
    finally:
        never.set()  # the stand-in's hung calls return: no thread is left waiting
        night.join(30)
    summary = done["summary"]
    assert time.time() - t0 < 30
    assert sorted(summary.failed) == ["slow", "stuck"]
    assert summary.failed["slow"].startswith("FrameTimeout: slow: frame k0 did not come back within "
                                             "--frame-timeout-s 2 s"), summary.failed
    assert summary.failed["stuck"].startswith("FrameTimeout: stuck: its model load did not come back within "
                                              "--frame-timeout-s 2 s"), summary.failed
    assert summary.failed["slow"].endswith("its frames were cancelled, the other persons render on")
    assert summary.failed["stuck"].endswith("none of its frames was sent, the other persons render on")
    assert len(sent["slow"]) == 2 and all(r.cancelled for r in sent["slow"])  # no replica renders them for nobody
    assert "stuck" not in sent
    results = RunResults.load(summary.results_path)
    assert {p: results.persons[p]["self_reenactment"].frames for p in "abc"} == {"a": 2, "b": 2, "c": 2}
    for p in ("slow", "stuck"):
        assert "--frame-timeout-s 2 s" in results.persons[p]["self_reenactment"].skipped["task"]
    assert "slow" in results.meta["failed_persons"] and "stuck" in results.meta["failed_persons"]
    # a, b and c finished while slow's first frame was still awaited: their outcomes came first
    assert sorted(p for p, _ in order[:3]) == ["a", "b", "c"] and max(t for _, t in order[:3]) < 1.5, order


def test_frame_timeout_is_render_evals_option_and_must_be_a_positive_number_of_seconds(tmp_path, capsys):
    """`render_eval --frame-timeout-s` (tyro over EvalDriverConfig): 0, negative, NaN or infinite are refused when
    parsed (exit code 2, naming the flag); the default leaves a first frame minutes for its model's load and compile
    warm-up on GPU."""
    import tyro

    paths = ["--runs", str(tmp_path), "--shards", str(tmp_path), "--stores", str(tmp_path), "--reports-root",
             str(tmp_path), "--metrics", "psnr"]
    assert tyro.cli(EvalDriverConfig, args=[*paths, "--frame-timeout-s", "30"]).frame_timeout_s == 30
    assert tyro.cli(EvalDriverConfig, args=paths).frame_timeout_s >= 1800
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit) as exit_:
            tyro.cli(EvalDriverConfig, args=[*paths, "--frame-timeout-s", bad])
        said = "".join(capsys.readouterr().err.replace("│", "").split())
        assert exit_.value.code == 2 and "--frame-timeout-smustbeanumberofseconds>0" in said, said


class _Replica:
    """One renderer replica shared by every person: a frame of "crash" kills it (os._exit in a native library,
    out of memory) once another person's frames are in flight on it (up to `wait_s` for them), and every frame
    then in flight on it fails with ActorDiedError, as Ray reports it; Serve starts a new one. Other frames render
    in 0.3 s, or until the replica dies."""

    def __init__(self):
        self.lock = threading.Lock()
        self.in_flight: set[_ReplicaResponse] = set()
        self.deaths = 0
        self.sent: dict[str, list[_ReplicaResponse]] = {}

    def respond(self, person, request):
        if request is None:
            return _Response({"resolution": 4})
        response = _ReplicaResponse(self, person, request)
        with self.lock:
            self.in_flight.add(response)
            self.sent.setdefault(person, []).append(response)
        return response

    def others_in_flight(self, wait_s: float) -> None:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            with self.lock:
                if any(r.person != "crash" for r in self.in_flight):
                    return
            time.sleep(0.01)

    def die(self) -> None:
        with self.lock:
            for r in self.in_flight:
                r.error = ActorDiedError()
                r.died.set()
            self.in_flight.clear()
            self.deaths += 1


class _ReplicaResponse(_Response):
    def __init__(self, replica, person, request):
        super().__init__(_frame(request))
        self.replica, self.person, self.error, self.died = replica, person, None, threading.Event()

    def result(self, timeout_s=None):
        if self.error is not None:  # died with its replica
            raise self.error
        if self.person == "crash":
            self.replica.others_in_flight(10 if self.replica.deaths == 0 else 1)
            self.replica.die()
        else:
            self.died.wait(10 if self.replica.deaths == 0 else 0.3)  # the first ones render until the crash
        with self.replica.lock:
            self.replica.in_flight.discard(self)
        if self.error is not None:
            raise self.error
        return self.value


@pytest.mark.timeout(120)
def test_frames_lost_with_a_replica_that_died_are_sent_again_and_the_person_that_kills_it_fails(tmp_path,
                                                                                               monkeypatch):
    """"crash"'s frames kill the replica "fast"'s frames render on: fast's frames are sent again (one person's at a
    time, so crash's second attempt cannot take them down too) and fast finishes; crash's frames are sent again
    once and kill the replica again: crash fails with the error, results.json is written. Before, both failed with
    ActorDiedError (bystanders too, with --parallel-persons > 1)."""
    replica = _Replica()
    summary = _night(tmp_path, monkeypatch, ["crash", "fast"], _Handle(replica.respond), parallel_persons=2)
    assert list(summary.failed) == ["crash"], summary.failed
    assert summary.failed["crash"].startswith("ReplicaLost: crash: its frames were lost with a renderer replica that "
                                              "died, also when sent again (1 more time(s), 2 frames"), summary.failed
    assert summary.failed["crash"].endswith("ActorDiedError: The actor died unexpectedly before finishing this task.")
    assert {p: len(sent) for p, sent in replica.sent.items()} == {"crash": 4, "fast": 4}  # sent again once, no more
    assert replica.deaths == 2
    # when the first frame was lost, the second (which would have gone to the next replica) was cancelled
    assert [[r.cancelled for r in sent[:2]] for sent in replica.sent.values()] == [[False, True]] * 2
    results = RunResults.load(summary.results_path)
    assert results.persons["fast"]["self_reenactment"].frames == 2
    assert results.persons["crash"]["self_reenactment"].failed


def test_a_model_load_lost_with_its_replica_is_sent_again_once(tmp_path):
    """The replica dies while it loads a person's model (the info call): loaded again on the new one; a load that
    kills it every time fails the person with the error after the second try."""
    config = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                              tasks=("self_reenactment",), metrics=("psnr",))
    run = EvalRun(config, tmp_path)
    run.task_frames = lambda person, task, drv, resolution: TaskFrames(
        person, task, [Clip("s", ["k0"], [CONDITIONING], None, None)], True)
    run.evaluate = lambda frames, rendered: TaskResult({"psnr": 1.0}, frames=sum(len(i) for _, i in rendered))
    loads: dict[str, int] = {}

    class Died(_Response):
        def result(self, timeout_s=None):
            raise ActorDiedError()

    def respond(person, request):
        if request is None:
            loads[person] = loads.get(person, 0) + 1
            return Died() if person == "always" or loads[person] == 1 else _Response({"resolution": 4})
        return _Response(_frame(request))

    assert run.person(_Handle(respond), "once", None)["self_reenactment"].frames == 1
    with pytest.raises(Exception, match="always: its model load was lost with a renderer replica that died, also "
                                        "when sent again") as e:
        run.person(_Handle(respond), "always", None)
    assert type(e.value).__name__ == "ReplicaLost" and isinstance(e.value.__cause__, ActorDiedError)
    assert loads == {"once": 2, "always": 2}


def _crashing_renderer():
    """The renderer deployment with stand-in models (no torch model): rendering "crash" kills the replica process
    (os._exit, as a crash in a native library does) once "fast"'s frames wait in it, the first time; every time
    after that (a file beside crash's model says so) at once. "fast"'s frames enter the replica's batching only once
    crash renders (Serve loads one model at a time and a replica renders one batch at a time: they wait before
    both), so that they are in flight when the replica dies."""
    import asyncio  # everything the replica needs is imported here: Ray sends these classes by value, and a
    import os  # replica cannot import this test module
    import time
    from pathlib import Path

    import numpy as np
    from ray import serve

    from cluster.serve.deployment import AvatarRenderer
    from cluster.serve.renderer import RenderResult

    class Model:
        device, resolution, expression_dim = "cpu", 4, 2

        def __init__(self, person, replica):
            self.person, self.replica = person, replica

        def check(self, request):
            pass

        def render(self, requests):
            if self.person == "crash":
                self.replica.crash_renders = True
                deadline = time.time() + 30
                while (not self.replica.died_once.exists() and not self.replica._waiting.get("fast")
                       and time.time() < deadline):
                    time.sleep(0.01)
                self.replica.died_once.touch()
                os._exit(1)
            return [RenderResult(np.zeros((4, 4, 3), np.float32), r.key, len(requests), 0.0) for r in requests]

    class CrashingRenderer(AvatarRenderer.func_or_class):
        def __init__(self, *args):
            super().__init__(*args)
            self.died_once = Path(self.models["crash"]).parent / "replica-died-once"
            self.crash_renders = False

        async def _load(self, person):
            return Model(person, self)

        async def __call__(self, request):
            deadline = time.time() + 30
            while (serve.get_multiplexed_model_id() == "fast" and not self.died_once.exists()
                   and not self.crash_renders and time.time() < deadline):
                await asyncio.sleep(0.01)
            return await super().__call__(request)

    return serve.deployment(name="renderer")(CrashingRenderer)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_replica_killed_by_one_persons_frames_fails_that_person_only_on_serve(tmp_path, monkeypatch, ray_env,
                                                                                caplog):
    """The same on Ray Serve (the embedded Ray and renderer application of the driver): the replica process dies
    while "crash" renders, with "fast"'s frames waiting in it; Serve starts a new one; fast's frames are sent again
    and render, crash's kill it again and crash fails with the error. Before, both persons failed with Ray's
    ActorDiedError."""
    import logging

    from cluster.serve import deployment
    from cluster.serve.renderer import RendererConfig

    monkeypatch.setattr(deployment, "AvatarRenderer", _crashing_renderer())
    caplog.set_level(logging.WARNING, logger="cluster.eval_driver.person")
    summary = _night(tmp_path, monkeypatch, ["crash", "fast"], None, parallel_persons=2, ray_num_cpus=2,
                     ray_object_store_mb=100, frame_timeout_s=120,
                     renderer=RendererConfig(num_cpus=0.5, max_batch_size=4, device="cpu"))
    assert list(summary.failed) == ["crash"], summary.failed
    assert summary.failed["crash"].startswith("ReplicaLost: crash: its frames were lost with a renderer replica that "
                                              "died, also when sent again"), summary.failed
    assert "ActorDiedError" in summary.failed["crash"]
    assert "fast: 2 frames not back when a renderer replica died" in caplog.text  # fast's frames were lost once
    results = RunResults.load(summary.results_path)
    assert results.persons["fast"]["self_reenactment"].frames == 2
