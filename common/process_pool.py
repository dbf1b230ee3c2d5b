"""One function per item in worker processes, where a process that dies takes only its own item down.

A worker that ends abruptly (a segfault, the OOM killer, ``os._exit``) breaks a whole
``ProcessPoolExecutor``: every item still in it fails with ``BrokenProcessPool``, whichever one
killed it. :func:`map_tolerant` runs the items on one shared pool first, then the ones that pool
left unfinished again, each in a fresh process of its own, so that only an item whose process
dies again fails (:class:`WorkerDied`). Used by the data stages (ingest per person, shards per
shard) of ``jobs/``.

The workers are never forked from the caller: a child forked from a process whose other threads or OpenMP
pool (torch, MKL) had run can wait forever on a lock that no thread of the child will release (seen: a shard
worker stuck in libgomp under MKL's ``sqrt``, forked from a process with gRPC and zarr threads, hung its stage
and the ``with`` block's shutdown after it). They are forked from multiprocessing's fork server instead: a fresh
interpreter of one thread, started once per process, that imported torch and the mapped function's module and
never computed, so that a worker starts in a fraction of a second instead of importing torch again (``spawn``:
~4 CPU s per worker: 26 CPU s for 3 pools of 2 workers, measured). The server keeps the environment and
``sys.path`` of the moment it started. Its socket lives in the temporary directory; where that cannot hold one
(a ``TMPDIR`` whose path is too long for a Unix socket, which Python before 3.14 does not work around, or a full
one), the workers are spawned instead, with a warning.

An item may have a time limit (``timeout_s``): a worker that hangs (a read from a dead network file system, a lock
that is never released) held its stage, and the main job, forever. On the shared pool the limit is a stall limit:
when no item has finished for that long, the pool's processes are killed and its unfinished items run again one
process each, where each item has the limit from its own start and a process over it is killed
(:class:`ItemTimedOut`); the other items finish. (A process stuck inside the kernel, e.g. on a hard-mounted NFS
server that is gone, ends only when the kernel lets it; the stage does not wait for it.)

A worker ends itself (``os._exit``) as soon as the process that made its pool does, however that ended
(``SIGKILL``, the OOM killer): nothing else would end it. Every fork-server child holds the server's "alive" pipe
and the write end of its own task queue, so neither it nor the server ever sees the parent go; left, they ran on
with parent pid 1, finishing their items into an output folder that a next run may already write. With the
workers gone, the server sees its pipe close and ends, and the resource tracker with it.
"""

from __future__ import annotations

import math
import os
import select
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context, util
from multiprocessing.context import BaseContext
from typing import Callable, Hashable, TypeVar

from common.io import SUN_PATH_MAX, fits_unix_socket
from common.processes import pid_alive

Item = TypeVar("Item", bound=Hashable)
#: Called in the parent as each item finishes: (item, result or None, error or None).
OnDone = Callable[[Item, object, "Exception | None"], None]


#: What the fork server's socket adds to multiprocessing's temporary directory: ``/listener-`` and 8 characters.
_LISTENER_NAME = len("/listener-XXXXXXXX")


class WorkerDied(RuntimeError):
    """The process running this item ended abruptly (a segfault, the OOM killer, ``os._exit``)."""


class ItemTimedOut(RuntimeError):
    """This item ran longer than its time limit in a process of its own (hung, or far slower than it should be): its
    process was killed."""


#: A worker's exit status when the process that made its pool has ended.
_ORPHANED = 1


def _start_worker(parent: int, init: Callable[[], None]) -> None:
    """A worker's initializer: it ends when process `parent` (the one that made its pool) does, then `init` runs.
    `init` comes as an argument, not by name, so that what the caller's :func:`_init_worker` is (a test's stand-in)
    is what the worker runs."""
    _exit_with(parent)
    init()


def _exit_with(pid: int) -> None:
    """End this process (``os._exit``) as soon as process `pid` ends, from a daemon thread that waits on a pidfd
    (Linux 5.3+; where the kernel or a seccomp filter refuses one, it looks once a second instead)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone before this worker started
        os._exit(_ORPHANED)
    except (AttributeError, OSError):
        fd = None
    threading.Thread(target=_wait_then_exit, args=(pid, fd), name=f"exit-with-{pid}", daemon=True).start()


def _wait_then_exit(pid: int, fd: int | None) -> None:
    if fd is not None:
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        poll.poll()  # returns once the process has ended
    else:
        while pid_alive(pid):  # another user's process counts: the parent's pid reused (then this never ends)
            time.sleep(1)
    os._exit(_ORPHANED)


def _init_worker() -> None:
    # Each worker owns one core: torch's own thread pool would oversubscribe the machine.
    import torch

    torch.set_num_threads(1)


def _fork_server_context() -> BaseContext:
    """The fork server's context, or spawn's where the server's socket cannot be made in the temporary directory
    (its path too long, or the directory not creatable): failing there would fail every item of the stage."""
    try:
        tempdir = util.get_temp_dir()  # made once per process; the fork server's socket goes in it
    except OSError as e:
        reason = f"multiprocessing cannot make its temporary directory ({e})"
    else:
        if fits_unix_socket(tempdir, _LISTENER_NAME):
            return get_context("forkserver")
        reason = (f"the temporary directory {tempdir} is too long a path for the fork server's Unix socket "
                  f"({SUN_PATH_MAX} bytes at most with its name)")
    warnings.warn(f"{reason}: worker processes are spawned instead, each importing torch again (a few seconds "
                  "each); a shorter or writable TMPDIR avoids that", RuntimeWarning, stacklevel=2)
    return get_context("spawn")


def _pool(workers: int, fn: Callable) -> ProcessPoolExecutor:
    """Worker processes that own one core each and end with this process, forked from the fork server (module
    docstring), which imports torch and `fn`'s module when this process first starts it."""
    context = _fork_server_context()
    if context.get_start_method() == "forkserver":
        module = getattr(getattr(fn, "func", fn), "__module__", None)  # a functools.partial's function
        context.set_forkserver_preload(["torch", *([module] if module and module != "__main__" else [])])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(os.getpid(), _init_worker))


