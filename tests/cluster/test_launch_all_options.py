"""jobs/launch_all.py's --captures, --no-evaluate, --force, --verbose, --ray-bind-host, --job-cpus, --job-gpus,
--job-memory-gb and --eval-parallel-persons, each given on its command line (the parser the job's __main__ uses)
with its effect checked.

In process on the local backend (or on a Ray stood in for in this process, ``fake_ray``), like
test_ray_connect.py's launch_all test, and cheap: the data stage is real (the shared tiny capture root:
ingest + shards of one or two persons, about a second); the training is jobs.train_person's ``train``
replaced by a stand-in that prints a line, as a worker does, and writes what a finished training leaves
(base.json, an untrained tiny model, result.json); the evaluation is the real driver (up-to-date check,
results.json, report) with only its rendering on Ray Serve (``driver._render_all``) replaced by one that
records whom it was asked to render. The real training and rendering run in test_launch_all.py and
test_launch_all_reruns.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pipeline_helpers import TINY_DATA

from avatars.configs import tiny_config
from avatars.models import DiffusionAvatarsModel
from avatars.training.base_record import base_fingerprint, write_record
from cluster.eval_driver import driver
from cluster.person_job import JobResult
from cluster.report import RunResults, TaskResult
from cluster.serve.renderer import FrameRenderer
from jobs import launch_all
from jobs import train_person as train_job
from jobs._presets import preset_cli
from shards.store import PersonStore
from shards.testing import TINY
from shards.writer import split_digest

WORKER_LINE = "worker of person"


@pytest.fixture
def launch(tiny_dataset, tmp_path, monkeypatch, capfd):
    """``run(*flags, work=...)``: launch_all parsed from its flags (the shared tiny capture root as
    --captures, a stand-in base folder as --train.base-model, local backend) and run; returns (exit
    code, what it printed). Also: the persons trained and the person lists sent to rendering."""
    captures = tiny_dataset[0]
    base = tmp_path / "base"  # only fingerprinted: the stand-in training loads nothing
    base.mkdir()
    (base / "weights.bin").write_bytes(b"a frozen base")
    trained: list[str] = []
    rendered: list[list[str]] = []

    def train(config, status=None):
        # on file descriptor 1, as a library's C++ code or a child process writes: pytest's capture
        # stands in for sys.stdout here, so a print() would not show where a real worker's goes
        os.write(1, f"{WORKER_LINE} {config.person}\n".encode())
        run, fingerprint = config.run_dir, base_fingerprint(config.base_model)
        write_record(run, config.base_model, fingerprint)
        model = DiffusionAvatarsModel(tiny_config(expression_dim=TINY.expression_dim))
        model.base_model, model.base_fingerprint = str(config.base_model), fingerprint
        model.save_pretrained(run / "model")
        result = {"steps": config.steps, "base_fingerprint": fingerprint,
                  "train_data": split_digest(config.shards, config.person, "train")}
        (run / "result.json").write_text(json.dumps(result))
        trained.append(config.person)
        return result

    def render_all(config, folder, todo, drivers, results, failed, person_seconds, app, media_tags=None,
                   on_done=None):
        rendered.append(list(todo))
        for p in todo:
            results[p] = {t: TaskResult({"psnr": 20.0}, frames=1) for t in config.tasks}
        return len(todo) * len(config.tasks)

    monkeypatch.setattr(train_job, "train", train)
    monkeypatch.setattr(driver, "_render_all", render_all)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    serve_log = logging.getLogger("ray.serve")  # launch_all quiets it; undone after the test
    monkeypatch.setattr(serve_log, "filters", [])
    monkeypatch.setattr(serve_log, "level", serve_log.level)

    def run(*flags: str, work: Path = tmp_path / "work") -> tuple[int, str]:
        args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=[
            "--workdir", str(work), "--captures", str(captures), "--train.base-model", str(base),
            "--persons", "000", *TINY_DATA, "--synthetic.persons", "1", "--ingest.held-out-sequences", "1",
            "--backend", "local", "--max-retries", "0", "--min-free-gb", "0", *flags])
        code = launch_all.main(args)
        captured = capfd.readouterr()
        return code, captured.out + captured.err

    return SimpleNamespace(run=run, work=tmp_path / "work", captures=captures, trained=trained, rendered=rendered)


def _night(work: Path) -> RunResults:
    (path,) = (work / "reports" / "runs").glob("*/results.json")
    return RunResults.load(path)


def test_captures_is_ingested_and_no_synthetic_data_is_made(launch):
    """--captures: the given root's persons are ingested from it and evaluated; no synthetic data is generated."""
    code, out = launch.run("--persons", "all")
    assert code == 0, out
    assert not (launch.work / "captures").exists()
    assert launch.trained == TINY.person_ids == ["000", "001"]  # the capture root's persons, not the synthetic's
    for p in TINY.person_ids:
        store = PersonStore(launch.work / "zarr" / f"{p}.zarr")
        assert store.attrs["source_root"] == str(launch.captures.resolve())
        assert (launch.work / "shards" / p / "manifest.json").is_file()
    assert launch.rendered == [TINY.person_ids] and sorted(_night(launch.work).persons) == TINY.person_ids


