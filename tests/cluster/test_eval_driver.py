"""Evaluation driver: task frames from the tiny data set, and the end-to-end nightly run
(Serve renderer on an embedded Ray, metrics, videos, results.json, report)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from renderer_stand_ins import Response

from avatars.configs import tiny_config
from avatars.models import DiffusionAvatarsModel
from cluster.eval_driver import EvalDriverConfig, merge_evaluations, run_evaluation
from cluster.eval_driver.driver import cross_drivers, video_fps
from cluster.eval_driver.tasks import (
    Clip,
    LazyClip,
    TaskFrames,
    TaskSkipped,
    cross_reenactment,
    novel_view,
    open_store,
    parse_key,
    self_reenactment,
)
from cluster.eval_driver.uptodate import EVAL_FORMAT
from cluster.report import RunResults
from cluster.serve.renderer import RendererConfig, RenderResult
from common.io import DataError
from shards.testing import TINY

R = 64  # tiny model resolution (the tiny shards are 48 px: resized like the training loader)


@pytest.fixture
def tiny_data(tiny_dataset):
    return tiny_dataset  # (captures, stores, shards), shared read-only (tests/conftest.py)


def test_self_reenactment_and_novel_view_frames(tiny_data):
    _, stores, shards = tiny_data
    store = open_store(stores, "000")
    held_cam, held_seqs = store.attrs["held_out_camera"], set(store.attrs["held_out_sequences"])

    sr = self_reenactment(store, shards, R)
    assert sr.has_ground_truth and {c.sequence for c in sr.clips} == held_seqs
    assert sr.frames == len(held_seqs) * TINY.frames  # one camera only: the held-out one
    for clip in sr.load_clips():
        keys = [parse_key(k) for k in clip.keys]
        assert {k[3] for k in keys} == {held_cam} and [k[2] for k in keys] == sorted(k[2] for k in keys)
        assert clip.reference.shape == (clip.frames, R, R, 3) and clip.alpha.shape == (clip.frames, R, R)
        assert clip.conditioning[0]["canonical"].shape == (5, R, R)
        assert clip.conditioning[0]["expression"].shape == (TINY.expression_dim,)

    nv = novel_view(store, shards, R)
    train_seqs = set(store.sequences) - held_seqs
    assert {c.sequence for c in nv.clips} == train_seqs and nv.frames == len(train_seqs) * TINY.frames
    assert all(parse_key(k)[3] == held_cam for c in nv.clips for k in c.keys)


def test_cross_reenactment_meshes_follow_the_driving_codes(tiny_data):
    _, stores, shards = tiny_data
    a, b = open_store(stores, "000"), open_store(stores, "001")
    # driven by its own codes, A's generated fitted mesh must reproduce A's own shard buffers
    own = self_reenactment(a, shards, R)
    same = cross_reenactment(a, a, shards, R, driver_clips=own.clips)
    for c_gen, c_ref in zip(same.load_clips(), own.load_clips()):
        for g, r in zip(c_gen.conditioning, c_ref.conditioning):
            m_g, m_r = g["mask"] > 0.5, r["mask"] > 0.5
            iou = (m_g & m_r).sum() / (m_g | m_r).sum()
            assert iou > 0.97, iou
            both = m_g & m_r
            assert np.abs(g["canonical"][:, both[0]] - r["canonical"][:, both[0]]).mean() < 0.02
            np.testing.assert_array_equal(g["expression"], r["expression"])

    cross = cross_reenactment(a, b, shards, R)
    assert not cross.has_ground_truth and cross.driver == "001"
    drive = self_reenactment(b, shards, R)
    assert cross.frames == drive.frames
    cross_clip, drive_clip = cross.clips[0].load(), drive.clips[0].load()
    np.testing.assert_array_equal(cross_clip.conditioning[0]["expression"], drive_clip.conditioning[0]["expression"])
    np.testing.assert_array_equal(cross_clip.reference, drive_clip.reference)  # left panel: B's frame
    # A's geometry, not B's: the masks differ from B's own frames
    diff = [np.abs(c["mask"] - d["mask"]).sum() for c, d in zip(cross_clip.conditioning, drive_clip.conditioning)]
    assert max(diff) > 0


def test_cross_reenactment_needs_a_synthetic_capture(tiny_data):
    captures, stores, shards = tiny_data
    marker = captures / "000" / "synthetic.json"
    hidden = marker.with_name("synthetic.json.hidden")
    os.replace(marker, hidden)
    try:
        with pytest.raises(TaskSkipped, match="needs driving meshes.*not a synthetic capture"):
            cross_reenactment(open_store(stores, "000"), open_store(stores, "001"), shards, R)
    finally:
        os.replace(hidden, marker)


def test_merge_evaluations_and_drivers():
    e1 = {"frames": 2,
          "metrics": {"psnr": {"mean": 20.0, "per_frame": [19.0, 21.0]}, "jod": {"mean": 8.0, "per_frame": None}},
          "skipped": {"akd": "no model"}}
    e2 = {"frames": 1,
          "metrics": {"psnr": {"mean": 26.0, "per_frame": [26.0]}, "jod": {"mean": 6.0, "per_frame": None}},
          "skipped": {}}
    m = merge_evaluations([e1, e2])
    assert m["frames"] == 3 and m["metrics"]["psnr"] == {"mean": 22.0, "per_frame": [19.0, 21.0, 26.0]}
    assert m["metrics"]["jod"] == {"mean": 7.0, "per_frame": None} and m["skipped"] == {"akd": "no model"}
    # the protocol PSNR is a per-sequence value: averaged over clips, not frames
    e1["metrics"]["psnr"], e2["metrics"]["psnr"] = {"mean": 25.0, "per_frame": None}, {"mean": 27.0, "per_frame": None}
    assert merge_evaluations([e1, e2])["metrics"]["psnr"] == {"mean": 26.0, "per_frame": None}


def test_merge_evaluations_leaves_frames_without_a_finite_value_out_and_counts_them():
    """A clip's +inf frame (a perfect PSNR) and an empty mask's NaN do not wipe out the task's mean; the number of
    frames left out is noted; the stored per-frame values keep them (null)."""
    from cluster.report import TaskResult

    e1 = {"frames": 2, "metrics": {"psnr_frame_masked": {"mean": 20.0, "per_frame": [20.0, float("inf")]},
                                   "psnr_masked": {"mean": float("inf"), "per_frame": None}}}
    e2 = {"frames": 2, "metrics": {"psnr_frame_masked": {"mean": 26.0, "per_frame": [float("nan"), 26.0]},
                                   "psnr_masked": {"mean": 24.0, "per_frame": None}}}
    m = merge_evaluations([e1, e2])
    assert m["metrics"]["psnr_frame_masked"]["mean"] == 23.0 and m["metrics"]["psnr_masked"]["mean"] == 24.0
    assert m["skipped"] == {"psnr_frame_masked frames": "psnr_frame_masked: 2 of 4 frames left out of the mean "
                                                        "(no finite value: an empty mask, or identical frames' +inf)"}
    r = TaskResult.from_evaluation(m)
    assert r.metrics["psnr_frame_masked"] == 23.0 and r.per_frame["psnr_frame_masked"] == [20.0, None, None, 26.0]


def test_short_videos_play_slower():
    assert video_fps(16, 24.0, 6.0, 4.0) == 4.0  # 16 frames would last 0.7 s at 24 fps
    assert video_fps(48, 24.0, 6.0, 4.0) == 8.0
    assert video_fps(400, 24.0, 6.0, 4.0) == 24.0


def test_video_settings_are_checked_and_no_minimum_length_plays_at_fps(tmp_path):
    """--video-min-seconds 0 means no minimum length (it used to divide by zero after every person rendered);
    a frame rate of 0 or a negative minimum is refused when the config is built."""
    assert video_fps(16, 24.0, 0.0, 4.0) == 24.0
    paths = dict(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path)
    assert EvalDriverConfig(**paths, video_min_seconds=0.0).video_min_seconds == 0.0
    for bad, match in (({"video_min_seconds": -1.0}, "video_min_seconds"), ({"video_min_fps": 0.0}, "video_min_fps"),
                       ({"fps": 0.0}, "fps"), ({"video_min_seconds": float("nan")}, "video_min_seconds")):
        with pytest.raises(ValueError, match=match):
            EvalDriverConfig(**paths, **bad)


def _fps(path) -> float:
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return float(reader.get_meta_data()["fps"])
    finally:
        reader.close()


def test_missing_lpips_weights_are_refused_naming_the_file(tmp_path):
    """--lpips-weights that do not exist fail the evaluation at its start, naming the file and the way out."""
    from cluster.eval_driver.person import EvalRun

    config = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                              lpips_weights=tmp_path / "missing.safetensors")
    with pytest.raises(DataError, match=r"missing.safetensors.*LPIPS weights are missing.*drop 'lpips'"):
        EvalRun(config, tmp_path / "run")


def test_lpips_face_alone_loads_the_lpips_weights_and_keys_on_them(tmp_path):
    """--metrics with lpips_face but not lpips: the weights are loaded (not refused with a message about a
    flag that is set), a missing file names lpips_face, and the evaluation key follows the weights."""
    from pathlib import Path

    from cluster.eval_driver.person import EvalRun
    from cluster.eval_driver.uptodate import settings_digest

    weights = Path(__file__).resolve().parents[2] / "weights" / "lpips_alex.safetensors"
    config = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                              metrics=("psnr", "lpips_face"), lpips_weights=weights)
    assert EvalRun(config, tmp_path)._evaluator.result(timeout=60)._lpips is not None
    assert settings_digest(config)["lpips_weights"] is not None
    missing = dataclasses.replace(config, lpips_weights=tmp_path / "missing.safetensors")
    with pytest.raises(DataError, match=r"missing.safetensors.*drop 'lpips_face' from --metrics"):
        EvalRun(missing, tmp_path)


def test_unknown_metrics_are_refused_when_the_config_is_built(tmp_path):
    """An unknown --metrics name is invalid input: refused when the command line is parsed (exit code 2),
    before persons are checked or Ray starts."""
    import tyro

    with pytest.raises(ValueError, match=r"unknown metrics \['psnr_mask'\]; choose from \['psnr'"):
        EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                         metrics=("psnr", "psnr_mask"))
    args = ["--runs", str(tmp_path), "--shards", str(tmp_path), "--stores", str(tmp_path), "--reports-root",
            str(tmp_path), "--metrics", "psnr", "psnr_mask"]
    with pytest.raises(SystemExit) as exit_:
        tyro.cli(EvalDriverConfig, args=args)
    assert exit_.value.code == 2


def test_cross_drivers_are_the_next_person_with_data(tmp_path):
    for p in ("a", "c"):
        (tmp_path / f"{p}.zarr").mkdir()
    assert cross_drivers(["a", "b", "c"], tmp_path) == {"a": "c", "b": "c", "c": "a"}
    assert cross_drivers(["a"], tmp_path) == {"a": "c"}  # a subset run drives a person as the full run does
    assert cross_drivers(["a"], tmp_path / "nowhere") == {"a": None}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_end_to_end_two_persons_and_a_failed_one(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    _, stores, shards = tiny_data
    runs = tmp_path / "runs"
    for i, p in enumerate(TINY.person_ids):
        model = DiffusionAvatarsModel(tiny_config(expression_dim=TINY.expression_dim, init_seed=i))
        model.save_pretrained(runs / p / "model")
    (runs / "zz9").mkdir()  # a person whose training never produced a model
    corrupt = runs / "zz8" / "model"  # and one whose checkpoint is corrupt: the renderer cannot load it
    DiffusionAvatarsModel(tiny_config(expression_dim=TINY.expression_dim)).save_pretrained(corrupt)
    (corrupt / "controlnet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    reports = tmp_path / "nightly"
    config = EvalDriverConfig(
        runs=runs, shards=shards, stores=stores, reports_root=reports, run_date="2025-03-01",
        renderer=RendererConfig(num_inference_steps=2, max_batch_size=8, batch_wait_timeout_s=0.2, num_cpus=1,
                                device="cpu"),
        metrics=("psnr", "psnr_frame", "ssim", "lpips", "psnr_face", "colour_error"), parallel_persons=2,
        ray_num_cpus=2, ray_object_store_mb=200, video_min_seconds=3.0, video_min_fps=5.0)
    summary = run_evaluation(config)

    import ray
    assert not ray.is_initialized()  # the driver started its own Ray and shut it down
    assert summary.persons == ["000", "001", "zz8", "zz9"] and set(summary.failed) == {"zz8", "zz9"}
    assert "no trained model" in summary.failed["zz9"] and "zz9/model/config.json" in summary.failed["zz9"]
    assert summary.failed["zz8"].startswith(f"ModelLoadError: renderer could not load the avatar of person zz8 "
                                            f"from {corrupt}"), summary.failed["zz8"]
    results = RunResults.load(summary.results_path)
    assert summary.results_path == reports / "runs" / "2025-03-01" / "results.json"
    run = summary.results_path.parent
    from avatars.evaluation.video import read_video

    frames_total = 0
    for p in ("000", "001"):
        tasks = results.persons[p]
        assert set(tasks) == {"self_reenactment", "novel_view", "cross_reenactment"}
        for name in ("self_reenactment", "novel_view"):
            r = tasks[name]
            assert r.frames > 0 and len(r.per_frame["psnr_frame"]) == r.frames and "psnr" not in r.per_frame
            assert {"psnr", "psnr_frame", "ssim", "lpips", "psnr_masked", "ssim_masked", "lpips_masked", "psnr_face",
                    "colour_error"} <= set(r.metrics)
            assert all(v is not None and np.isfinite(v) for v in r.metrics.values())
            assert 0 < r.metrics["ssim"] <= 1 and r.metrics["psnr_masked"] > 0
        cross = tasks["cross_reenactment"]
        assert cross.metrics == {} and "no ground truth" in cross.skipped["metrics"] and cross.frames > 0
        for name, r in tasks.items():
            from PIL import Image

            thumb = np.asarray(Image.open(run / r.thumbnail))  # reference row over render row, 2x
            assert thumb.shape[0] == 2 * 2 * R and thumb.shape[1] == 2 * R * min(6, r.frames)
            video = read_video(run / r.video)
            # ground truth (or driving frame) | render | normals | depth | canonical
            assert video.shape == (r.frames, R, 5 * R, 3), (name, video.shape)
            # slowed to last --video-min-seconds, not below --video-min-fps (the defaults, 6 s and 4 fps, differ)
            assert video_fps(r.frames, 24.0, 3.0, 5.0) != video_fps(r.frames, 24.0, 6.0, 4.0)
            assert _fps(run / r.video) == pytest.approx(video_fps(r.frames, 24.0, 3.0, 5.0), rel=0.01)
            frames_total += r.frames
    assert summary.frames_rendered == frames_total
    failed = results.persons["zz9"]
    assert set(failed) == {"self_reenactment", "novel_view", "cross_reenactment"}
    assert all("no trained model" in r.skipped["task"] for r in failed.values())
    assert results.meta["failed_persons"] == "zz8, zz9" and "000 by 001" in results.meta["cross_reenactment"]

    html = summary.report_index.read_text()
    assert summary.report_index == reports / "site" / "2025-03-01" / "index.html"
    assert 'id="person-000"' in html and 'id="person-001"' in html and "no trained model" in html
    # the site's name: by content (cluster.report.build._publish_video)
    assert len(list((summary.report_index.parent / "videos" / "000").glob("self_reenactment-*.mp4"))) == 1
    report = json.loads((summary.report_index.parent / "report.json").read_text())
    assert report["current"]["average"]["overall"]["psnr"] is not None

    # The same evaluation again: up to date, so nothing is rendered (Ray is not even started).
    later = dataclasses.replace(config, persons=("000", "001", "zz9"))  # zz8's model would start Ray again
    again = run_evaluation(later)
    assert again.reused == ["000", "001"] and again.frames_rendered == 0 and not ray.is_initialized()
    assert RunResults.load(again.results_path).persons == results.persons
    # A subset run of the same night, forced: only 000 is rendered again; the night keeps 001 and zz9. What the
    # driver does around the renderer is what is checked from here on: the renderer stands in (Serve ran above; a
    # second embedded Ray and replica would cost ~30 s), handing back 000's frames and numbers of the first run.
    from cluster.eval_driver import driver

    rendered = []

    def render_again(config, folder, todo, drivers, results_, failed, person_seconds, app, media_tags,
                     on_done=None):
        rendered.extend(todo)
        results_.update({p: results.persons[p] for p in todo})
        return sum(r.frames for p in todo for r in results.persons[p].values())

    monkeypatch.setattr(driver, "_render_all", render_again)
    subset = run_evaluation(dataclasses.replace(config, persons=("000",), force=True))
    assert rendered == ["000"] and subset.reused == []
    assert subset.frames_rendered == sum(r.frames for r in results.persons["000"].values())
    night = RunResults.load(subset.results_path)
    assert sorted(night.persons) == ["000", "001", "zz8", "zz9"] and night.persons["001"] == results.persons["001"]
    assert night.evaluations["000"]["run_id"] != night.evaluations["001"]["run_id"]
    assert night.evaluations["000"]["eval_format"] == str(EVAL_FORMAT)  # what computed them (the report compares)
    assert night.evaluations["000"]["key"] == RunResults.load(again.results_path).evaluations["000"]["key"]
    # The next night reuses the numbers and links the videos into its own folder.
    nxt = run_evaluation(dataclasses.replace(later, run_date="2025-03-02"))
    assert nxt.reused == ["000", "001"] and nxt.frames_rendered == 0
    second = RunResults.load(nxt.results_path)
    assert second.evaluations["001"]["reused_from"] == "2025-03-01"
    assert all((nxt.results_path.parent / r.video).is_file() for r in second.persons["001"].values())
    assert "numbers reused from the night of 2025-03-01" in nxt.report_index.read_text()


def test_evaluation_key_follows_model_data_and_settings(tiny_data, tmp_path):
    from cluster.eval_driver.uptodate import evaluation_key

    _, stores, shards = tiny_data
    runs = tmp_path / "runs"
    model = DiffusionAvatarsModel(tiny_config(expression_dim=TINY.expression_dim, init_seed=0))
    model.save_pretrained(runs / "000" / "model")
    config = EvalDriverConfig(runs=runs, shards=shards, stores=stores, reports_root=tmp_path / "r",
                              renderer=RendererConfig(num_inference_steps=2))
    key = evaluation_key(config, "000", "001")
    model.save_pretrained(runs / "000" / "model")  # saved again, same weights (a resume that trained nothing)
    assert evaluation_key(config, "000", "001") == key
    assert evaluation_key(dataclasses.replace(config, renderer=RendererConfig(num_inference_steps=2, num_cpus=2)),
                          "000", "001") == key  # where it renders is not what it renders
    from avatars.configs import RenderOptions

    cached = RendererConfig(num_inference_steps=2, pipeline=RenderOptions(compile_cache=tmp_path / "cc"))
    assert evaluation_key(dataclasses.replace(config, renderer=cached), "000", "001") == key
    assert evaluation_key(dataclasses.replace(config, seed=1), "000", "001") != key
    assert evaluation_key(dataclasses.replace(config, renderer=RendererConfig(num_inference_steps=3)),
                          "000", "001") != key
    assert evaluation_key(config, "000", None) != key  # another cross-reenactment driver
    DiffusionAvatarsModel(tiny_config(expression_dim=TINY.expression_dim, init_seed=1)).save_pretrained(
        runs / "000" / "model")
    retrained = evaluation_key(config, "000", "001")
    assert retrained != key
    copied = tmp_path / "shards"
    shutil.copytree(shards, copied)
    manifest = copied / "000" / "manifest.json"
    manifest.write_text(manifest.read_text().replace("}", "} ", 1))  # the shards were rebuilt
    assert evaluation_key(dataclasses.replace(config, shards=copied), "000", "001") != retrained


def test_an_avatar_is_not_rendered_on_a_base_it_was_not_trained_on(tiny_data, tmp_path):
    """The model records its base's fingerprint; when the base folder now holds something else,
    the person fails with the reason and nothing is rendered (no Ray is started)."""
    import ray

    from common.fingerprint import tree_fingerprint

    _, stores, shards = tiny_data
    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "weights.bin").write_bytes(b"trained on this")
    model = DiffusionAvatarsModel(tiny_config(expression_dim=TINY.expression_dim))
    model.base_model, model.base_fingerprint = str(base), tree_fingerprint(base)
    model.save_pretrained(tmp_path / "runs" / "000" / "model")
    (base / "unet" / "weights.bin").write_bytes(b"pretrained again, other data")
    config = EvalDriverConfig(runs=tmp_path / "runs", shards=shards, stores=stores, reports_root=tmp_path / "r",
                              persons=("000",), run_date="2025-03-01", build_report=False)
    summary = run_evaluation(config)
    assert "not rendered on a base it was not trained on" in summary.failed["000"]
    assert summary.frames_rendered == 0 and not ray.is_initialized()
    results = RunResults.load(summary.results_path)
    assert all("base it was not trained on" in t.skipped["task"] for t in results.persons["000"].values())


class _FakeRenderer:
    """What `EvalRun` calls on a person's renderer handle, without Ray: `info` fails for person
    "bad" (a corrupt checkpoint) and records when each person's rendering starts."""

    def __init__(self, person, started):
        self.person, self.started = person, started
        self.info = self

    def options(self, multiplexed_model_id):
        return _FakeRenderer(multiplexed_model_id, self.started)

    def remote(self, request=None):
        if request is None:  # info.remote()
            if self.person == "bad":
                from cluster.serve.deployment import ModelLoadError

                raise ModelLoadError("bad", "/runs/bad/model", "corrupt")
            return Response({"resolution": 4})
        self.started[self.person].set()
        return Response(RenderResult(np.zeros((4, 4, 3), np.float32), request.key, 1, 0.0))


