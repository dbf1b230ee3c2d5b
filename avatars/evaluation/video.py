"""Side-by-side comparison videos (ground truth | render | rasterized buffers) as H.264 mp4.

Written with ffmpeg through imageio-ffmpeg (libx264, yuv420p so every browser plays it).
yuv420p needs even width and height, so frames are padded (edge-replicated) by at most one
pixel instead of being resized. The file is written to a temporary sibling, its frames counted,
and renamed, so the report never links a half-written video. :func:`comparison_video` takes the
frames a block at a time (the evaluation's clips as they are scored): no video is held whole.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from common.io import atomic_file


def _to_u8(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _normalize_valid(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Min-max normalise per channel over the valid pixels; invalid pixels become 0."""
    out = np.zeros_like(x, dtype=np.float32)
    if valid.any():
        v = x[valid]
        lo, hi = v.min(axis=0), v.max(axis=0)
        out[valid] = (v - lo) / np.maximum(hi - lo, 1e-8)
    return out


def buffers_to_rgb(
    normals: np.ndarray | None = None,
    depth: np.ndarray | None = None,
    canonical: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Turn rasterizer buffers of one frame into uint8 RGB panels (H, W, 3), in the order given.

    normals: (H, W, 3) unit vectors in [-1, 1] -> (n + 1) / 2.
    depth: (H, W); near is bright, far dark, normalised over valid pixels (mask, or depth > 0 and finite).
    canonical: (H, W, C>=3) canonical coordinates; first 3 dims min-max normalised over valid pixels.
    mask: (H, W) foreground; pixels outside are black in every panel.
    """
    panels: list[np.ndarray] = []
    ref = next((b for b in (normals, depth, canonical) if b is not None), None)
    if ref is None:
        return panels
    h, w = ref.shape[:2]
    m = np.ones((h, w), bool) if mask is None else np.asarray(mask).reshape(h, w) > 0.5
    if normals is not None:
        n = (np.asarray(normals, np.float32)[..., :3] + 1.0) / 2.0
        panels.append(_to_u8(n * m[..., None]))
    if depth is not None:
        d = np.asarray(depth, np.float32).reshape(h, w)
        valid = m & np.isfinite(d) & (d > 0)
        dn = _normalize_valid(d[..., None], valid)[..., 0]
        vis = np.where(valid, 1.0 - 0.8 * dn, 0.0)  # near = 1.0, far = 0.2, background = 0
        panels.append(_to_u8(np.repeat(vis[..., None], 3, axis=-1)))
    if canonical is not None:
        c = np.asarray(canonical, np.float32)[..., :3]
        valid = m & np.isfinite(c).all(-1)
        panels.append(_to_u8(_normalize_valid(c, valid)))
    return panels


def _pad_even(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def side_by_side(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate (T, H, W, 3) panel videos horizontally into one (T, H, sum W, 3) uint8 video."""
    vids = [_to_u8(p) for p in panels]
    if not vids:
        raise ValueError("side_by_side needs at least one panel")
    t, h = vids[0].shape[0], vids[0].shape[1]
    for i, v in enumerate(vids):
        if v.ndim != 4 or v.shape[-1] != 3 or v.shape[0] != t or v.shape[1] != h:
            raise ValueError(f"panel {i} has shape {v.shape}; all panels need (T={t}, H={h}, W, 3)")
    return np.concatenate(vids, axis=2)


class VideoFrames:
    """What :func:`comparison_video` yields: append (T, H, W, 3) blocks of frames of one size."""

    def __init__(self, writer, path: Path):
        self._writer, self._path = writer, path
        self.frames = 0
        self._size: tuple[int, int] | None = None

    def append(self, video: np.ndarray) -> None:
        video = _to_u8(video)
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"{self._path}: frames must be (T, H, W, 3), got {video.shape}")
        if self._size is None:
            self._size = video.shape[1:3]
        elif video.shape[1:3] != self._size:
            raise ValueError(f"{self._path}: frames of {video.shape[1]}x{video.shape[2]} px after frames of "
                             f"{self._size[0]}x{self._size[1]} px (one video has one size)")
        for frame in video:
            self._writer.append_data(_pad_even(frame))
        self.frames += len(video)


@contextlib.contextmanager
def comparison_video(path: Path | str, fps: float = 73.0 / 3.0, quality: int = 8) -> Iterator[VideoFrames]:
    """An H.264 mp4 at `path` whose frames the block appends (:class:`VideoFrames`), renamed into place with its
    frames counted when the block ends, removed when it raises. quality: imageio-ffmpeg's 0..10 (10 = best)."""
    import imageio.v2 as imageio

    path = Path(path)
    # world-readable: the report copies and serves these to others
    with atomic_file(path, mode=0o644) as tmp:
        writer = imageio.get_writer(
            str(tmp), format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
            quality=quality, macro_block_size=1, ffmpeg_log_level="error",
        )
        frames = VideoFrames(writer, path)
        try:
            yield frames
        finally:
            writer.close()
        _check_complete(tmp, path, frames.frames)


def write_comparison_video(
    path: Path | str, panels: Sequence[np.ndarray], fps: float = 73.0 / 3.0, quality: int = 8
) -> Path:
    """Write panels (e.g. [gt, render, *buffers], each (T, H, W, 3)) side by side as an H.264 mp4.

    quality: imageio-ffmpeg's 0..10 scale (10 = best). Returns the final path.
    """
    with comparison_video(path, fps, quality) as video:
        video.append(side_by_side(panels))
    return Path(path)


def _check_complete(written: Path, path: Path, frames: int) -> None:
    """imageio's writer never reads ffmpeg's exit code, and x264 writes most of a short clip (and the
    mp4 index) after its last frame is handed over: an ffmpeg killed then, or a disk that filled then,
    left a cut-off file that was renamed into place as finished (and reused by later nights). Counting
    the frames copies the stream without decoding it."""
    import imageio_ffmpeg

    try:
        count, _ = imageio_ffmpeg.count_frames_and_secs(str(written))
    except (RuntimeError, OSError):  # its message is ffmpeg's banner
        raise OSError(errno.EIO, "ffmpeg wrote a video it cannot read back (cut off?)", str(path)) from None
    if count != frames:
        raise OSError(errno.EIO, f"ffmpeg wrote an incomplete video ({count} of {frames} frames)", str(path))


def read_video(path: Path | str) -> np.ndarray:
    """Decode an mp4 into (T, H, W, 3) uint8 frames (used by tests and the report thumbnails)."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()
