"""A person's evaluation reads its frames a clip at a time as they render, not its whole evaluation set up front (at
512 px ~15 MB a frame: a real person's thousands of held-out and novel-view frames were tens of GB in the driver);
a clip that does not read when its turn comes fails its task only. Stand-in renderer, no Ray."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from renderer_stand_ins import GreyRenderer

from avatars.data import shard_dataset
from avatars.evaluation.metrics import Evaluator
from cluster.eval_driver import EvalDriverConfig
from cluster.eval_driver.person import EvalRun
from cluster.eval_driver.tasks import DRIVER_UNUSABLE, Clip, LazyClip, TaskFrames, driver_unusable
from cluster.serve.renderer import RendererConfig
from common.io import DataError
from shards.testing import TINY, build_tiny


@pytest.fixture(scope="module")
def longer_data(tmp_path_factory) -> tuple[Path, Path, Path]:
    """One tiny person with 4 sequences of 6 frames: 1 held-out clip and 3 novel-view clips of 6 frames."""
    return build_tiny(tmp_path_factory.mktemp("longer"), dataclasses.replace(TINY, persons=1, sequences=4, frames=6))


def test_a_persons_frames_are_read_a_clip_at_a_time_as_they_render(longer_data, tmp_path, monkeypatch):
    """Every frame of every task was read (decoded, resized, held as float32) before the first was sent; now a
    task's clips are read as their frames are due, so at any time the person holds at most the clip being scored and
    the one its frames in flight come from."""
    _, stores, shards = longer_data
    reads, scored, most_held = [0], [0], [0]
    getitem = shard_dataset.ShardDataset.__getitem__

    def counted_getitem(self, i):
        reads[0] += 1
        most_held[0] = max(most_held[0], reads[0] - scored[0])
        return getitem(self, i)

    evaluate_video = Evaluator.evaluate_video

    def counted_evaluate_video(self, gt, pred, *args):
        out = evaluate_video(self, gt, pred, *args)
        scored[0] += len(gt)
        return out

    monkeypatch.setattr(shard_dataset.ShardDataset, "__getitem__", counted_getitem)
    monkeypatch.setattr(Evaluator, "evaluate_video", counted_evaluate_video)
    config = EvalDriverConfig(runs=tmp_path, shards=shards, stores=stores, reports_root=tmp_path,
                              tasks=("self_reenactment", "novel_view"), metrics=("psnr",),
                              renderer=RendererConfig(max_batch_size=1))  # 4 frames in flight
    run = EvalRun(config, tmp_path / "run")

    frames = run.task_frames("000", "novel_view", None, 32)
    assert reads[0] == 0 and [c.frames for c in frames.clips] == [6, 6, 6]  # the keys only

    results = run.person(GreyRenderer(32), "000", None)
    assert {t: r.frames for t, r in results.items()} == {"self_reenactment": 6, "novel_view": 18}
    assert all(r.metrics["psnr"] is not None for r in results.values())
    assert reads[0] == scored[0] == 24 and run.frames_rendered == 24
    assert most_held[0] <= 12, most_held  # before: 24, everything before the first frame was scored
    for task in ("self_reenactment", "novel_view"):
        assert (tmp_path / "run" / "videos" / "000" / f"{task}.mp4").is_file()
        assert (tmp_path / "run" / "thumbnails" / "000" / f"{task}.png").is_file()


def _clip(sequence: str, frames: int, size: int = 8) -> Clip:
    zero = lambda c: np.zeros((c, size, size), np.float32)  # noqa: E731
    conditioning = {"mask": zero(1) + 1, "depth": zero(1), "normals": zero(3), "canonical": zero(5),
                    "expression": np.zeros(2, np.float32)}
    keys = [f"000/{sequence}/frame_{t:05d}/cam_1" for t in range(frames)]
    return Clip(sequence, keys, [conditioning] * frames, np.full((frames, size, size, 3), 0.5, np.float32),
                np.ones((frames, size, size), np.float32))


@pytest.mark.parametrize("broken", ["data", "driver"])
def test_a_clip_that_does_not_read_when_its_turn_comes_fails_its_task_only(tmp_path, broken):
    """The second clip of the first task does not read (a damaged shard found when its frames are read; or, for the
    cross-reenactment, the driving person's frames): that task fails (is skipped) with the reason and no video of it
    is left, the first clip's frames and the next task's are rendered and scored."""
    config = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                              tasks=("self_reenactment", "novel_view"), metrics=("psnr",),
                              renderer=RendererConfig(max_batch_size=1))
    run = EvalRun(config, tmp_path / "run")
    shard = tmp_path / "shards" / "000" / "test_seq-000001.tar"

    def unreadable() -> Clip:
        if broken == "data":
            raise DataError(shard, "corrupt sample 000/b/frame_00000/cam_1")
        raise driver_unusable("000", "001", DataError(shard, "corrupt"))

    loads = []

    def lazy(clip: Clip) -> LazyClip:
        return LazyClip(clip.sequence, clip.keys, lambda: loads.append(clip.sequence) or clip)

    tasks = {"self_reenactment": [lazy(_clip("a", 3)), LazyClip("b", [f"b{i}" for i in range(3)], unreadable),
                                  lazy(_clip("c", 3))],
             "novel_view": [lazy(_clip("d", 3)), lazy(_clip("e", 2))]}
    run.task_frames = lambda person, task, driver, resolution: TaskFrames(person, task, tasks[task], True)

    results = run.person(GreyRenderer(8), "000", None)
    first, second = results["self_reenactment"], results["novel_view"]
    if broken == "data":
        assert first.failed and first.skipped["task"] == f"failed: {shard}: corrupt sample 000/b/frame_00000/cam_1"
    else:
        assert not first.failed and DRIVER_UNUSABLE in first.skipped["task"]
    assert loads == ["a", "d", "e"]  # the clip after the broken one is not read
    assert second.frames == 5 and second.metrics["psnr"] is not None
    videos = sorted(p.name for p in (tmp_path / "run" / "videos" / "000").iterdir())
    assert videos == ["novel_view.mp4"]  # no half-written video of the failed task
    assert run.frames_rendered == 8  # the first clip's frames came back too


def test_a_clip_whose_frames_differ_from_its_keys_is_refused():
    """A clip loaded with other frames than planned would pair renders with the wrong ground truth."""
    with pytest.raises(RuntimeError, match="clip a loaded 2 frames other than its 3 planned ones"):
        LazyClip("a", ["x", "y", "z"], lambda: _clip("a", 2)).load()