def test_no_evaluate_renders_nothing_and_writes_no_report(launch):
    """--no-evaluate: the person trains, but nothing is rendered and no results.json or report is written."""
    code, out = launch.run("--no-evaluate")
    assert code == 0, out
    assert launch.trained == ["000"] and launch.rendered == []
    assert not (launch.work / "reports").exists()
    assert "[4/4]" not in out and "report:" not in out


def test_an_avatar_trained_before_the_held_out_split_changed_is_not_taken_as_trained(launch):
    """A re-run with nothing changed takes the avatar as trained; after --ingest.held-out-sequences changes (frames
    it trained on are evaluated now) it is trained again: result.json records the digest of the training data, and
    the avatar counts as trained only on the same data."""
    code, out = launch.run()
    assert code == 0 and launch.trained == ["000"], out
    code, out = launch.run()
    assert code == 0 and launch.trained == ["000"], out
    code, out = launch.run("--ingest.held-out-sequences", "2")
    assert code == 0 and launch.trained == ["000", "000"], out


def test_force_renders_an_up_to_date_person_again(launch):
    """--force: a person whose stored evaluation is up to date is rendered again instead of reused."""
    code, out = launch.run()
    assert code == 0, out
    assert launch.rendered == [["000"]]
    key = _night(launch.work).evaluations["000"]["key"]
    code, out = launch.run()  # trained and evaluated already: nothing runs, the numbers are reused
    assert code == 0, out
    assert launch.trained == ["000"] and launch.rendered == [["000"]]
    assert "1 up to date, not rendered again" in out
    code, out = launch.run("--force")
    assert code == 0, out
    assert launch.trained == ["000"] and launch.rendered == [["000"], ["000"]]
    assert "not rendered again" not in out and "evaluation: 1 persons, 3 frames" in out
    assert _night(launch.work).evaluations["000"]["key"] == key  # the same inputs: it was up to date


def test_verbose_prints_worker_output_here_instead_of_into_its_log(launch, tmp_path):
    """--verbose: worker output reaches the terminal, with no logs/<person>.log or progress line (else the reverse)."""
    code, out = launch.run()
    assert code == 0, out
    assert f"{WORKER_LINE} 000" not in out and "training 1 person: 1 done" in out
    assert f"{WORKER_LINE} 000" in (launch.work / "logs" / "000.log").read_text()
    verbose = tmp_path / "verbose"
    code, out = launch.run("--verbose", "--no-evaluate", work=verbose)
    assert code == 0, out
    assert f"{WORKER_LINE} 000" in out and "training 1 person:" not in out and "worker logs:" not in out
    assert not (verbose / "logs").exists()
    assert launch.trained == ["000", "000"]


@pytest.fixture
def fake_ray(monkeypatch):
    """Ray stood in for in this process: ``inits`` records ray.init's arguments and ``tasks`` the
    ``.options()`` of every task, which then runs at once, here (a one-node Ray with 4 CPUs, 1 GPU)."""
    import ray
    import ray._private.ray_constants as constants

    calls = SimpleNamespace(inits=[], tasks=[])

    class Task:
        def __init__(self, fn):
            self.fn = fn

        def options(self, **options):
            calls.tasks.append(options)
            return self

        def remote(self, *args):
            return Done(self.fn(*args))

    class Done:  # a finished task's ObjectRef
        def __init__(self, value):
            self.value = value

    # (imports Ray Serve, which uses ray.remote: before the stand-ins below)
    monkeypatch.setattr("cluster.serve.deployment.shutdown_serve_and_ray", lambda: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls.inits))
    monkeypatch.setattr(ray, "init", lambda **kw: calls.inits.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}])
    monkeypatch.setattr(ray, "remote", Task)
    monkeypatch.setattr(ray, "wait", lambda handles, num_returns=1: (handles[:1], handles[1:]))
    monkeypatch.setattr(ray, "get", lambda handle: handle.value)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # what connect_ray sets: undone after the test
    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)
    return calls