@pytest.mark.timeout(60)
def test_a_person_being_scored_does_not_hold_up_the_next_persons_rendering(tmp_path):
    import threading
    import time

    from cluster.eval_driver.driver import evaluate_persons
    from cluster.eval_driver.person import EvalRun
    from cluster.report import TaskResult

    persons = ["a", "bad", "b"]
    config = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                              tasks=("self_reenactment",), metrics=("psnr",), parallel_persons=1)
    run = EvalRun(config, tmp_path)
    started = {p: threading.Event() for p in persons}
    conditioning = {k: np.zeros(s, np.float32) for k, s in
                    (("mask", (1, 4, 4)), ("depth", (1, 4, 4)), ("normals", (3, 4, 4)), ("canonical", (5, 4, 4)),
                     ("expression", (2,)))}
    run.task_frames = lambda person, task, driver, resolution: TaskFrames(
        person, task, [Clip("s", ["k0", "k1"], [conditioning, conditioning], None, None)], True)
    rendering, peak, lock = [0], [0], threading.Lock()
    slot = run.render_slot

    def counted_slot():
        held = slot()
        with lock:
            rendering[0] += 1
            peak[0] = max(peak[0], rendering[0])
        time.sleep(0.05)
        release = held.release

        def counted_release():
            with lock:
                if held._held:
                    rendering[0] -= 1
            release()

        held.release = counted_release
        return held

    scored_while_b_rendered = {}

    def evaluate(frames, rendered):  # a's last clip is scored when its frames are back: it waits (up to 10 s) for
        images = [im for _, clip_images in rendered for im in clip_images]  # b's rendering to start
        scored_while_b_rendered[frames.person] = frames.person != "a" or started["b"].wait(10)
        return TaskResult(metrics={"psnr": 1.0}, skipped={}, frames=len(images))

    run.render_slot, run.evaluate = counted_slot, evaluate
    seconds = {}
    out = list(evaluate_persons(run, _FakeRenderer(None, started), persons, dict.fromkeys(persons), seconds))
    out.sort(key=lambda o: persons.index(o[0]))  # as each person finishes
    assert [p for p, _, _ in out] == persons and set(seconds) == set(persons)
    assert out[1][1] is None  # the corrupt checkpoint fails its person only
    assert out[1][2].startswith("ModelLoadError: renderer could not load the avatar of person bad")
    assert out[0][2] is None and out[2][2] is None and out[2][1]["self_reenactment"].frames == 2
    assert scored_while_b_rendered == {"a": True, "b": True}  # b rendered while a was scored
    assert peak[0] == 1 and run.frames_rendered == 4  # never more persons rendering than render slots


