"""render_eval's command line: a value the evaluation would misuse or fail on after hours (no task, a person
twice, a renderer resource Ray refuses, a device or model file the metric networks cannot load) is refused
before anything runs, with exit code 2 and a message naming the flag (in tyro's frame, as every config error of
the project's command lines); none of these starts Ray."""

from __future__ import annotations

import runpy
import sys
import warnings

import pytest


def _render_eval(tmp_path, monkeypatch, capsys, *flags: str) -> tuple[int, str]:
    """``python -m jobs.render_eval <paths> *flags`` in this process (its __main__ block): exit code, stderr.
    The evaluation itself must not start."""
    import cluster.eval_driver

    def run_evaluation(config):
        raise AssertionError(f"the evaluation started with {config}")

    monkeypatch.setattr(cluster.eval_driver, "run_evaluation", run_evaluation)
    paths = ["--runs", str(tmp_path), "--shards", str(tmp_path), "--stores", str(tmp_path), "--reports-root",
             str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["render_eval", *paths, *flags])
    with warnings.catch_warnings():  # runpy: jobs.render_eval is already imported (by another test)
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module("jobs.render_eval", run_name="__main__")
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flags, error", [
    (["--tasks"], "--tasks names no task"),
    (["--persons", "000", "000"], "--persons names 000 more than once"),
    (["--tasks", "novel_view", "novel_view"], "--tasks names novel_view more than once"),
    (["--renderer.num-cpus", "-3"], "renderer: num_cpus must be a number >= 0, got -3.0"),
    (["--renderer.num-gpus", "nan"], "renderer: num_gpus must be a number >= 0, got nan"),
    (["--eval-device", "banana"], "--eval-device 'banana': not a torch device"),
    (["--landmark-model", "/typo.pt"], "--landmark-model /typo.pt: does not exist"),
    (["--face-id-model", "{tmp}"], "--face-id-model {tmp}: is not a file"),
    (["--face-id-model", "{tmp}/faceid.pt"], "--face-id-model {tmp}/faceid.pt: is not a TorchScript file"),
    # each of these reached ray.init or a renderer replica (--video-min-fps above --fps made the comparison videos
    # play faster than --fps although it is documented as their slowest rate)
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
def test_a_bad_option_is_refused_naming_the_flag_with_exit_code_2(tmp_path, monkeypatch, capsys, flags, error):
    (tmp_path / "faceid.pt").write_text("not a network")
    code, err = _render_eval(tmp_path, monkeypatch, capsys, *[f.format(tmp=tmp_path) for f in flags])
    said = "".join(err.replace("│", "").split())  # tyro frames the message, wrapping long paths anywhere
    assert code == 2 and "".join(error.format(tmp=tmp_path).split()) in said, err


def test_tyros_own_errors_are_still_explained_by_tyro(tmp_path, monkeypatch, capsys):
    """A value of the wrong type or an unknown flag: tyro's usage error (exit code 2), not swallowed."""
    code, err = _render_eval(tmp_path, monkeypatch, capsys, "--fps", "abc")
    assert code == 2 and "--fps" in err and "could not convert string to float" in err
    code, err = _render_eval(tmp_path, monkeypatch, capsys, "--no-such-flag")
    assert code == 2 and "--no-such-flag" in err


def test_no_metrics_is_a_videos_only_run(tmp_path):
    """--metrics with no name is accepted: the persons' comparison videos and thumbnails without numbers (the
    results.json and the report hold tasks without metrics, as a cross-reenactment's)."""
    import tyro

    from cluster.eval_driver import EvalDriverConfig

    config = tyro.cli(EvalDriverConfig, args=["--runs", str(tmp_path), "--shards", str(tmp_path), "--stores",
                                              str(tmp_path), "--reports-root", str(tmp_path), "--metrics"])
    assert config.metrics == ()