def test_ray_bind_host_job_resources_and_eval_parallel_persons(launch, fake_ray, monkeypatch):
    """--ray-bind-host/--job-cpus/--job-gpus/--eval-parallel-persons reach ray.init, each Ray task, the evaluation."""
    evaluated = []
    render_all = driver._render_all
    monkeypatch.setattr(driver, "_render_all", lambda config, *args, **kw: evaluated.append(config)
                        or render_all(config, *args, **kw))
    code, out = launch.run("--persons", "all", "--backend", "ray", "--ray-bind-host", "127.0.0.2",
                           "--job-cpus", "2", "--job-gpus", "0.5", "--eval-parallel-persons", "3")
    assert code == 0, out
    assert launch.trained == TINY.person_ids and launch.rendered == [TINY.person_ids]
    (init,) = fake_ray.inits  # one Ray for the training and the evaluation
    assert init["address"] == "local" and init["_node_ip_address"] == init["dashboard_host"] == "127.0.0.2"
    assert [(t["name"], t["num_cpus"], t["num_gpus"]) for t in fake_ray.tasks] == [
        ("train-000", 2.0, 0.5), ("train-001", 2.0, 0.5)]
    (config,) = evaluated
    assert config.ray_bind_host == "127.0.0.2"
    assert config.parallel_persons == 3 and config.renderer.num_replicas == 3


@pytest.fixture
def staged(tmp_path, monkeypatch, capfd):
    """``run(*flags)``: launch_all from its flags on a capture root of persons 017 and 018 (empty folders)
    with every stage stood in for (records which ran), so that only what main decides is tested."""
    captures = tmp_path / "captures"
    for p in ("017", "018"):
        (captures / p).mkdir(parents=True)
    ran: list[str] = []
    monkeypatch.setattr(launch_all, "_data", lambda args, persons=None, clock=None: (
        ran.append("data") or ([p for p in ("017", "018") if persons == "all" or p in args.persons], {})))
    monkeypatch.setattr(launch_all, "_base_model", lambda args, prepared, **kw: ran.append("base") or None)
    monkeypatch.setattr(launch_all, "_check_bases", lambda args, persons, base: {})
    monkeypatch.setattr(launch_all, "_trained", lambda args, persons, base: {})
    monkeypatch.setattr(launch_all, "_train", lambda args, todo, base, session=None: ran.append("training") or [
        JobResult(p, True, 1, result={"steps": 3}) for p in todo])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def run(*flags: str, evaluate: bool = False) -> tuple[int, str]:
        args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=[
            "--workdir", str(tmp_path / "work"), "--captures", str(captures), "--backend", "local",
            "--min-free-gb", "0", "--evaluate" if evaluate else "--no-evaluate", *flags])
        code = launch_all.main(args)
        captured = capfd.readouterr()
        return code, captured.out + captured.err

    return SimpleNamespace(run=run, ran=ran, work=tmp_path / "work")


@pytest.mark.parametrize("flags, error", [
    (["--max-retries", "-1"], "--max-retries must be 0 or more, got -1"),
    (["--job-cpus", "0"], "--job-cpus must be a positive number, got 0.0"),
    (["--job-gpus", "-1"], "--job-gpus must be 0 or more, got -1.0"),
    (["--job-memory-gb", "-4"], "--job-memory-gb must be a positive number of GiB, got -4.0"),
    (["--job-memory-gb", "nan"], "--job-memory-gb must be a positive number of GiB, got nan"),
    (["--eval-inference-steps", "0"], "--eval-inference-steps must be at least 1, got 0"),
    (["--persons", "017,0018"], "--persons: 0018 not in the capture root"),
    (["--persons", "017,017"], "--persons names 017 more than once"),
    (["--persons", "../017"], "--persons: '../017' is not a person id"),
    (["--persons", ","], "--persons ',' names no person"),
    (["--train.model.unet.layers-per-block", "2"], "--train.model.unet: the main job pretrains its tiny base"),
    (["--train.model.resolution", "128", "--train.model.scheduler.beta-end", "0.02"],
     "--train.model.scheduler, --train.model.resolution: the main job pretrains its tiny base with the tiny preset's"),
    (["--workers", "-1"], "--workers must be at least 1, got -1"),
    (["--train.base-model", "/nonexistent/sd21"], "--train.base-model /nonexistent/sd21 is not a directory"),
    (["--evaluate", "--train.lpips-weights", "/nonexistent/lpips.safetensors"],
     "--train.lpips-weights /nonexistent/lpips.safetensors: the LPIPS weights the evaluation scores with are missing"),
])
def test_bad_values_are_refused_with_their_flag_before_any_work(staged, flags, error):
    """A value the training or the evaluation would refuse after the data stage and the base pretraining,
    and a --persons id that is not in the data set (else dropped without a word), stop the run first:
    exit code 2, one line naming the flag, no traceback, no work directory."""
    code, out = staged.run(*flags)
    assert code == 2 and f"error: {error}" in out and "Traceback" not in out
    assert staged.ran == [] and not staged.work.exists()


