"""Config values of the evaluation, the renderer, SLURM and the main job that were taken and misused (or failed
after hours): each is refused when the command line is parsed, exit code 2 with a message naming its flag, or has
the meaning its help gives. Cheap: parsing in this process, a renderer replica built without Ray, launch_all with its
stages stood in for (as in test_launch_all_options.py)."""

from __future__ import annotations

import dataclasses
import runpy
import sys
import urllib.request
import warnings
from types import SimpleNamespace

import pytest
import torch

from avatars.configs import tiny_config
from avatars.models import DiffusionAvatarsModel
from cluster.eval_driver import driver
from cluster.person_job import JobResult
from cluster.report import ReportConfig
from cluster.serve.renderer import FrameRenderer, RendererConfig
from cluster.slurm_backend import SlurmConfig
from jobs import launch_all
from jobs._presets import preset_cli


def _said(text: str) -> str:
    """tyro frames its message and wraps it anywhere: compare without the frame and the white space."""
    return "".join(text.replace("│", "").split())


def _render_eval(tmp_path, monkeypatch, capsys, *flags: str) -> tuple[int, str]:
    """``python -m jobs.render_eval <paths> *flags`` in this process: exit code and stderr; the evaluation itself
    must not start."""
    import cluster.eval_driver

    def run_evaluation(config):
        raise AssertionError(f"the evaluation started with {config}")

    monkeypatch.setattr(cluster.eval_driver, "run_evaluation", run_evaluation)
    paths = ["--runs", str(tmp_path), "--shards", str(tmp_path), "--stores", str(tmp_path), "--reports-root",
             str(tmp_path), "--metrics", "psnr"]
    monkeypatch.setattr(sys, "argv", ["render_eval", *paths, *flags])
    with warnings.catch_warnings():  # runpy: jobs.render_eval is already imported (by another test)
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module("jobs.render_eval", run_name="__main__")
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flags, error", [
    (["--renderer.metrics-port", "-1"], "metrics_port (--renderer.metrics-port) must be 1 to 65472"),
    (["--renderer.metrics-port", "70000"], "metrics_port (--renderer.metrics-port) must be 1 to 65472"),
    (["--renderer.metrics-port", "65500"], "metrics_port (--renderer.metrics-port) must be 1 to 65472"),
    (["--renderer.metrics-port", "9500", "--renderer.metrics-host", ""], "metrics_host (--renderer.metrics-host) '': "
                                                                         "empty"),
    (["--renderer.metrics-host", "node1:9500"], "metrics_host (--renderer.metrics-host) 'node1:9500': not an IP"),
    (["--renderer.device", "banana"], "device (--renderer.device) 'banana': not a torch device"),
    (["--renderer.device", "cuda"], "--renderer.device cuda needs --renderer.num-gpus > 0"),
    (["--renderer.device", "cuda:1", "--renderer.num-gpus", "0"], "--renderer.device cuda:1 needs --renderer.num-gpus"),
    (["--video-min-fps", "30"], "--video-min-fps (30) must be at most --fps (24)"),
    (["--fps", "10", "--video-min-fps", "12"], "--video-min-fps (12) must be at most --fps (10)"),
    (["--fps", "inf"], "fps (inf) and video_min_fps (4.0) must be > 0"),
    (["--ray-num-cpus", "0"], "--ray-num-cpus must be at least 1 (leave it out for all CPUs), got 0"),
    (["--ray-num-cpus", "-2"], "--ray-num-cpus must be at least 1"),
    (["--ray-object-store-mb", "0"], "--ray-object-store-mb must be at least 75 (Ray's minimum object store), got 0"),
    (["--ray-object-store-mb", "-512"], "--ray-object-store-mb must be at least 75"),
    (["--ray-object-store-mb", "64"], "--ray-object-store-mb must be at least 75"),
])
def test_a_bad_evaluation_option_is_refused_when_parsed_naming_its_flag(tmp_path, monkeypatch, capsys, flags, error):
    """Before, each of these reached ray.init or a renderer replica (or, --video-min-fps above --fps, made the
    comparison videos play faster than --fps although it is documented as their slowest rate)."""
    code, err = _render_eval(tmp_path, monkeypatch, capsys, *flags)
    assert code == 2 and _said(error) in _said(err), err


