"""One person's evaluation: its task frames, renders on the renderer application, metrics,
comparison video and thumbnail (:class:`EvalRun`). The driver (:mod:`cluster.eval_driver.driver`)
decides whom to evaluate and runs these, a thread per person.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from cluster.eval_driver.stream import (
    BATCHES_IN_FLIGHT,
    REPLICA_LOST_RETRIES,
    ClipUnreadable,
    FrameStream,
    RenderSlot,
    ReplicaLost,
    first_line,
    replica_lost_errors,
)
from cluster.eval_driver.tasks import (
    DATA_ERRORS,
    Clip,
    TaskFrames,
    TaskSkipped,
    cross_reenactment,
    driver_unusable,
    novel_view,
    open_store,
    self_reenactment,
)
from cluster.report import TaskResult
from common.io import DataError, atomic_write_bytes

if TYPE_CHECKING:
    from cluster.eval_driver.driver import EvalDriverConfig

log = logging.getLogger(__name__)
#: A person's trained model: ``<runs>/<person>/model``.
MODEL_DIR = "model"


class FrameTimeout(RuntimeError):
    """A person's model load or one of its frames did not come back within ``--frame-timeout-s`` (a hung replica, a
    model load stuck on a dead file system): the person fails alone, its frames are cancelled."""


class MetricsUnavailable(RuntimeError):
    """The metric networks did not load (a --landmark-model or --face-id-model that is no TorchScript, an
    --eval-device that is not there, a metric's package that does not import): a bad setting, found before any
    person rendered (:meth:`EvalRun.wait_for_metrics`)."""


def merge_evaluations(evals: list[dict]) -> dict:
    """Combine per-clip `Evaluator.evaluate_video` outputs into one task result.

    Per-frame metrics: frames concatenated, mean over the frames with a finite value (an empty
    mask's NaN and a perfect PSNR's +inf would wipe out the others; see `Evaluator`); how many were
    left out is noted in ``skipped["<metric> frames"]``. Video-level metrics (JOD): mean over clips
    (each clip is one video), over the finite ones likewise."""
    names = list(dict.fromkeys(n for e in evals for n in e["metrics"]))
    metrics = {}
    skipped = {k: v for e in evals for k, v in e.get("skipped", {}).items()}
    for n in names:
        parts = [e["metrics"][n] for e in evals if n in e["metrics"]]
        if all(p["per_frame"] is not None for p in parts):
            per_frame = [v for p in parts for v in p["per_frame"]]
            defined = _finite(per_frame)
            metrics[n] = {"mean": float(np.mean(defined)) if defined else None, "per_frame": per_frame}
            if len(defined) < len(per_frame):
                skipped[f"{n} frames"] = (f"{n}: {len(per_frame) - len(defined)} of {len(per_frame)} frames left out "
                                          "of the mean (no finite value: an empty mask, or identical frames' +inf)")
        else:
            means = _finite([p["mean"] for p in parts])
            metrics[n] = {"mean": float(np.mean(means)) if means else None, "per_frame": None}
    return {"frames": sum(e["frames"] for e in evals), "metrics": metrics, "skipped": skipped}


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and np.isfinite(v)]


def comparison_panels(clip: Clip, renders: list[np.ndarray]) -> list[np.ndarray]:
    """[reference, render, normals, depth, canonical] videos (T, H, W, 3) of one clip."""
    from avatars.evaluation.video import buffers_to_rgb

    buffers = [buffers_to_rgb(normals=cond["normals"].transpose(1, 2, 0), depth=cond["depth"][0],
                              canonical=cond["canonical"].transpose(1, 2, 0), mask=cond["mask"][0])
               for cond in clip.conditioning]
    return [clip.reference, np.stack(renders)] + [np.stack([b[i] for b in buffers]) for i in range(len(buffers[0]))]


def video_fps(frames: int, fps: float, min_seconds: float, min_fps: float) -> float:
    """`fps`, or slower (not below `min_fps`) so that `frames` last at least `min_seconds` (0: no minimum)."""
    if not frames or min_seconds <= 0:
        return fps
    return max(min_fps, min(fps, frames / min_seconds))


def strip_picks(frames: int, columns: int = 6) -> list[int]:
    """Which of a task's `frames` the thumbnail shows: up to `columns` spread over the task."""
    return sorted(set(np.linspace(0, frames - 1, num=min(columns, frames)).round().astype(int).tolist()))


def comparison_strip(references: list[np.ndarray], renders: list[np.ndarray], scale: int = 2,
                     max_width: int = 1536) -> bytes:
    """PNG of the picked frames (:func:`strip_picks`): reference row over render row, each frame enlarged up to
    `scale` times (nearest), so eyes and mouth are visible in the report, as far as the strip stays within
    `max_width` pixels; a strip wider than that at its frames' own size is scaled down to it (area average). 64 px
    frames: 768x256 (2x); 512 px: 1536x512 (half size; 2x was 6144x2048, ~4 MB a thumbnail, and the page shows it
    160 px high)."""
    import io

    from PIL import Image

    to_u8 = lambda x: (np.clip(x, 0, 1) * 255).round().astype(np.uint8) if x.dtype != np.uint8 else x  # noqa: E731
    rows = [np.concatenate([to_u8(np.asarray(r)) for r in references], 1),
            np.concatenate([to_u8(np.asarray(r)) for r in renders], 1)]
    grid = np.concatenate(rows, 0)
    height, width = grid.shape[:2]
    enlarge = max(1, min(scale, max_width // width))
    image = Image.fromarray(grid.repeat(enlarge, 0).repeat(enlarge, 1))
    if width > max_width:
        image = image.resize((max_width, max(1, round(height * max_width / width))), Image.Resampling.BOX)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class EvalRun:
    """What the person threads of one evaluation run share: the metric networks (loaded once, in the
    background, used under ``eval_lock``), the opened zarr stores, the frame count and the render
    slots; and the work for one person (:meth:`person`): render on the shared renderer, evaluate,
    write the videos.

    ``config.parallel_persons`` persons render at once (one per replica); the driver runs one person
    thread more, and a thread holds its render slot only while its frames render: it scores each clip
    as its frames come back (its next frames render meanwhile), and while it scores its last clip, the
    next person's frames already render on the replica it left."""

    def __init__(self, config: EvalDriverConfig, run_folder: Path, media_tags: dict[str, str] | None = None):
        from avatars.evaluation.face_models import FaceModelConfig
        from avatars.evaluation.lpips_weights import LpipsConfig
        from avatars.evaluation.metrics import EvalConfig, Evaluator

        self.config = config
        self.folder = run_folder
        #: person -> what its video and thumbnail names carry (its evaluation key): a run that renders it again
        #: with other inputs and stops before results.json is saved cannot replace the files it references
        self.media_tags = media_tags or {}
        # imageio-ffmpeg starts ffmpeg with a preexec_fn, which makes Python fork() instead of
        # vfork(): gRPC's fork handlers then print "Other threads are currently calling into gRPC,
        # skipping fork() handlers" for every video written while another person's frames are in
        # flight. Without it ffmpeg only shares this process group (Ctrl-C stops it too).
        os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
        lpips = None
        wants_lpips = sorted({"lpips", "lpips_face"} & set(config.metrics))  # lpips_face needs the network too
        if wants_lpips:
            lpips = LpipsConfig(Path(config.lpips_weights), device=config.eval_device)
        if lpips is not None and not lpips.weights_path.is_file():
            raise DataError(lpips.weights_path, "LPIPS weights are missing (see avatars.evaluation.lpips_weights) "
                                                f"or drop {' and '.join(map(repr, wants_lpips))} from --metrics")
        eval_config = EvalConfig(metrics=tuple(config.metrics), lpips=lpips, fps=config.fps, device=config.eval_device,
                                 face_models=FaceModelConfig(config.landmark_model, config.face_id_model))
        # the metric networks load (seconds) while Ray starts and the first renderer deploys
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="eval-load")
        self._evaluator = self._loader.submit(Evaluator, eval_config)
        self.eval_lock = threading.Lock()  # the metric networks are shared by the person threads
        self.frames_rendered = 0
        self._stores: dict[str, object] = {}
        self._data_lock = threading.Lock()
        self.render_slots = threading.Semaphore(config.parallel_persons)
        # frames lost with a dying replica are sent again by one person at a time: a person whose frames kill every
        # replica they reach then cannot take another person's second attempt down with it
        self.retry_lock = threading.Lock()
        #: a person's frames sent and not back yet, at most
        self.frames_in_flight = BATCHES_IN_FLIGHT * config.renderer.max_batch_size

    def wait_for_metrics(self) -> None:
        """Wait until the metric networks (loading in the background since ``__init__``) are loaded; one that
        did not load raises :class:`MetricsUnavailable` with the reason. The driver calls this before the first
        person renders: otherwise every person rendered its whole evaluation set and then failed on it."""
        try:
            self._evaluator.result()
        except Exception as e:
            raise MetricsUnavailable(f"the metric networks did not load, nothing was rendered: "
                                     f"{type(e).__name__}: {e}") from e

    def store(self, person: str):
        with self._data_lock:
            if person not in self._stores:
                self._stores[person] = open_store(self.config.stores, person)
            return self._stores[person]

    def task_frames(self, person: str, task: str, driver: str | None, resolution: int) -> TaskFrames:
        store, shards, most = self.store(person), self.config.shards, self.config.max_frames_per_clip
        if task == "self_reenactment":
            return self_reenactment(store, shards, resolution, most)
        if task == "novel_view":
            return novel_view(store, shards, resolution, most)
        if driver is None:
            raise TaskSkipped(f"cross-reenactment of {person} needs a second person to drive it; "
                              f"only {person} is evaluated")
        try:
            driver_store = self.store(driver)
        except DATA_ERRORS as e:
            raise driver_unusable(person, driver, e) from None
        return cross_reenactment(store, driver_store, shards, resolution, max_frames=most)

    def render_slot(self) -> RenderSlot:
        """Wait for one of the ``--parallel-persons`` render slots."""
        return RenderSlot(self.render_slots)

    def person(self, handle, person: str, driver: str | None) -> dict[str, TaskResult]:
        """Render `person`'s task frames through the renderer application `handle` and score them clip by clip as
        they come back, holding a render slot until its last frame is back (the last clip is scored without it)."""
        from cluster.serve.deployment import ModelLoadError, person_handle

        slot = self.render_slot()
        try:
            renderer = person_handle(handle, person)
            try:  # loads the model: a bad checkpoint fails this person here
                info = self._sent_again_if_lost(
                    person, "its model load", lambda: self._result(person, renderer.info.remote(), "its model load"))
            except ModelLoadError as e:  # Ray's wrapper adds the replica's traceback: the reason alone is clearer
                raise ModelLoadError(e.person, e.model_dir, e.cause) from None
            results: dict[str, TaskResult] = {}
            tasks: list[TaskFrames] = []
            for task in self.config.tasks:
                try:  # the keys only: each clip's frames are read when it renders
                    tasks.append(self.task_frames(person, task, driver, info["resolution"]))
                except TaskSkipped as e:
                    results[task] = TaskResult(metrics={}, skipped={"task": str(e)})
                except DATA_ERRORS as e:
                    results[task] = _failed(person, task, e)
            stream = FrameStream(self, person, renderer, tasks, on_all_back=slot.release)
            try:
                for ti, frames in enumerate(tasks):
                    try:
                        results[frames.task] = self.evaluate(frames, stream.clips(ti))
                    except ClipUnreadable as e:
                        if isinstance(e.error, TaskSkipped):
                            results[frames.task] = TaskResult(metrics={}, skipped={"task": str(e.error)})
                        else:
                            results[frames.task] = _failed(person, frames.task, e.error)
                    stream.skip(ti)
            finally:
                stream.close()
        finally:
            slot.release()
        return {t: results[t] for t in self.config.tasks if t in results}

    def _result(self, person: str, response, what: str):
        """`response`'s result, waiting at most ``--frame-timeout-s``; :class:`FrameTimeout` naming the person."""
        from ray.exceptions import RayTaskError

        limit = self.config.frame_timeout_s
        try:
            return response.result(timeout_s=limit)
        except TimeoutError as e:
            if isinstance(e, RayTaskError):  # a TimeoutError the replica raised: an error of the render, not ours
                raise
            sent = "its frames were cancelled" if what.startswith("frame") else "none of its frames was sent"
            raise FrameTimeout(f"{person}: {what} did not come back within --frame-timeout-s {limit:g} s (a hung "
                               f"replica, or a model load stuck on its file system); {sent}, the other persons "
                               "render on") from None

    def _sent_again_if_lost(self, person: str, what: str, call):
        """`call()`, called again (at most :data:`REPLICA_LOST_RETRIES` times, under ``retry_lock``) while the
        replica serving it dies."""
        lost_errors = replica_lost_errors()
        error: BaseException | None = None
        for attempt in range(REPLICA_LOST_RETRIES + 1):
            try:
                if attempt == 0:
                    return call()
                with self.retry_lock:
                    return call()
            except lost_errors as e:
                error = e
                log.warning("%s: %s was lost with a renderer replica that died (%s)", person, what, first_line(e))
        raise ReplicaLost(f"{person}: {what} was lost with a renderer replica that died, also when sent again "
                          f"({REPLICA_LOST_RETRIES} more time(s); the replica's log says why: a crash or out of memory "
                          f"while loading it): {first_line(error)}") from error

    def evaluate(self, frames: TaskFrames, rendered: Iterator[tuple[Clip, list[np.ndarray]]]) -> TaskResult:
        """Score one task clip by clip as `rendered` yields each with its images: the comparison video written as
        the clips come, the thumbnail's frames kept, the metrics computed per clip (one video each)."""
        from avatars.evaluation.video import comparison_video, side_by_side

        cfg = self.config
        tag = self.media_tags.get(frames.person)
        name = f"{frames.task}-{tag}" if tag else frames.task
        rel = Path("videos") / frames.person / f"{name}.mp4"
        thumb = Path("thumbnails") / frames.person / f"{name}.png"
        picks, strip, evals, start = strip_picks(frames.frames), ([], []), [], 0
        with comparison_video(self.folder / rel, fps=video_fps(frames.frames, cfg.fps, cfg.video_min_seconds,
                                                                 cfg.video_min_fps)) as video:
            for clip, images in rendered:
                video.append(side_by_side(comparison_panels(clip, images)))
                for i in picks:
                    if start <= i < start + clip.frames:
                        strip[0].append(clip.reference[i - start])
                        strip[1].append(images[i - start])
                if frames.has_ground_truth:
                    face = np.stack([c["mask"][0] for c in clip.conditioning])
                    evaluator = self._evaluator.result()
                    with self.eval_lock:
                        evals.append(evaluator.evaluate_video(clip.reference, np.stack(images), clip.alpha, face))
                start += clip.frames
        atomic_write_bytes(self.folder / thumb, comparison_strip(*strip))
        if not frames.has_ground_truth:
            reason = (f"no ground truth: {frames.person}'s avatar driven by {frames.driver}'s expression codes "
                      "(the left video panel is the driving frame); video only")
            return TaskResult(metrics={}, skipped={"metrics": reason}, frames=frames.frames, video=rel.as_posix(),
                              thumbnail=thumb.as_posix())
        return TaskResult.from_evaluation(merge_evaluations(evals), video=rel.as_posix(), thumbnail=thumb.as_posix())


def _failed(person: str, task: str, error: Exception) -> TaskResult:
    log.error("%s/%s: %s", person, task, error)
    return TaskResult(metrics={}, skipped={"task": f"failed: {error}"})