def test_a_requested_person_without_a_capture_fails_at_the_data_stage(staged, monkeypatch):
    """A folder under --captures that is no capture (the data set of 'all' does not have it) is that person's
    data failure, named in the summary, not dropped: the tiny base is made of 'all' and the run goes on."""
    monkeypatch.setattr(launch_all, "_data", lambda args, persons=None, clock=None: (["017"], {}))
    code, out = staged.run("--persons", "017,018")
    summary = json.loads((staged.work / "runs" / "summary.json").read_text())
    assert code == 1 and {r["person"]: r["ok"] for r in summary["results"]} == {"017": True, "018": False}
    assert "no capture of 018 in the data set" in out


def test_summary_json_has_the_exit_code_of_a_failed_evaluation(staged, monkeypatch):
    """summary.json is written before the evaluation; one that fails turns the exit code to 1, and the file
    is rewritten with that code and the persons whose evaluation failed."""
    monkeypatch.setattr(launch_all, "_evaluate", lambda args, persons: driver.EvalSummary(
        "d", staged.work / "results.json", None, persons, {"018": "render error"}, 0, 0.0, {}))
    code, out = staged.run("--persons", "017,018", evaluate=True)
    summary = json.loads((staged.work / "runs" / "summary.json").read_text())
    assert code == 1 and summary["exit_code"] == 1
    assert summary["evaluation_failed"] == {"018": "render error"}
    assert all(r["ok"] for r in summary["results"])


@pytest.mark.parametrize("error", [RuntimeError("renderer application 'avatars-1' failed to deploy"),
                                   OSError(28, "No space left on device")])
def test_an_evaluation_that_raises_leaves_a_summary_with_its_reason_and_exit_code_1(staged, monkeypatch, error):
    """The renderer does not deploy (or the disk fills) after every person trained: the run ends with exit code
    1, the trained avatars stand in summary.json, and its evaluation_failed names the reason for every person;
    not a traceback out of main with a summary.json that still says 0."""
    def evaluate(args, persons):
        raise error

    monkeypatch.setattr(launch_all, "_evaluate", evaluate)
    code, out = staged.run("--persons", "017,018", evaluate=True)
    summary = json.loads((staged.work / "runs" / "summary.json").read_text())
    assert code == 1 and summary["exit_code"] == 1 and all(r["ok"] for r in summary["results"])
    reason = ("RuntimeError: renderer application 'avatars-1' failed to deploy" if isinstance(error, RuntimeError)
              else "I/O error: [Errno 28] No space left on device")
    assert summary["evaluation_failed"] == {"017": f"evaluation: {reason}", "018": f"evaluation: {reason}"}, summary
    assert "error: the evaluation stopped" in out and "pipeline finished" in out


def test_a_cluster_that_refuses_the_connection_is_no_io_error(staged, monkeypatch):
    """Ray's ConnectionError (an OSError) stops the training stage as a connection error with Ray's reason
    (kept in its cause), not as an I/O error of the disk: what a head refusing this process's token gives."""
    def refused(args, todo, base, session=None):
        try:
            raise RuntimeError("Failed to get node info: Unauthenticated: InvalidAuthToken")
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379") from e

    monkeypatch.setattr(launch_all, "_train", refused)
    code, out = staged.run("--persons", "017,018")
    summary = {r["person"]: r for r in json.loads((staged.work / "runs" / "summary.json").read_text())["results"]}
    reason = "Failed to connect to Ray cluster at 127.0.0.1:6379 (RuntimeError: Failed to get node info: " \
             "Unauthenticated: InvalidAuthToken)"
    assert code == 1 and f"error: the training stage stopped on a connection error: {reason}" in out, out
    assert {p: (r["ok"], r["error"]) for p, r in summary.items()} == {
        p: (False, f"training: connection error: {reason}") for p in ("017", "018")}
    assert "I/O error" not in out and "Traceback" not in out