def test_frames_already_sent_are_cancelled_when_a_later_task_of_the_person_raises(tmp_path):
    """The first two tasks' frames are in flight when preparing the third raises an error no task expects (a bug,
    not bad data): the person fails with it, and every frame it sent is cancelled, so that the replicas' queues do
    not hold up the other persons with frames nobody will read."""
    from cluster.eval_driver.person import EvalRun

    config = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                              metrics=("psnr",))
    run = EvalRun(config, tmp_path)
    conditioning = {k: np.zeros(s, np.float32) for k, s in
                    (("mask", (1, 4, 4)), ("depth", (1, 4, 4)), ("normals", (3, 4, 4)), ("canonical", (5, 4, 4)),
                     ("expression", (2,)))}

    def rasterizer_bug():
        raise RuntimeError("rasterizer bug")

    def task_frames(person, task, driver, resolution):
        if task == "cross_reenactment":  # its frames are read when its turn comes: the first tasks' are in flight
            return TaskFrames(person, task, [LazyClip("s", ["k0", "k1"], rasterizer_bug)], False)
        return TaskFrames(person, task, [Clip("s", ["k0", "k1"], [conditioning] * 2, None, None)], True)

    sent = []

    class Cancellable(Response):
        def __init__(self):
            super().__init__(None)
            self.cancelled = False
            sent.append(self)

        def cancel(self):
            self.cancelled = True

    class Renderer(_FakeRenderer):
        def options(self, multiplexed_model_id):
            return Renderer(multiplexed_model_id, self.started)

        def remote(self, request=None):
            return Response({"resolution": 4}) if request is None else Cancellable()

    run.task_frames = task_frames
    assert config.tasks[-1] == "cross_reenactment"
    with pytest.raises(RuntimeError, match="rasterizer bug"):
        run.person(Renderer(None, {}), "a", "b")
    assert len(sent) == 4 and all(r.cancelled for r in sent)