def test_good_evaluation_options_still_parse(tmp_path):
    config = dict(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path, metrics=("psnr",))
    for renderer in (RendererConfig(device="cuda", num_gpus=1), RendererConfig(device="cuda:0", num_gpus=0.25),
                     RendererConfig(device="cpu"), RendererConfig(device="auto"),
                     RendererConfig(metrics_port=0, metrics_host="0.0.0.0"),
                     RendererConfig(metrics_port=65472, metrics_host="node-7.cluster"),
                     RendererConfig(metrics_port=1, metrics_host="::1")):
        driver.EvalDriverConfig(**config, renderer=renderer)
    driver.EvalDriverConfig(**config, fps=4.0, video_min_fps=4.0, ray_num_cpus=1, ray_object_store_mb=75)


@pytest.fixture
def replica(monkeypatch):
    """``make(config)``: the renderer deployment's class built as a replica builds it, in this process without Ray
    (as test_serve.py's fixture); its exporters are stopped at the end."""
    from ray import serve

    import cluster.bind
    from cluster.serve.deployment import AvatarRenderer

    made = []
    monkeypatch.setattr(cluster.bind, "serve_replica_grpc_on_node_ip", lambda node_ip: False)
    batching = AvatarRenderer.func_or_class.render_batch.set_max_batch_size.__self__
    for name in ("_queue", "max_batch_size", "batch_wait_timeout_s"):
        monkeypatch.setattr(batching, name, getattr(batching, name))

    def make(config: RendererConfig):
        context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=config.max_ongoing_requests))
        monkeypatch.setattr(serve, "get_replica_context", lambda: context)
        made.append(AvatarRenderer.func_or_class({"p0": "/nowhere"}, config, 2))
        return made[-1]

    yield make
    for r in made:
        if r.exporter is not None:
            r.exporter.stop()
            r.exporter = None


def test_renderer_metrics_port_0_is_a_free_port_as_in_training(replica):
    """--renderer.metrics-port 0 means what --train.metrics-port 0 means: an exporter on a port the system picks
    (before: no exporter at all, though 0 is no 'None'); None is still no exporter."""
    r = replica(RendererConfig(metrics_port=0))
    assert r.exporter is not None and r.exporter.port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{r.exporter.port}/metrics", timeout=10) as resp:
        assert resp.status == 200
    assert replica(RendererConfig()).exporter is None


# ---- SLURM -------------------------------------------------------------------------------------


def _launch_all_parse(capsys, *flags: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        preset_cli(launch_all.PRESETS, default="tiny", description="d", args=list(flags))
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flags, error", [
    (["--slurm.signal-delay-s", "-30"], "--slurm.signal-delay-s must be at least 1 and less than the time limit "
                                        "(--slurm.time-min 60: 3600 s"),
    (["--slurm.signal-delay-s", "0"], "--slurm.signal-delay-s must be at least 1"),
    (["--slurm.signal-delay-s", "3600"], "--slurm.signal-delay-s must be at least 1 and less than the time limit"),
    (["--slurm.time-min", "1"], "(--slurm.time-min 1: 60 s; SLURM takes at most 65535), got 90"),  # the default 90
    (["--slurm.time-min", "2000", "--slurm.signal-delay-s", "70000"], "SLURM takes at most 65535), got 70000"),
    (["--slurm.poll-interval-s", "nan"], "--slurm.poll-interval-s must be a finite number > 0, got nan"),
    (["--slurm.poll-interval-s", "inf"], "--slurm.poll-interval-s must be a finite number > 0, got inf"),
    (["--slurm.poll-interval-s", "0"], "--slurm.poll-interval-s must be a finite number > 0, got 0.0"),
    (["--slurm.result-wait-s", "nan"], "--slurm.result-wait-s must be a finite number >= 0, got nan"),
    (["--slurm.result-wait-s", "inf"], "--slurm.result-wait-s must be a finite number >= 0, got inf"),
    (["--slurm.time-min", "0"], "--slurm.time-min must be at least 1 minute, got 0"),
])
def test_a_bad_slurm_option_is_refused_when_parsed_naming_its_flag(capsys, flags, error):
    """A signal delay of the time limit or more signalled every job at its start (each requeued at once until
    --slurm.max-requeues); NaN poll or wait times passed the checks and failed in time.sleep with jobs queued."""
    code, err = _launch_all_parse(capsys, "--backend", "slurm", *flags)
    assert code == 2 and _said(error) in _said(err), err