def test_slurm_log_dir_is_kept_when_given_even_if_it_is_the_old_default(tmp_path):
    """--slurm.log-dir runs/slurm is used as given; only an unset one goes into <workdir>/slurm."""
    for flags, expected in [(["--slurm.log-dir", "runs/slurm"], Path("runs/slurm")),
                            ([], (tmp_path / "slurm").resolve())]:
        args = preset_cli(launch_all.PRESETS, default="tiny", description="d",
                          args=["--workdir", str(tmp_path), "--backend", "slurm", *flags])
        assert launch_all._backend_config(args, launch_all.status_dir(args)).log_dir == expected


def test_the_paper_preset_without_a_base_is_refused_before_any_work(tmp_path):
    args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=["paper"])
    assert launch_all.check_options(args) == ("--train.base-model is required: this preset trains on a pretrained "
                                              "base (a local SD2.1 directory)")
    args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=[
        "paper", "--train.base-model", str(tmp_path)])
    assert launch_all.check_options(args) is None


def test_a_rerun_with_options_that_define_the_state_refuses_the_persons_trained_with_others(tmp_path, monkeypatch,
                                                                                           tiny_dataset):
    """The options a person's checkpoints were trained with are compared before any job starts (its trainer
    would refuse to resume them, and an avatar trained to its steps would be taken as this run's)."""
    from avatars.training import checkpoint
    from avatars.training.config import TrainConfig
    from common.configs import to_jsonable

    args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=["--workdir", str(tmp_path)])
    saved = to_jsonable(TrainConfig.for_person(args.train, person="017"))
    monkeypatch.setattr(checkpoint, "saved_options", lambda folder: (folder / "step_9" / "train_config.json", saved))
    assert launch_all._check_resumable(args, ["017"]) == {}
    for flags, changed in [(["--train.seed", "5"], "seed: 0 -> 5"),
                           (["--train.model.no-use-expression"], "model.use_expression: True -> False")]:
        other = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=["--workdir", str(tmp_path),
                                                                                     *flags])
        refused = launch_all._check_resumable(other, ["017"])
        assert changed in refused["017"] and "--train.resume never" in refused["017"]
    longer = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=["--workdir", str(tmp_path),
                                                                                  "--train.steps", "1800"])
    assert launch_all._check_resumable(longer, ["017"]) == {}  # a run may be extended
    never = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=["--workdir", str(tmp_path),
                                                                                 "--train.seed", "5", "--train.resume",
                                                                                 "never"])
    assert launch_all._check_resumable(never, ["017"]) == {}
    # trained on other data (another held-out split moved frames between training and evaluation)
    shutil.copytree(tiny_dataset[2] / "000", tmp_path / "shards" / "017")
    saved["train_data"] = "trained-on-another-split"
    refused = launch_all._check_resumable(args, ["017"])
    assert "train_data: 'trained-on-another-split' -> " in refused["017"] and "--train.resume never" in refused["017"]
    saved["train_data"] = split_digest(tmp_path / "shards", "017", "train")
    assert launch_all._check_resumable(args, ["017"]) == {}
    # an older version's checkpoint that recorded no training data: it cannot be shown to continue on this data (it
    # was resumed at its last step and published as trained on another split)
    del saved["train_data"]
    refused = launch_all._check_resumable(args, ["017"])
    assert "train_data: not recorded (the checkpoint is of an older version)" in refused["017"]


