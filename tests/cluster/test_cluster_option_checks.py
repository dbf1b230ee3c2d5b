"""Config values of the evaluation, the renderer, SLURM and the main job that were taken and misused (or failed
after hours): each is refused when the command line is parsed, exit code 2 with a message naming its flag, or has
the meaning its help gives. Cheap: parsing in this process, a renderer replica built without Ray, launch_all with its
stages stood in for (as in test_launch_all_options.py)."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.eval_driver import driver
from cluster.report import ReportConfig
from cluster.serve.renderer import RendererConfig
from cluster.slurm_backend import SlurmConfig
from jobs import launch_all
from jobs._presets import preset_cli


def _said(text: str) -> str:
    """tyro frames its message and wraps it anywhere: compare without the frame and the white space."""
    return "".join(text.replace("│", "").split())


def test_good_evaluation_options_still_parse(tmp_path):
    config = dict(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path, metrics=("psnr",))
    for renderer in (RendererConfig(device="cuda", num_gpus=1), RendererConfig(device="cuda:0", num_gpus=0.25),
                     RendererConfig(device="cpu"), RendererConfig(device="auto"),
                     RendererConfig(metrics_port=0, metrics_host="0.0.0.0"),
                     RendererConfig(metrics_port=65472, metrics_host="node-7.cluster"),
                     RendererConfig(metrics_port=1, metrics_host="::1")):
        driver.EvalDriverConfig(**config, renderer=renderer)
    driver.EvalDriverConfig(**config, fps=4.0, video_min_fps=4.0, ray_num_cpus=1, ray_object_store_mb=75)


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