def _take(fut: Future, item: Hashable, name: str, on_done: OnDone) -> None:
    """Hand a finished item's result or error to `on_done`; its own process dying is :class:`WorkerDied`."""
    try:
        result = fut.result()
    except BrokenProcessPool as e:
        on_done(item, None, WorkerDied(f"{name}: its worker process died (crashed or killed, e.g. out of memory): {e}"))
    except Exception as e:  # keep going: the other items are independent
        on_done(item, None, e)
    else:
        on_done(item, result, None)


def _kill(pool: ProcessPoolExecutor) -> None:
    """Kill `pool`'s processes (a hung item's: they do not end on their own) and let it go without waiting for them
    (a process stuck in the kernel may take long to end)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # the executor's own record of them
        try:
            process.kill()
        except (OSError, ValueError):  # already ended, or closed
            pass
    pool.shutdown(wait=False, cancel_futures=True)


def _run_shared(fn: Callable, items: list, workers: int, name: Callable, on_done: OnDone,
                timeout_s: float | None = None) -> list:
    """All items on one pool of `workers` processes; returns the items left unfinished when a worker died or when no
    item finished for `timeout_s` (its processes are then killed)."""
    finished = set()

    def record(item, result, error) -> None:
        finished.add(item)
        on_done(item, result, error)

    pool = _pool(workers, fn)
    stalled = False
    try:
        futures: dict[Future, Hashable] = {}
        for item in items:
            try:
                futures[pool.submit(fn, item)] = item
            except BrokenProcessPool:
                break
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=timeout_s, return_when=FIRST_COMPLETED)
            if not done:  # nothing finished for timeout_s: a worker hangs (which one, the pool does not say)
                stalled = True
                break
            for fut in done:
                if fut.cancelled() or isinstance(fut.exception(), BrokenProcessPool):
                    continue
                _take(fut, futures[fut], name(futures[fut]), record)
    finally:
        if stalled:
            _kill(pool)
        else:
            pool.shutdown()
    return [item for item in items if item not in finished]


def _run_isolated(fn: Callable, items: list, workers: int, name: Callable, on_done: OnDone,
                  timeout_s: float | None = None) -> None:
    """Each item in a fresh process of its own, `workers` at a time: a worker that dies takes only its item down, and
    one still running `timeout_s` after it started is killed (:class:`ItemTimedOut`)."""
    queue, running = list(items), {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                item, pool = queue.pop(0), _pool(1, fn)
                running[pool.submit(fn, item)] = (item, pool, time.monotonic())
            waits = [started + timeout_s - time.monotonic() for _, _, started in running.values()] if timeout_s else []
            done, _ = wait(running, timeout=max(0.0, min(waits)) if waits else None, return_when=FIRST_COMPLETED)
            for fut in done:
                item, pool, _ = running.pop(fut)
                pool.shutdown()
                _take(fut, item, name(item), on_done)
            now = time.monotonic()
            for fut, (item, pool, started) in list(running.items()):
                if timeout_s and now - started >= timeout_s and not fut.done():
                    del running[fut]
                    _kill(pool)
                    on_done(item, None, ItemTimedOut(f"{name(item)}: still running after the time limit of "
                                                     f"{timeout_s:g} s (hung, e.g. on a read from a file system that "
                                                     "does not answer); its process was killed"))
    finally:
        for _, pool, _ in running.values():
            pool.shutdown(cancel_futures=True)


def map_tolerant(fn: Callable, items: list, workers: int, on_done: OnDone, name: Callable[[Hashable], str] = str,
                 on_rerun: Callable[[list], None] | None = None, timeout_s: float | None = None) -> None:
    """``fn(item)`` for every item, `workers` processes at a time (in this process with one worker and no time
    limit); `on_done` gets each result or error as it comes, so one failing item never stops the others. Items the
    shared pool left unfinished when a worker died, or when none finished for `timeout_s`, run again one process each
    (`on_rerun` is told which first), there with `timeout_s` as each one's time limit (:class:`ItemTimedOut`);
    `name` names an item in the messages. `fn` and the items must pickle."""
    if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):  # inf: threading's waits overflow
        raise ValueError(f"an item's time limit must be positive seconds, got {timeout_s}")
    if workers <= 1 and timeout_s is None:
        for item in items:
            try:
                result = fn(item)
            except Exception as e:
                on_done(item, None, e)
            else:
                on_done(item, result, None)
        return
    if workers <= 1:  # a time limit needs a process to kill
        _run_isolated(fn, items, 1, name, on_done, timeout_s)
        return
    unfinished = _run_shared(fn, items, workers, name, on_done, timeout_s)
    if unfinished:
        if on_rerun is not None:
            on_rerun(unfinished)
        _run_isolated(fn, unfinished, workers, name, on_done, timeout_s)