@pytest.mark.timeout(60)
def test_parallel_persons_render_that_many_at_once_on_as_many_replicas(tmp_path, monkeypatch):
    """parallel_persons=3, num_replicas=3: 3 replicas (4 models each) are deployed, 3 persons render at once, not 4."""
    import threading

    import ray
    from ray import serve

    from cluster.eval_driver import driver
    from cluster.eval_driver.person import EvalRun
    from cluster.report import TaskResult
    from cluster.serve import deployment

    persons = [f"p{i}" for i in range(6)]
    started = {p: threading.Event() for p in persons}
    deployed, deleted = [], []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a Ray this run joined
    monkeypatch.setattr(deployment, "ensure_serve", lambda: None)
    monkeypatch.setattr(serve, "run", lambda app, name, route_prefix: deployed.append(app)
                        or _FakeRenderer(None, started))
    monkeypatch.setattr(deployment, "delete_renderer", deleted.append)
    conditioning = {k: np.zeros(s, np.float32) for k, s in
                    (("mask", (1, 4, 4)), ("depth", (1, 4, 4)), ("normals", (3, 4, 4)), ("canonical", (5, 4, 4)),
                     ("expression", (2,)))}
    monkeypatch.setattr(EvalRun, "task_frames", lambda self, person, task, driver, resolution: TaskFrames(
        person, task, [Clip("s", ["k0"], [conditioning], None, None)], True))
    monkeypatch.setattr(EvalRun, "evaluate", lambda self, frames, rendered: TaskResult(
        {"psnr": 1.0}, frames=sum(len(images) for _, images in rendered)))
    rendering, peak, lock, fourth, rounds = [0], [0], threading.Lock(), threading.Event(), []

    def all_three_rendering():  # the first time: a 4th person, if it could, has a second to start rendering too
        if not rounds:
            rounds.append(fourth.wait(1.0))

    together = threading.Barrier(3, action=all_three_rendering, timeout=10)  # 2 rounds of 3 persons at once
    slot = EvalRun.render_slot

    def counted_slot(self):
        held = slot(self)
        with lock:
            rendering[0] += 1
            peak[0] = max(peak[0], rendering[0])
            if rendering[0] > 3:
                fourth.set()
        together.wait()
        release = held.release

        def counted_release():
            with lock:
                if held._held:
                    rendering[0] -= 1
            release()

        held.release = counted_release
        return held

    monkeypatch.setattr(EvalRun, "render_slot", counted_slot)
    config = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                              tasks=("self_reenactment",), metrics=("psnr",), parallel_persons=3,
                              renderer=RendererConfig(num_replicas=3))
    results, failed, seconds = {}, {}, {}
    frames = driver._render_all(config, tmp_path, persons, dict.fromkeys(persons), results, failed, seconds, app="t")
    assert failed == {} and sorted(results) == persons and frames == 6
    assert peak[0] == 3 and rounds == [False]
    (app,) = deployed
    assert app._bound_deployment.num_replicas == 3 and app._bound_deployment.init_args[2] == 4
    assert deleted == ["t"]


