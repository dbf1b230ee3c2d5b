"""A function of fixed-shape CUDA tensors recorded once as a CUDA graph and replayed per call.

Why: at batch 1 an eager 512x512 render is bound by kernel launches, not by the GPU (one H200,
20 DDPM steps: 0.74 frames/s, 2% of the bf16 peak; README "GPU"). A graph replays the whole
render's kernels with one launch. Unlike ``torch.compile`` (whose "reduce-overhead" warm-up of a
512x512 step took minutes), recording costs one eager run, and the replay runs the very kernels the
eager run chose, so its results are the eager ones bit for bit.

What the recorded function may do: only device work on its tensor arguments and on tensors made
before recording (model weights, the sampler's tables); no host reads (``.item()``, ``nonzero``),
no host-to-device copies, no new random draws. :class:`avatars.pipelines.RenderPipeline` keeps its
render loop that way (its tests count the host reads on the CPU, and the syncs on CUDA).

Memory: every graph of a process records into one memory pool per device, so a Serve replica that
holds several persons, each with a graph per batch bucket, keeps the intermediates of one render,
not of one per person and bucket. That is safe because graphs never run at the same time (one
process-wide lock around recording and replaying, and each call's stream waits for the previous
call's work, whatever thread or stream made it) and each call copies its output out at once, before
another graph's replay can reuse that memory.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import torch

#: Recording and replaying, process-wide: the graphs share their memory (see the module docstring).
_LOCK = threading.Lock()
#: device index -> the memory pool every graph on that device records into
_POOLS: dict[int, tuple] = {}
#: device index -> an event recorded after the last call's work (its output copied out): the next
#: call's stream waits for it, whichever thread and stream made that last call
_DONE: dict[int, torch.cuda.Event] = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _pool(device: torch.device) -> tuple:
    if _index(device) not in _POOLS:
        _POOLS[_index(device)] = torch.cuda.graph_pool_handle()
    return _POOLS[_index(device)]


def _after_the_last_call(device: torch.device) -> None:
    if _index(device) in _DONE:
        torch.cuda.current_stream(device).wait_event(_DONE[_index(device)])


def _mark_done(device: torch.device) -> None:
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    _DONE[_index(device)] = event


def check_inputs(recorded: Sequence[torch.Tensor], given: Sequence[torch.Tensor]) -> None:
    """A replay reads its inputs from the recorded tensors' memory: anything else would be
    silently wrong (a copy broadcast into them, or refused by ``copy_`` with a less clear error)."""
    if len(given) != len(recorded):
        raise ValueError(f"expected {len(recorded)} inputs, got {len(given)}")
    for i, (r, g) in enumerate(zip(recorded, given)):
        if g.shape != r.shape or g.dtype != r.dtype or g.device != r.device:
            raise ValueError(f"input {i} is {tuple(g.shape)} {g.dtype} on {g.device}; the graph "
                             f"was recorded for {tuple(r.shape)} {r.dtype} on {r.device}")


class GraphedCall:
    """``fn(*inputs) -> Tensor`` recorded for the shapes and dtypes of ``example``; a call copies its
    inputs into the recorded ones, replays, and returns a copy of the output (the next replay
    overwrites the recorded output)."""

    def __init__(self, fn: Callable[..., torch.Tensor], example: Sequence[torch.Tensor], warm_up_runs: int = 1):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        if not example or any(not t.is_cuda for t in example):
            raise ValueError("a graphed call takes CUDA tensors only")
        device = example[0].device
        with _LOCK, torch.cuda.device(device):
            _after_the_last_call(device)
            self.inputs = [t.clone() for t in example]
            # Warm-up on a side stream (lazy initialisation, cuDNN's autotuning and the caching
            # allocator's first allocations must not happen while recording), then record.
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warm_up_runs):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: another thread of the process (a server's I/O) may use CUDA meanwhile
            with torch.cuda.graph(self.graph, pool=_pool(device), capture_error_mode="thread_local"):
                self.output = fn(*self.inputs)
            _mark_done(device)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        check_inputs(self.inputs, inputs)
        device = self.output.device
        with _LOCK, torch.cuda.device(device):
            _after_the_last_call(device)
            for recorded, given in zip(self.inputs, inputs):
                recorded.copy_(given)
            self.graph.replay()
            output = self.output.clone()  # before any other graph's replay may reuse its memory
            _mark_done(device)
            return output
