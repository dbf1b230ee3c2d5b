"""Comparison mp4: written atomically, readable, right size, frame count and content."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from avatars.evaluation.video import buffers_to_rgb, read_video, side_by_side, write_comparison_video


def _panels(t: int = 5, h: int = 33, w: int = 31) -> list[np.ndarray]:
    gt = np.zeros((t, h, w, 3), np.uint8)
    gt[..., 0] = 200
    render = np.zeros_like(gt)
    render[..., 1] = 180
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (h / 3) ** 2
    normals = np.zeros((h, w, 3), np.float32)
    normals[..., 2] = 1.0
    depth = np.where(mask, 1.0 + xx / w, 0.0).astype(np.float32)
    canonical = np.stack([xx / w, yy / h, np.zeros_like(xx, float), np.ones_like(xx, float)], -1).astype(np.float32)
    buffers = [buffers_to_rgb(normals=normals, depth=depth, canonical=canonical, mask=mask) for _ in range(t)]
    buf_video = np.stack([np.concatenate(b, axis=1) for b in buffers])
    return [gt, render, buf_video]


def test_buffers_to_rgb_visualisation() -> None:
    h, w = 8, 10
    mask = np.zeros((h, w), bool)
    mask[2:6, 2:8] = True
    depth = np.where(mask, np.linspace(1, 2, w)[None].repeat(h, 0), 0).astype(np.float32)
    n, d, c = buffers_to_rgb(normals=np.dstack([np.zeros((h, w, 2)), np.ones((h, w))]), depth=depth,
                             canonical=np.random.default_rng(0).random((h, w, 5)), mask=mask)
    assert n.dtype == np.uint8 and n.shape == (h, w, 3)
    assert tuple(n[3, 3]) == (128, 128, 255) and tuple(n[0, 0]) == (0, 0, 0)
    assert d[3, 2, 0] == 255 and d[3, 7, 0] == 51 and d[0, 0, 0] == 0  # near bright, far dark
    assert c[mask].min() == 0 and c[mask].max() == 255 and c[~mask].max() == 0


def test_write_and_read_back_comparison_video(tmp_path: Path) -> None:
    panels = _panels()
    expected = side_by_side(panels)
    out = write_comparison_video(tmp_path / "p1" / "self_reenactment.mp4", panels, fps=10)
    assert out.is_file() and list(out.parent.glob(".*")) == []  # temp file renamed away
    frames = read_video(out)
    t, h, w = expected.shape[:3]
    assert frames.shape == (t, h + h % 2, w + w % 2, 3)  # padded to even sizes for yuv420p
    diff = np.abs(frames[:, :h, :w].astype(int) - expected.astype(int))
    assert diff.mean() < 6, diff.mean()
    # the gt panel is red, the render panel green
    assert frames[0, h // 2, 3, 0] > 150 and frames[0, h // 2, 3, 1] < 60
    assert frames[0, h // 2, 31 + 3, 1] > 130 and frames[0, h // 2, 31 + 3, 0] < 60


def test_panels_must_agree() -> None:
    a = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="panel 1"):
        side_by_side([a, np.zeros((3, 8, 8, 3), np.uint8)])


def test_a_video_ffmpeg_cut_off_is_refused_and_not_renamed_into_place(tmp_path: Path, monkeypatch) -> None:
    """imageio does not read ffmpeg's exit code: a file cut off after the last frame was handed over
    (ffmpeg killed, the disk full while x264 flushed its look-ahead and the index) looked finished."""
    import imageio.v2 as imageio

    real_get_writer = imageio.get_writer

    def cut_off_at_close(uri, *args, **kwargs):
        writer = real_get_writer(uri, *args, **kwargs)
        close = writer.close

        def close_then_cut():
            close()
            os.truncate(uri, os.path.getsize(uri) // 2)

        writer.close = close_then_cut
        return writer

    monkeypatch.setattr(imageio, "get_writer", cut_off_at_close)
    target = tmp_path / "p1" / "self_reenactment.mp4"
    with pytest.raises(OSError, match="video") as info:
        write_comparison_video(target, _panels(t=12), fps=10)
    assert info.value.filename == str(target)
    assert list(target.parent.iterdir()) == []  # nothing under the final name, no temporary left


def test_a_streamed_video_is_written_block_by_block_and_refuses_another_frame_size(tmp_path: Path) -> None:
    """comparison_video takes a task's clips as they are scored: the blocks make one video; a block of another size
    (or not (T, H, W, 3)) is refused naming the file, and nothing is left at its path."""
    from avatars.evaluation.video import comparison_video

    target = tmp_path / "p1" / "novel_view.mp4"
    with comparison_video(target, fps=10) as video:
        video.append(side_by_side(_panels(t=5)))
        video.append(side_by_side(_panels(t=7)))
    assert read_video(target).shape[0] == 12 and video.frames == 12

    other = tmp_path / "p1" / "self_reenactment.mp4"
    for bad, match in ((np.zeros((3, 8, 8, 3), np.uint8), "frames of 8x8 px after frames of"),
                       (np.zeros((3, 8, 8), np.uint8), r"frames must be \(T, H, W, 3\)")):
        with pytest.raises(ValueError, match=match) as e:
            with comparison_video(other, fps=10) as video:
                video.append(side_by_side(_panels(t=4)))
                video.append(bad)
        assert str(other) in str(e.value)
        assert sorted(p.name for p in other.parent.iterdir()) == ["novel_view.mp4"]  # no temporary file either
