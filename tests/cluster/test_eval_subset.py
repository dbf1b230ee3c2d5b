"""--max-frames-per-clip (render_eval; launch_all --eval-max-frames-per-clip): a nightly evaluation of the first N
frames of each sequence, recorded as another evaluation format so that the report names those nights in the trend;
the keys of full evaluations stored before the option existed stay valid."""

from __future__ import annotations

import numpy as np
import pytest
from renderer_stand_ins import GreyRenderer

from cluster.eval_driver import EvalDriverConfig, run_evaluation
from cluster.eval_driver.tasks import cross_reenactment, novel_view, open_store, parse_key, self_reenactment
from cluster.eval_driver.uptodate import EVAL_FORMAT, eval_format_label, settings_digest
from cluster.report import RunResults
from cluster.report.build import other_format_nights
from common.fingerprint import json_digest
from jobs.launch_all import LaunchAllArgs, check_options
from shards.testing import TINY

R = 32


def test_each_clip_is_cut_to_its_first_frames(tiny_dataset):
    _, stores, shards = tiny_dataset
    a, b = open_store(stores, "000"), open_store(stores, "001")
    for build in (self_reenactment, novel_view):
        every, first = build(a, shards, R), build(a, shards, R, max_frames=1)
        assert [c.sequence for c in first.clips] == [c.sequence for c in every.clips]
        assert [c.keys for c in first.clips] == [c.keys[:1] for c in every.clips]
        assert all(c.frames == TINY.frames for c in every.clips)
        clip = first.clips[0].load()
        assert len(clip.conditioning) == 1 and clip.reference.shape[0] == 1
        np.testing.assert_array_equal(clip.reference[0], every.clips[0].load().reference[0])
    cross = cross_reenactment(a, b, shards, R, max_frames=1)  # B's held-out frames drive A: cut the same way
    assert [c.frames for c in cross.clips] == [1] * len(cross.clips)
    assert [parse_key(k.split("<-")[1])[2] for c in cross.clips for k in c.keys] == [0] * len(cross.clips)


def test_the_subset_is_part_of_the_key_and_the_format_only_when_set(tmp_path):
    every = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path)
    first = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                             max_frames_per_clip=48)
    assert "max_frames_per_clip" not in settings_digest(every)  # the stored keys of full evaluations stay valid
    assert settings_digest(first)["max_frames_per_clip"] == 48
    assert eval_format_label(every) == str(EVAL_FORMAT)
    assert eval_format_label(first) == f"{EVAL_FORMAT}, at most 48 frames per sequence"


@pytest.mark.parametrize("value", [0, -3])
def test_a_subset_of_no_frames_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="--max-frames-per-clip must be at least 1"):
        EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                         max_frames_per_clip=value)
    problem = check_options(LaunchAllArgs(workdir=tmp_path, eval_max_frames_per_clip=value))
    assert problem is not None and problem.startswith("--eval-max-frames-per-clip must be at least 1")


def test_a_subset_night_renders_the_first_frames_and_is_named_in_the_trend(tiny_dataset, tmp_path, monkeypatch):
    """Through the driver (a stand-in renderer, the real task frames and metrics): each clip scores its first frame
    only, the night records the subset as its format, and a report over it and a full night names it."""
    from cluster.eval_driver import driver
    from cluster.serve import deployment

    _, stores, shards = tiny_dataset
    (tmp_path / "runs" / "000" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "000" / "model" / "config.json").write_text("{}")
    renderer = GreyRenderer(R)
    monkeypatch.setattr(driver, "_base_problem", lambda *a: None)
    # the model, base and data parts of the key are stood in for; its settings part is the real one: the full
    # night's evaluation is not reused for the subset night
    monkeypatch.setattr(driver, "evaluation_key", lambda config, *a, **kw: json_digest(settings_digest(config)))
    monkeypatch.setattr(driver, "connect_ray", lambda *a, **kw: True)
    monkeypatch.setattr(driver, "leave_ray", lambda *a: None)
    monkeypatch.setattr(deployment, "deploy_renderer", lambda *a, **kw: renderer)
    nights = {}
    for date, most in (("2025-03-01", None), ("2025-03-02", 1)):
        config = EvalDriverConfig(runs=tmp_path / "runs", shards=shards, stores=stores,
                                  reports_root=tmp_path / "reports", persons=("000",),
                                  tasks=("self_reenactment", "novel_view"), metrics=("psnr",), run_date=date,
                                  build_report=False, max_frames_per_clip=most)
        nights[date] = RunResults.load(run_evaluation(config).results_path)
    every, first = nights["2025-03-01"].persons["000"], nights["2025-03-02"].persons["000"]
    held, train = 1, TINY.sequences - 1  # clips of the held-out and the training sequences
    assert {t: r.frames for t, r in every.items()} == {"self_reenactment": held * TINY.frames,
                                                      "novel_view": train * TINY.frames}
    assert {t: r.frames for t, r in first.items()} == {"self_reenactment": held, "novel_view": train}
    assert renderer.sent == (held + train) * (TINY.frames + 1)
    assert nights["2025-03-02"].evaluations["000"]["eval_format"] == f"{EVAL_FORMAT}, at most 1 frames per sequence"
    assert other_format_nights([nights["2025-03-01"], nights["2025-03-02"]]) == [f"2025-03-01: {EVAL_FORMAT}"]


def test_launch_all_passes_the_subset_to_its_evaluation(tmp_path, monkeypatch):
    from cluster.eval_driver import driver
    from jobs import launch_all

    seen = []
    monkeypatch.setattr(driver, "run_evaluation", seen.append)
    launch_all._evaluate(LaunchAllArgs(workdir=tmp_path, eval_max_frames_per_clip=24), ["000"])
    launch_all._evaluate(LaunchAllArgs(workdir=tmp_path), ["000"])
    assert [c.max_frames_per_clip for c in seen] == [24, None]