def test_build_report_false_writes_results_but_no_report(tiny_data, tmp_path, monkeypatch):
    """build_report=False: results.json is written and no report (site/) is built; True builds it."""
    from cluster.eval_driver import driver
    from cluster.report import TaskResult

    _, stores, shards = tiny_data
    DiffusionAvatarsModel(tiny_config(expression_dim=TINY.expression_dim)).save_pretrained(
        tmp_path / "runs" / "000" / "model")

    def render_all(config, folder, todo, drivers, results, failed, person_seconds, app, media_tags=None,
                   on_done=None):
        for p in todo:
            results[p] = {t: TaskResult({"psnr": 20.0}, frames=1) for t in config.tasks}
        return len(todo) * len(config.tasks)

    monkeypatch.setattr(driver, "_render_all", render_all)
    reports = tmp_path / "reports"
    config = EvalDriverConfig(runs=tmp_path / "runs", shards=shards, stores=stores, reports_root=reports,
                              persons=("000",), run_date="2025-03-01", build_report=False)
    summary = run_evaluation(config)
    assert summary.frames_rendered == 3 and summary.results_path.is_file()
    assert summary.report_index is None and not (reports / "site").exists()
    summary = run_evaluation(dataclasses.replace(config, build_report=True))
    assert summary.report_index == reports / "site" / "2025-03-01" / "index.html" and summary.report_index.is_file()


def test_a_failed_task_is_not_up_to_date(tiny_data, tmp_path, monkeypatch):
    """A task that failed (e.g. on a corrupt shard, repaired since: same manifest, same key) is rendered again by
    the next run: its person's key is not stored, and a stored entry with a failed task is not reused."""
    from cluster.eval_driver import driver
    from cluster.eval_driver.uptodate import find_reusables
    from cluster.report import TaskResult

    _, stores, shards = tiny_data
    DiffusionAvatarsModel(tiny_config(expression_dim=TINY.expression_dim)).save_pretrained(
        tmp_path / "runs" / "000" / "model")
    rendered, broken = [], {"self_reenactment"}

    def render_all(config, folder, todo, drivers, results, failed, person_seconds, app, media_tags=None,
                   on_done=None):
        rendered.extend(todo)
        for p in todo:
            results[p] = {t: TaskResult({}, skipped={"task": "failed: corrupt shard"}) if t in broken
                          else TaskResult({"psnr": 20.0}, frames=1) for t in config.tasks}
        return len(todo)

    monkeypatch.setattr(driver, "_render_all", render_all)
    config = EvalDriverConfig(runs=tmp_path / "runs", shards=shards, stores=stores, reports_root=tmp_path / "r",
                              persons=("000",), run_date="2025-03-01", build_report=False)
    first = RunResults.load(run_evaluation(config).results_path)
    assert "key" not in first.evaluations["000"]
    broken.clear()  # the shard was repaired
    again = run_evaluation(config)
    assert again.reused == [] and rendered == ["000", "000"]
    night = RunResults.load(again.results_path)
    key = night.evaluations["000"]["key"]  # every task rendered: up to date from now on
    assert find_reusables(config.reports_root, "2025-03-01", {"000": key}).get("000") is not None
    night.persons["000"]["novel_view"] = TaskResult({}, skipped={"task": "failed: corrupt shard"})
    night.save(config.reports_root)  # as a run before this fix stored it: a key next to a failed task
    assert find_reusables(config.reports_root, "2025-03-01", {"000": key}).get("000") is None