def test_good_slurm_options_still_parse():
    assert SlurmConfig(time_min=1, signal_delay_s=50).signal_delay_s == 50  # the real-timeout test's settings
    assert SlurmConfig(time_min=2, signal_delay_s=119, poll_interval_s=0.01, result_wait_s=0).time_min == 2


# ---- the report ------------------------------------------------------------------------------------


def test_the_report_config_has_no_dead_extra_meta_option(tmp_path):
    """ReportConfig.extra_meta was set by nothing (no caller, no flag of jobs/nightly_report.py): removed."""
    assert "extra_meta" not in {f.name for f in dataclasses.fields(ReportConfig)}
    with pytest.raises(TypeError):
        ReportConfig(tmp_path, extra_meta={"a": "b"})  # type: ignore[call-arg]


# ---- launch_all ------------------------------------------------------------------------------------


@pytest.fixture
def staged(tmp_path, monkeypatch, capfd):
    """``run(*flags)``: launch_all from its flags on a capture root of persons 017 and 018 with every stage stood
    in for (test_launch_all_options.py's fixture); the evaluation's config is recorded, nothing renders."""
    captures = tmp_path / "captures"
    for p in ("017", "018"):
        (captures / p).mkdir(parents=True)
    evaluated: list[driver.EvalDriverConfig] = []
    monkeypatch.setattr(launch_all, "_data", lambda args, persons=None, clock=None: (
        [p for p in ("017", "018") if persons == "all" or p in args.persons], {}))
    monkeypatch.setattr(launch_all, "_base_model", lambda args, prepared, **kw: None)
    monkeypatch.setattr(launch_all, "_check_bases", lambda args, persons, base: {})
    monkeypatch.setattr(launch_all, "_check_resumable", lambda args, persons: {})
    monkeypatch.setattr(launch_all, "_trained", lambda args, persons, base: {})
    monkeypatch.setattr(launch_all, "_train", lambda args, todo, base, session=None: [
        JobResult(p, True, 1, result={"steps": 3}) for p in todo])
    monkeypatch.setattr(driver, "run_evaluation", lambda config: evaluated.append(config) or driver.EvalSummary(
        "2026-01-01", tmp_path / "results.json", None, list(config.persons), {}, 0, 0.0, {}))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def run(*flags: str, evaluate: bool = False) -> tuple[int, str]:
        args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=[
            "--workdir", str(tmp_path / "work"), "--captures", str(captures), "--backend", "local",
            "--min-free-gb", "0", "--evaluate" if evaluate else "--no-evaluate", *flags])
        code = launch_all.main(args)
        captured = capfd.readouterr()
        return code, captured.out + captured.err

    return SimpleNamespace(run=run, evaluated=evaluated)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("auto", torch.float32)])  # auto: fp32 off CUDA, as the training's
def test_the_evaluation_renders_in_the_training_precision(staged, tmp_path, precision, dtype):
    """--train.precision reaches the renderer's RenderOptions: the nightly numbers of an fp32 training came from
    bf16 renders on CUDA (RenderOptions' "auto") while its validation rendered in fp32. The replica's renderer is
    built from the config the evaluation got (on the CPU here, as a replica without a GPU builds it)."""
    code, out = staged.run("--persons", "017", "--train.precision", precision, evaluate=True)
    assert code == 0, out
    (config,) = staged.evaluated
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
    said = _said(capsys.readouterr().out)
    for text in ("SLURM cpus-per-task, rounded up to whole CPUs", "SLURM gpus-per-node, rounded up to whole GPUs",
                 "SLURM mem, rounded up to whole GiB", "The local backend reserves nothing"):
        assert _said(text) in said, text