def test_job_memory_gb_is_reserved_for_each_ray_task_and_slurm_job(tmp_path, monkeypatch):
    """--job-memory-gb 2.5: each person's Ray task is submitted with 2.5 GiB of memory and each SLURM job asks
    for it (submitit's --mem, whole GB: 3GB); without it neither reserves memory. The jobs and the backend
    configuration are the ones launch_all's training stage builds; only the submission is not made."""
    import ray

    from cluster import orchestrate
    from cluster.orchestrate import make_backend

    runs = []
    monkeypatch.setattr(orchestrate, "run_all", lambda jobs, config: runs.append((jobs, config)) or [])
    tasks = []

    class Task:  # ray.remote(fn).options(**options).remote(*args): records the options, submits nothing
        def __init__(self, fn):
            pass

        def options(self, **options):
            tasks.append(options)
            return self

        def remote(self, *args):
            return None

    monkeypatch.setattr(ray, "remote", Task)

    def reserved(*flags: str) -> tuple[object, object]:
        """(the Ray task's memory option, the SLURM job's mem parameter) of person 017 with ``flags``."""
        reservations = []
        for backend in ("ray", "slurm"):
            args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=[
                "--workdir", str(tmp_path / "work"), "--backend", backend, "--verbose", *flags])
            launch_all._train(args, ["017"], None)
            (job,), config = runs.pop()
            if backend == "ray":
                make_backend(config)._submit(job, 1, None)
                reservations.append(tasks.pop().get("memory"))
            else:
                executor = make_backend(config)._executor(job.resources, "da-017")
                reservations.append(executor._executor.parameters.get("mem"))
        return tuple(reservations)

    assert reserved("--job-memory-gb", "2.5") == (int(2.5 * 2**30), "3GB")
    assert reserved() == (None, None)


def test_resume_never_starts_over_once_and_its_retries_and_requeues_continue(tmp_path, monkeypatch):
    """--train.resume never reached every attempt: each retry (Ray, local) and each SLURM requeue deleted the
    checkpoints the attempt before it had written and started again at step 0 (a requeued paper run never
    finished). launch_all clears the earlier run once, before any job, and the jobs resume ('auto'); a template
    job (cluster.run_person) continues on a requeue. What is cleared: the earlier avatar and its checkpoints."""
    from cluster import orchestrate
    from cluster.status import StatusReporter

    run = tmp_path / "work" / "runs" / "017"
    for folder in ("model", "val", "checkpoints/step_000100"):
        (run / folder).mkdir(parents=True)
    (run / "result.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    submitted = []
    monkeypatch.setattr(orchestrate, "run_all", lambda jobs, config: submitted.append(jobs) or [])
    args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=[
        "--workdir", str(tmp_path / "work"), "--train.resume", "never", "--verbose"])
    launch_all._train(args, ["017"], None)
    ((job,),) = submitted
    assert job.kwargs["options"].resume == "auto"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]  # the earlier avatar and checkpoints went

    trained = []
    monkeypatch.setattr(train_job, "train", lambda config, status=None: trained.append(config.resume) or {})
    fields = {"shards": str(tmp_path), "out": str(tmp_path)}
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    train_job.run("017", {"resume": "never"}, **fields)  # the first run of a template job starts over
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train_job.run("017", {"resume": "never"}, **fields)  # requeued: continues
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    train_job.run("017", {"resume": "never"}, status=StatusReporter(tmp_path / "status", "017", restarts=2), **fields)
    assert trained == ["never", "auto", "auto"]


def test_extra_sbatch_options_can_be_given_on_the_command_line(tmp_path):
    """SlurmConfig.additional_parameters (a cluster's required --account or --qos) was typed dict[str, Any], which
    tyro cannot parse: the option was missing from --help and refused on the command line, usable only from Python."""
    args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=[
        "--workdir", str(tmp_path), "--backend", "slurm", "--slurm.additional-parameters", "account", "avatars",
        "qos", "high"])
    config = launch_all._backend_config(args, tmp_path / "status")
    assert config.additional_parameters == {"account": "avatars", "qos": "high"}


def test_a_second_main_job_on_the_same_work_directory_is_refused_naming_the_first(staged):
    """Two runs on one work directory (last night's still going, a user's beside it) trained the same persons into
    the same folders: the second stops before any work, exit code 2, naming the first; once it ends, a run goes."""
    from common.locks import exclusive

    staged.work.mkdir(parents=True)
    with exclusive(staged.work / launch_all.LOCK_FILE, "the main job (jobs/launch_all.py)"):
        code, out = staged.run("--persons", "017")
    assert code == 2 and staged.ran == [] and "Traceback" not in out
    assert f"error: the main job (jobs/launch_all.py) is already running on {staged.work} (pid {os.getpid()} " in out
    code, out = staged.run("--persons", "017")
    assert code == 0 and staged.ran == ["data", "base", "training"], out