def test_a_cross_reenactment_skipped_for_its_drivers_unusable_data_is_not_up_to_date(tiny_data, tmp_path,
                                                                                      monkeypatch):
    """The driver's shard was corrupt, so the driven person's cross-reenactment was skipped (not failed). Once the
    shard is rebuilt with the same content the evaluation key, which covers the driver's manifest and store, not
    its shards' bytes, is unchanged: the skip must not be reused night after night. No key is stored for it, and a
    stored entry with such a skip (a run before this check) is not reused."""
    from cluster.eval_driver import driver
    from cluster.eval_driver.tasks import driver_unusable
    from cluster.eval_driver.uptodate import find_reusables
    from cluster.report import TaskResult

    _, stores, shards = tiny_data
    DiffusionAvatarsModel(tiny_config(expression_dim=TINY.expression_dim)).save_pretrained(
        tmp_path / "runs" / "000" / "model")
    skip = driver_unusable("000", "001", DataError("shards/001/s.tar", "sha256 does not match the manifest"))
    unusable, rendered = [True], []

    def render_all(config, folder, todo, drivers, results, failed, person_seconds, app, media_tags=None,
                   on_done=None):
        rendered.extend(todo)
        for p in todo:
            results[p] = {t: TaskResult({}, skipped={"task": str(skip)}) if t == "cross_reenactment" and unusable
                          else TaskResult({"psnr": 20.0}, frames=1) for t in config.tasks}
        return len(todo)

    monkeypatch.setattr(driver, "_render_all", render_all)
    config = EvalDriverConfig(runs=tmp_path / "runs", shards=shards, stores=stores, reports_root=tmp_path / "r",
                              persons=("000",), run_date="2025-03-01", build_report=False)
    first = run_evaluation(config)
    assert first.failed == {}  # a skip, not a failure of 000
    assert "key" not in RunResults.load(first.results_path).evaluations["000"]
    unusable.clear()  # the driver's shard was rebuilt
    again = run_evaluation(config)
    assert again.reused == [] and rendered == ["000", "000"]
    night = RunResults.load(again.results_path)
    key = night.evaluations["000"]["key"]
    assert find_reusables(config.reports_root, "2025-03-01", {"000": key}).get("000") is not None
    night.persons["000"]["cross_reenactment"] = TaskResult({}, skipped={"task": str(skip)})
    night.save(config.reports_root)  # a key next to the skip, as a run before this check stored it
    assert find_reusables(config.reports_root, "2025-03-01", {"000": key}).get("000") is None


def test_a_person_whose_tasks_failed_is_failed_and_the_exit_code_says_so(tiny_data, tmp_path, monkeypatch):
    """Every task of 000 failed on its data (nothing rendered): 000 is failed with the first reason and render_eval
    exits 1; 001 with one failed task is failed too, its other tasks keep their numbers."""
    from cluster.eval_driver import driver
    from cluster.report import TaskResult
    from jobs import render_eval

    _, stores, shards = tiny_data
    for p in ("000", "001"):
        DiffusionAvatarsModel(tiny_config(expression_dim=TINY.expression_dim)).save_pretrained(
            tmp_path / "runs" / p / "model")
    broken = {"000": {"self_reenactment", "novel_view", "cross_reenactment"}, "001": {"novel_view"}}

    def render_all(config, folder, todo, drivers, results, failed, person_seconds, app, media_tags=None,
                   on_done=None):
        for p in todo:
            results[p] = {t: TaskResult({}, skipped={"task": f"failed: {p}.zarr is missing"}) if t in broken[p]
                          else TaskResult({"psnr": 20.0}, frames=1) for t in config.tasks}
        return 0

    monkeypatch.setattr(driver, "_render_all", render_all)
    config = EvalDriverConfig(runs=tmp_path / "runs", shards=shards, stores=stores, reports_root=tmp_path / "r",
                              run_date="2025-03-01", build_report=False)
    assert render_eval.main(config) == 1
    summary = run_evaluation(config)
    assert summary.failed == {"000": "3 of 3 tasks failed; self_reenactment: 000.zarr is missing",
                              "001": "1 of 3 tasks failed; novel_view: 001.zarr is missing"}
    night = RunResults.load(summary.results_path)
    assert night.meta["failed_persons"] == "000, 001" and night.persons["001"]["self_reenactment"].metrics
    broken.update({"000": set(), "001": set()})
    assert render_eval.main(config) == 0


def test_a_folder_whose_name_results_cannot_hold_fails_alone_before_anything_renders(tiny_data, tmp_path,
                                                                                     monkeypatch):
    """A stray folder under <runs> ("000 copy", a manual backup) or a bad --persons entry fails alone, named, before
    anything renders; the others are evaluated and results.json is written. Only bad names: invalid input."""
    from cluster.eval_driver import driver
    from cluster.report import TaskResult

    _, stores, shards = tiny_data
    runs = tmp_path / "runs"
    DiffusionAvatarsModel(tiny_config(expression_dim=TINY.expression_dim)).save_pretrained(runs / "000" / "model")
    shutil.copytree(runs / "000", runs / "000 copy")
    rendered = []

    def render_all(config, folder, todo, drivers, results, failed, person_seconds, app, media_tags=None,
                   on_done=None):
        rendered.extend(todo)
        for p in todo:
            results[p] = {t: TaskResult({"psnr": 20.0}, frames=1) for t in config.tasks}
        return len(todo)

    monkeypatch.setattr(driver, "_render_all", render_all)
    config = EvalDriverConfig(runs=runs, shards=shards, stores=stores, reports_root=tmp_path / "r",
                              run_date="2025-03-01", build_report=False)
    summary = run_evaluation(config)
    assert rendered == ["000"] and summary.persons == ["000", "000 copy"] and list(summary.failed) == ["000 copy"]
    assert summary.failed["000 copy"].startswith(f"{runs / '000 copy'}: person name '000 copy' must be letters")
    night = RunResults.load(summary.results_path)
    assert list(night.persons) == ["000"] and night.meta["failed_persons"] == "000 copy"
    summary = run_evaluation(dataclasses.replace(config, persons=("000", "../000"), force=True))
    assert list(summary.failed) == ["../000"] and rendered == ["000", "000"]
    with pytest.raises(DataError, match="no person to evaluate"):
        run_evaluation(dataclasses.replace(config, persons=("000 copy",)))


def test_eval_device_is_where_the_metric_networks_run(tmp_path):
    """EvalDriverConfig.eval_device: the metric networks (here LPIPS) are loaded onto it and the evaluator uses it."""
    from pathlib import Path

    from cluster.eval_driver.person import EvalRun

    weights = Path(__file__).resolve().parents[2] / "weights" / "lpips_alex.safetensors"
    config = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                              metrics=("lpips",), lpips_weights=weights, eval_device="meta")
    evaluator = EvalRun(config, tmp_path)._evaluator.result(timeout=60)
    assert {p.device.type for p in evaluator._lpips.parameters()} == {"meta"}
    assert evaluator.config.device == "meta" and evaluator.config.lpips.device == "meta"


