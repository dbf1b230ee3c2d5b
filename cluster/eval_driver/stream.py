"""A person's frames through the renderer application, clip by clip (:class:`FrameStream`): each clip's frames
are read when they are due to be sent, a window of frames is in flight, and each clip is handed on with its
images as they come back; frames lost with a renderer replica that died are sent again. Used by
:class:`cluster.eval_driver.person.EvalRun`."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from cluster.eval_driver.tasks import DATA_ERRORS, Clip, TaskFrames, TaskSkipped
from cluster.serve.renderer import RenderRequest

if TYPE_CHECKING:
    from cluster.eval_driver.person import EvalRun

log = logging.getLogger(__name__)

#: How many times a frame (or a person's model load) lost with a renderer replica that died (a crash in a native
#: library, out of memory) is sent again; a person whose frames are lost more often fails with the error.
REPLICA_LOST_RETRIES = 1
#: A person's frames in flight at once, in batches of ``--renderer.max-batch-size``: enough for the replicas to fill
#: their batches and render the next batch while the last one's frames come back, not all of a person's frames at
#: once (a 512 px frame's request is ~10 MB of buffers: thousands of frames were tens of GB of requests at once
#: against the object store's 512 MiB). A frame is sent as the one this many frames before it comes back.
BATCHES_IN_FLIGHT = 4


class ReplicaLost(RuntimeError):
    """A person's frames (or its model load) were lost with a dying renderer replica again after they were sent
    once more (:data:`REPLICA_LOST_RETRIES`): most likely this person's own frames kill the replicas."""


def replica_lost_errors() -> tuple[type[BaseException], ...]:
    """What a call raises when the replica serving it died or cannot be reached (the call may be sent again: a
    render has no side effects): Ray's ``ActorDiedError`` / ``ActorUnavailableError`` (``RayActorError``) and
    Serve's ``ReplicaUnavailableError``."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return RayActorError, ReplicaUnavailableError


def first_line(e: BaseException) -> str:
    """The error's type and the first non-empty line of its message (Ray's errors carry whole tracebacks)."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0].strip() if lines else ''}"


class ClipUnreadable(Exception):
    """A clip of a task whose frames did not read when its turn to render came (a damaged shard, the driving
    person's data): that task fails (or is skipped, for the driver's data), the person's other tasks go on."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class RenderSlot:
    """One of ``--parallel-persons`` render slots, held by a person while its frames render (acquired when made);
    released once, when its last frame is back or when it fails."""

    def __init__(self, slots: threading.Semaphore):
        slots.acquire()
        self._slots, self._held = slots, True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._slots.release()


class FrameStream:
    """A person's frames through the renderer, task by task and clip by clip in order. A clip's frames are read
    (:meth:`LazyClip.load`) when its first frame is due to be sent, at most ``frames_in_flight`` frames are sent and
    not back (a frame is sent as the one this many frames before it comes back), and a clip is handed on
    (:meth:`clips`) once all its images are back: a person holds the clips its frames in flight belong to, not its
    whole evaluation set. When a frame is lost with a replica that died, the frames not back yet are cancelled (those
    still queued would go to the next replica, with a person whose frames kill it) and sent again, and the person's
    frames from then on go under ``retry_lock`` (one person's at a time); lost more than
    :data:`REPLICA_LOST_RETRIES` times: :class:`ReplicaLost`."""

    def __init__(self, run: EvalRun, person: str, renderer, tasks: list[TaskFrames],
                 on_all_back: Callable[[], None] = lambda: None):
        self.run, self.person, self.renderer = run, person, renderer
        self._tasks = tasks
        self._requests = self._produce()
        #: (task index, the clip, or why it did not load) of the clips whose frames are sent or about to be
        self._loaded: deque[tuple[int, Clip | Exception]] = deque()
        self._window: deque[list] = deque()  # [request, response] of the frames sent and not back, in order
        self._exhausted = False
        self.remaining = sum(t.frames for t in tasks)  # frames not back yet (nor left out with their task)
        self._losses = 0
        self._retry_lock_held = False
        self._on_all_back = on_all_back

    def _produce(self) -> Iterator[RenderRequest]:
        seed = self.run.config.seed
        for ti, frames in enumerate(self._tasks):
            for ci, clip in enumerate(frames.clips):
                try:
                    loaded = clip.load()
                except (TaskSkipped, *DATA_ERRORS) as e:
                    self._loaded.append((ti, e))
                    self.remaining -= sum(c.frames for c in frames.clips[ci:])
                    break
                self._loaded.append((ti, loaded))
                for key, c in zip(loaded.keys, loaded.conditioning):
                    yield RenderRequest(**c, seed=seed, key=key)

    def _send_next(self) -> None:
        try:
            request = next(self._requests)
        except StopIteration:
            self._exhausted = True
            return
        self._window.append([request, self.renderer.remote(request)])

    def _fill(self) -> None:
        while not self._exhausted and len(self._window) < self.run.frames_in_flight:
            self._send_next()

    def _next_image(self) -> np.ndarray:
        lost_errors = replica_lost_errors()
        while True:
            self._fill()
            request, response = self._window[0]
            try:
                image = self.run._result(self.person, response, f"frame {request.key}").image
            except lost_errors as e:
                self._lost(e)
                continue
            self._window.popleft()
            self.remaining -= 1
            self._fill()
            if self._exhausted and not self._window:
                self._on_all_back()
            return image

    def _lost(self, error: BaseException) -> None:
        for _, response in list(self._window)[1:]:
            response.cancel()
        self._losses += 1
        if self._losses > REPLICA_LOST_RETRIES:
            raise ReplicaLost(f"{self.person}: its frames were lost with a renderer replica that died, also when sent "
                              f"again ({REPLICA_LOST_RETRIES} more time(s), {self.remaining} frames; the replica's log "
                              f"says why: a crash or out of memory while rendering them): {first_line(error)}"
                              ) from error
        log.warning("%s: %d frames not back when a renderer replica died (%s); sending them again", self.person,
                    self.remaining, first_line(error))
        if not self._retry_lock_held:
            self.run.retry_lock.acquire()
            self._retry_lock_held = True
        for item in self._window:
            item[1] = self.renderer.remote(item[0])

    def clips(self, task: int) -> Iterator[tuple[Clip, list[np.ndarray]]]:
        """Each clip of task number `task` (in order: the tasks are taken in turn) with its rendered images;
        :class:`ClipUnreadable` where a clip of it did not load."""
        while True:
            while not self._loaded and not self._exhausted:
                self._send_next()  # the window is empty here: the frames in flight are those of loaded clips
            if not self._loaded or self._loaded[0][0] != task:
                return
            _, clip = self._loaded.popleft()
            if isinstance(clip, Exception):
                raise ClipUnreadable(clip)
            images = [self._next_image() for _ in range(clip.frames)]
            with self.run.eval_lock:
                self.run.frames_rendered += len(images)
            yield clip, images

    def skip(self, task: int) -> None:
        """Let the frames of task number `task` that its scoring left come back (and drop them)."""
        try:
            for _ in self.clips(task):
                pass
        except ClipUnreadable:
            pass

    def close(self) -> None:
        """Cancel the frames not back (a person that failed: its queued frames must not hold up the others)."""
        for _, response in self._window:
            response.cancel()
        self._window.clear()
        self._requests.close()
        if self._retry_lock_held:
            self._retry_lock_held = False
            self.run.retry_lock.release()