def test_a_base_whose_pretraining_diverges_fails_every_person_with_the_reason(staged, monkeypatch):
    """The tiny base's pretraining that diverges (TrainingDiverged) stopped the main job with a traceback and no
    summary: every person fails with the reason, the summary is written, exit code 1."""
    from avatars.training.config import TrainingDiverged

    def diverges(args, prepared, **kw):
        raise TrainingDiverged("the vae stage diverged: its final loss is nan")

    monkeypatch.setattr(launch_all, "_base_model", diverges)
    code, out = staged.run("--persons", "017,018")
    summary = json.loads((staged.work / "runs" / "summary.json").read_text())
    assert code == 1 and "Traceback" not in out and "error: the base model stage stopped: the vae stage" in out
    assert {r["person"]: r["error"] for r in summary["results"]} == dict.fromkeys(
        ("017", "018"), "base model: the vae stage diverged: its final loss is nan")


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("auto", torch.float32)])  # auto: fp32 off CUDA, as the training's
def test_the_evaluation_renders_in_the_training_precision(staged, tmp_path, monkeypatch, precision, dtype):
    """--train.precision reaches the renderer's RenderOptions: the nightly numbers of an fp32 training came from
    bf16 renders on CUDA (RenderOptions' "auto") while its validation rendered in fp32. The replica's renderer is
    built from the config the evaluation got (on the CPU here, as a replica without a GPU builds it)."""
    evaluated = []
    monkeypatch.setattr(driver, "run_evaluation", lambda config: evaluated.append(config) or driver.EvalSummary(
        "2026-01-01", tmp_path / "results.json", None, list(config.persons), {}, 0, 0.0, {}))
    code, out = staged.run("--persons", "017", "--train.precision", precision, evaluate=True)
    assert code == 0, out
    (config,) = evaluated
    assert config.renderer.pipeline.precision == precision
    assert config.renderer.pipeline.compile_cache is not None  # still shared by the replicas
    model_dir = tmp_path / "avatar"
    DiffusionAvatarsModel(tiny_config(expression_dim=10)).save_pretrained(model_dir)
    renderer = FrameRenderer(model_dir, config.renderer.replace(device="cpu", num_inference_steps=1, max_batch_size=1))
    assert renderer.pipeline.options.precision == precision and renderer.pipeline.dtype == dtype


def test_the_local_backend_says_at_launch_that_it_reserves_no_resources(staged):
    """--backend local runs each training in this process: --job-gpus 0 keeps no training off this machine's GPU
    and --job-cpus / --job-memory-gb limit nothing; said once, before any work. Not said when none was given."""
    code, out = staged.run("--persons", "017", "--job-gpus", "0", "--job-cpus", "4")
    assert code == 0, out
    assert out.count("warning: --backend local reserves no resources") == 1, out
    assert "--job-cpus, --job-gpus limit nothing (a --job-gpus 0 training uses this machine's GPU" in out
    code, out = staged.run("--persons", "017")
    assert code == 0 and "reserves no resources" not in out, out


def test_slurm_rounds_job_resources_up_and_says_so():
    """SLURM takes whole CPUs, GPUs and GiB (slurm_backend._resource_params rounds up): said at launch, and in the
    flags' help."""
    args = launch_all.LaunchAllArgs(backend="slurm", job_cpus=1.5, job_gpus=0.5, job_memory_gb=7.2)
    assert launch_all.resource_warnings(args) == [
        "SLURM reserves whole CPUs, GPUs and GiB, rounded up: --job-cpus 1.5 is 2 CPUs, --job-gpus 0.5 is 1 GPUs, "
        "--job-memory-gb 7.2 is 8 GiB per job"]
    assert launch_all.resource_warnings(launch_all.LaunchAllArgs(backend="slurm", job_cpus=2, job_gpus=1,
                                                                 job_memory_gb=8)) == []
    assert launch_all.resource_warnings(launch_all.LaunchAllArgs(backend="ray", job_gpus=0.5)) == []


def test_the_job_resource_help_says_how_each_backend_takes_them(capsys):
    with pytest.raises(SystemExit):
        preset_cli(launch_all.PRESETS, default="tiny", description="d", args=["tiny", "--help"])
    said = "".join(capsys.readouterr().out.replace("│", "").split())  # tyro's frame
    for text in ("SLURM cpus-per-task, rounded up to whole CPUs", "SLURM gpus-per-node, rounded up to whole GPUs",
                 "SLURM mem, rounded up to whole GiB", "The local backend reserves nothing"):
        assert "".join(text.split()) in said, text