class _Centroid(torch.nn.Module):
    """Landmark 'model' (--landmark-model contract): the intensity-weighted centroid (x, y in pixels), K = 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(1)
        total = w.sum((1, 2))
        cy = (w.sum(2) * torch.arange(w.shape[1], dtype=w.dtype)).sum(1) / total
        cx = (w.sum(1) * torch.arange(w.shape[2], dtype=w.dtype)).sum(1) / total
        return torch.stack([cx, cy], -1)[:, None, :]


class _MeanColour(torch.nn.Module):
    """Face-identity 'model' (--face-id-model contract): the mean colour as a 3-d embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def _scored_by_the_driver(tmp_path, *flags: str) -> dict:
    """render_eval's command line (tyro, as its __main__ parses it) with ``flags``, then the metric networks of
    the EvalRun it starts (what each person's frames are scored with) on a red square moved by (4, 3) pixels
    whose second frame also turns green."""
    import tyro

    from cluster.eval_driver.person import EvalRun

    config = tyro.cli(EvalDriverConfig, args=[
        "--runs", str(tmp_path), "--shards", str(tmp_path), "--stores", str(tmp_path), "--reports-root",
        str(tmp_path), "--metrics", "psnr", "akd", "csim", *flags])
    gt = np.zeros((2, 32, 32, 3), np.uint8)
    pred = np.zeros_like(gt)
    gt[:, 10:14, 10:14] = (255, 0, 0)
    pred[:, 13:17, 14:18] = (255, 0, 0)
    pred[1, 13:17, 14:18] = (0, 255, 0)
    return EvalRun(config, tmp_path / "run")._evaluator.result(timeout=60).evaluate_video(gt, pred)


def test_face_id_model_makes_the_driver_compute_csim(tmp_path):
    """render_eval --face-id-model: CSIM is computed from the model (1 for the same colour, 0 for another), not
    skipped; without it, skipped with the reason naming the flag."""
    from avatars.evaluation.face_models import CSIM_SKIPPED

    model = tmp_path / "faceid.pt"
    torch.jit.script(_MeanColour()).save(str(model))
    out = _scored_by_the_driver(tmp_path, "--face-id-model", str(model))
    assert "csim" not in out["skipped"]
    np.testing.assert_allclose(out["metrics"]["csim"]["per_frame"], [1.0, 0.0], atol=1e-5)
    assert _scored_by_the_driver(tmp_path)["skipped"]["csim"] == CSIM_SKIPPED


def test_landmark_model_makes_the_driver_compute_akd(tmp_path):
    """render_eval --landmark-model: AKD is computed from the model (the square moved by 5 pixels), not skipped;
    without it, skipped with the reason naming the flag."""
    from avatars.evaluation.face_models import AKD_SKIPPED

    model = tmp_path / "landmarks.pt"
    torch.jit.script(_Centroid()).save(str(model))
    out = _scored_by_the_driver(tmp_path, "--landmark-model", str(model))
    assert "akd" not in out["skipped"]
    np.testing.assert_allclose(out["metrics"]["akd"]["per_frame"], [5.0, 5.0], atol=1e-4)
    assert _scored_by_the_driver(tmp_path)["skipped"]["akd"] == AKD_SKIPPED


def test_cross_reenactment_by_a_driver_whose_data_does_not_read_is_skipped_not_failed(tiny_data, tmp_path):
    """The driver's shards are missing: the driven person's avatar and data are fine, so its cross-reenactment is
    skipped with the driver's reason (the driver's own tasks fail on it), not failed against the driven person."""
    _, stores, shards = tiny_data
    only_a = tmp_path / "shards"
    shutil.copytree(shards / "000", only_a / "000")
    with pytest.raises(DataError, match="001/manifest.json: shard manifest is missing"):
        self_reenactment(open_store(stores, "001"), only_a, R)  # what the driver's own task fails with
    with pytest.raises(TaskSkipped, match="cross-reenactment of 000 by 001 is skipped: 001's data is unusable"):
        cross_reenactment(open_store(stores, "000"), open_store(stores, "001"), only_a, R)
    # the driver's store does not open (removed, or refused as damaged): skipped the same way, through EvalRun
    from cluster.eval_driver.person import EvalRun

    only_a_store = tmp_path / "stores"
    only_a_store.mkdir()
    (only_a_store / "000.zarr").symlink_to(stores / "000.zarr")
    config = EvalDriverConfig(runs=tmp_path, shards=shards, stores=only_a_store, reports_root=tmp_path,
                              metrics=("psnr",))
    with pytest.raises(TaskSkipped, match="cross-reenactment of 000 by 001 is skipped: 001's data is unusable"):
        EvalRun(config, tmp_path / "run").task_frames("000", "cross_reenactment", "001", R)


def test_a_run_stopped_before_it_saves_leaves_the_nights_videos_alone(tmp_path, monkeypatch):
    """Videos and thumbnails are written into the night folder as each person is scored, results.json at the end:
    a run that rendered a person with other inputs (a retrained avatar) and then stopped (time limit, Ctrl-C, a
    full disk) replaced the videos the night's results.json references: the report showed one model's numbers
    beside another's videos, and a later run with the first key reused the mixed set. They are named by the
    evaluation key now; a completed run removes the person's files it no longer references."""
    from cluster.eval_driver import driver
    from cluster.eval_driver.person import EvalRun

    (tmp_path / "runs" / "000" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "000" / "model" / "config.json").write_text("{}")
    config = EvalDriverConfig(runs=tmp_path / "runs", shards=tmp_path, stores=tmp_path,
                              reports_root=tmp_path / "reports", persons=("000",), tasks=("cross_reenactment",),
                              metrics=("psnr",), run_date="2025-03-01", build_report=False, force=True)
    monkeypatch.setattr(driver, "_base_problem", lambda *a: None)
    monkeypatch.setattr(driver, "cross_drivers", lambda persons, stores: {p: None for p in persons})
    key = {"value": "a" * 64}
    monkeypatch.setattr(driver, "evaluation_key", lambda *a: key["value"])
    zero = lambda c: np.zeros((c, 4, 4), np.float32)  # noqa: E731
    conditioning = {"mask": zero(1), "depth": zero(1), "normals": zero(3), "canonical": zero(5)}

    def render_all(config, folder, todo, drivers, results, failed, person_seconds, app, media_tags, on_done=None,
                   stop=False):
        run = EvalRun(config, folder, media_tags)  # the real writer of the videos and thumbnails
        shade = 0.2 if key["value"][0] == "a" else 0.8
        frames = TaskFrames("000", "cross_reenactment", [Clip("s", ["k0", "k1"], [conditioning] * 2,
                                                               np.full((2, 4, 4, 3), shade, np.float32), None)],
                            has_ground_truth=False)
        images = [np.full((4, 4, 3), shade, np.float32)] * 2
        results["000"] = {"cross_reenactment": run.evaluate(frames, iter([(frames.clips[0], images)]))}
        if stop:
            raise KeyboardInterrupt  # stopped after the person's videos, before results.json
        return 2

    monkeypatch.setattr(driver, "_render_all", render_all)
    first = run_evaluation(config)
    folder = first.results_path.parent
    video = folder / RunResults.load(first.results_path).persons["000"]["cross_reenactment"].video
    thumbnail = folder / RunResults.load(first.results_path).persons["000"]["cross_reenactment"].thumbnail
    kept = video.read_bytes(), thumbnail.read_bytes()

    key["value"] = "b" * 64  # the avatar was retrained; this run stops before it saves
    monkeypatch.setattr(driver, "_render_all", lambda *a, **kw: render_all(*a, **kw, stop=True))
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(config)
    assert (video.read_bytes(), thumbnail.read_bytes()) == kept  # what results.json references is untouched

    monkeypatch.setattr(driver, "_render_all", render_all)
    second = run_evaluation(config)  # completes: references its own files; the first run's go
    now = RunResults.load(second.results_path).persons["000"]["cross_reenactment"]
    assert (folder / now.video).is_file() and (folder / now.thumbnail).is_file() and now.video != video.name
    assert not video.exists() and not thumbnail.exists()
    assert sorted(p.name for p in (folder / "videos" / "000").iterdir()) == [Path(now.video).name]


