"""Keeping the GPU fed: host batches in pinned memory, copied and dequantised on a side stream,
one batch ahead of the training step.

A copy from pageable host memory makes the host wait for the GPU's whole queue (PyTorch
synchronises the stream after it), so every step would start with an idle GPU. From pinned
memory the copy is asynchronous; issued on a second CUDA stream while the current step's
kernels run, it overlaps them, and the training stream only waits for that copy's event.
"""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

import torch

S = TypeVar("S")
B = TypeVar("B")


def one_ahead(items: Iterator[S], stage: Callable[[S], B], ready: Callable[[B], B]) -> Iterator[B]:
    """``ready(stage(x))`` for each item, staging item i+1 before item i is handed out (so the
    staging of the next batch overlaps the consumer's work on the current one)."""
    pending = None
    have = False
    try:
        for item in items:
            staged = stage(item)
            if have:
                yield ready(pending)
            pending, have = staged, True
        if have:
            yield ready(pending)
    finally:
        close = getattr(items, "close", None)
        if close is not None:  # a generator: let it clean up (e.g. shut its thread pool down) now
            close()


class DeviceFeeder:
    """Stages host batches on ``device``: ``ready(stage(batch))``; ``finish`` turns the copied
    (still compact) batch into the training batch on the device, in the same stream."""

    def __init__(self, device: torch.device, finish: Callable[[dict], dict]):
        self.device, self.finish = device, finish
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def stage(self, batch: dict) -> tuple[dict, object]:
        if self.stream is None:
            return self.finish(_copy(batch, self.device)), None
        with torch.cuda.stream(self.stream):
            out = self.finish(_copy(batch, self.device))
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def ready(self, staged: tuple[dict, object]) -> dict:
        batch, event = staged
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for value in batch.values():
                if torch.is_tensor(value):
                    value.record_stream(current)  # allocated on the side stream, used on this one
        return batch


def _copy(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