@pytest.mark.parametrize("metric, module, install", [("jod", "pyfvvdp", "pip install pyfvvdp==1.2.2"),
                                                     ("cvvdp", "pycvvdp", "pip install cvvdp==0.5.7")])
def test_a_metric_whose_package_is_not_installed_is_refused_when_the_config_is_built(tmp_path, monkeypatch, metric,
                                                                                     module, install):
    """jod / cvvdp without their package: refused naming --metrics and the package when the command line is
    parsed (exit code 2), not found when the metric networks load; before, every person rendered its whole
    evaluation set first, then failed on it (exit code 1 after hours)."""
    import importlib.util
    import sys

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    monkeypatch.delitem(sys.modules, module, raising=False)
    paths = dict(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path)
    with pytest.raises(ValueError, match=rf"--metrics {metric} needs .*\(the {module} package\).*{install}, or drop"):
        EvalDriverConfig(**paths, metrics=("psnr", metric))
    assert EvalDriverConfig(**paths, metrics=("psnr",)).metrics == ("psnr",)  # not needed: not looked for


def test_renderer_resources_ray_would_refuse_are_refused_when_the_config_is_built():
    """--renderer.num-cpus -3 (or NaN), a negative GPU share or batch wait: refused when the config is built;
    before, Ray refused them when the renderer deployed, after the evaluation's Ray had started."""
    for name, bad in (("num_cpus", -3.0), ("num_cpus", float("nan")), ("num_gpus", -1.0),
                      ("batch_wait_timeout_s", -0.1), ("batch_wait_timeout_s", float("inf"))):
        with pytest.raises(ValueError, match=rf"{name} must be a number >= 0, got {bad}"):
            RendererConfig(**{name: bad})
    assert RendererConfig(num_cpus=0, num_gpus=0.5, batch_wait_timeout_s=0).num_cpus == 0  # Ray takes these


def test_a_metric_network_that_does_not_load_stops_the_run_before_any_person_renders(tmp_path, monkeypatch,
                                                                                      capsys):
    """--landmark-model names a file that passes the up-front look (a zip archive) but is no TorchScript (a
    torch.save'd state dict): the metric networks load while the renderer deploys, and the run stops once it
    is deployed, before the first person renders: render_eval's exit code 2 with one line naming the file, no
    results.json, the renderer application deleted. Before, the load error was read only when a person's
    frames were scored: every person rendered its evaluation set and failed (exit code 1 after hours)."""
    from cluster.eval_driver import driver
    from cluster.eval_driver.person import EvalRun
    from cluster.serve import deployment
    from jobs import render_eval

    for p in ("000", "001"):
        (tmp_path / "runs" / p / "model").mkdir(parents=True)
        (tmp_path / "runs" / p / "model" / "config.json").write_text("{}")
    model = tmp_path / "landmarks.pt"
    torch.save({"weight": torch.zeros(2)}, model)
    config = EvalDriverConfig(runs=tmp_path / "runs", shards=tmp_path, stores=tmp_path,
                              reports_root=tmp_path / "reports", tasks=("self_reenactment",), metrics=("psnr", "akd"),
                              landmark_model=model, run_date="2025-03-01", build_report=False)
    monkeypatch.setattr(driver, "_base_problem", lambda *a: None)
    monkeypatch.setattr(driver, "evaluation_key", lambda *a: "a" * 64)
    steps = []
    monkeypatch.setattr(driver, "connect_ray", lambda *a, **kw: steps.append("ray") or True)
    monkeypatch.setattr(driver, "leave_ray", lambda address, started, app: steps.append(f"left {app[:8]}"))
    monkeypatch.setattr(deployment, "deploy_renderer", lambda models, *a, **kw: steps.append("deployed") or object())
    monkeypatch.setattr(EvalRun, "person", lambda self, handle, person, drv: steps.append(person) or {})

    assert render_eval.main(config) == 2
    err = capsys.readouterr().err.splitlines()
    assert steps == ["ray", "deployed", "left avatars-"]  # no person rendered
    assert err[-1].startswith(f"render_eval: the metric networks did not load, nothing was rendered: ValueError: "
                              f"{model}: not a TorchScript landmark model (--landmark-model expects"), err
    assert not (tmp_path / "reports" / "runs" / "2025-03-01" / "results.json").exists()


def test_two_evaluations_of_one_night_saving_at_once_keep_both_persons(tmp_path, monkeypatch):
    """Each run read the night's results.json, merged its persons over it and wrote it: without the lock on the
    night's folder, the later write dropped the persons the earlier one had just saved."""
    import threading
    import time

    from cluster.eval_driver import driver
    from cluster.report import TaskResult, run_dir

    config = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path / "reports",
                              build_report=False)
    folder = run_dir(config.reports_root, "2026-11-29")
    real_load = driver._load_night

    def slow_load(path):  # both runs read before either writes, when nothing orders them
        night = real_load(path)
        time.sleep(0.3)
        return night

    monkeypatch.setattr(driver, "_load_night", slow_load)

    def save(person):
        night = RunResults("2026-11-29", {person: {"self_reenactment": TaskResult({"psnr": 20.0}, frames=1)}},
                           {}, {person: {"run_id": person}})
        driver._save_night(config, folder, night, [], rendered=[person], started=time.time())

    threads = [threading.Thread(target=save, args=(p,)) for p in ("000", "001")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(RunResults.load(folder / "results.json").persons) == ["000", "001"]
