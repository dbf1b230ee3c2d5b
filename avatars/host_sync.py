"""Counting the host synchronisations of a piece of GPU work (benchmarks and tests).

A host synchronisation (``.item()``, ``int(tensor)``, ``nonzero``, a blocking device-to-host copy,
``torch.cuda.synchronize``) stalls Python until the GPU's queue drains, so the next kernels
cannot be queued ahead: at batch 1 they dominate a render.

* :func:`count_host_syncs` counts them on CUDA with ``torch.cuda.set_sync_debug_mode("warn")``
  (torch warns at every synchronising call). Without CUDA there is nothing to count: it reports
  "not measurable", never 0.
* :func:`count_host_reads` counts, on any device, the tensor operations that make the host read
  device data (a CPU stand-in that tests use to guard a loop against new syncs).

    from avatars.host_sync import count_host_syncs
    images, syncs = count_host_syncs(lambda: pipeline(batch, num_inference_steps=20), device)
    print(syncs)            # "0" on CUDA, "not measurable (...)" on CPU
    record["host_syncs_per_call"] = syncs.to_json()
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

T = TypeVar("T")

NOT_MEASURABLE = "not measurable"


@dataclass
class SyncCount:
    """Host synchronisations of one call; ``count`` is None when they cannot be measured here."""

    count: int | None
    reason: str = ""
    sites: list[str] = field(default_factory=list)
    """The distinct warning messages (what synchronised), for a report."""

    @property
    def measurable(self) -> bool:
        return self.count is not None

    def to_json(self) -> int | str:
        return self.count if self.count is not None else f"{NOT_MEASURABLE}: {self.reason}"

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{NOT_MEASURABLE} ({self.reason})"


#: torch's one-time notice when the debug mode is first switched on (not a synchronisation).
_PROTOTYPE_NOTICE = "synchronization debug mode is a prototype feature"


def is_sync_warning(message: str) -> bool:
    """Whether a warning raised under ``set_sync_debug_mode("warn")`` reports a host synchronisation
    (measured on torch 2.11: the first switch-on also warns that the mode is a prototype)."""
    text = message.lower()
    return "synchroniz" in text and not text.startswith(_PROTOTYPE_NOTICE)


def count_host_syncs(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[T, SyncCount]:
    """Run ``fn()`` once and count the CUDA host synchronisations it makes.

    On a non-CUDA device (or without CUDA) ``fn`` still runs, and the count is "not measurable".
    Run ``fn`` once before (warm-up): first calls allocate, build plugins, or compile."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return fn(), SyncCount(None, f"device {device} has no CUDA stream to synchronise with")
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if is_sync_warning(str(w.message))]
    for w in caught:  # hand every other warning back to the caller
        if w not in syncs:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    sites = sorted({str(w.message).splitlines()[0] for w in syncs})
    return result, SyncCount(len(syncs), "", sites)


#: aten operations whose result the host must read from the device (a sync on CUDA).
_HOST_READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique", "_unique2",
                  "unique_dim", "unique_consecutive"}


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in _HOST_READ_OPS:
            self.ops.append(name)
        elif name in ("_to_copy", "copy_"):
            self._check_copy(name, args, kwargs)
        return func(*args, **kwargs)

    def _check_copy(self, name: str, args, kwargs) -> None:
        if name == "copy_":
            dst, src = args[0], args[1]
            if src.device.type != "cpu" and dst.device.type == "cpu":
                self.ops.append("copy_ to host")
        elif args[0].device.type != "cpu" and str(kwargs.get("device", args[0].device)) == "cpu":
            self.ops.append("to host")


def count_host_reads(fn: Callable[[], T]) -> tuple[T, list[str]]:
    """Run ``fn()`` and list the operations that read device data on the host, on any device
    (on CPU nothing synchronises, but the same code on CUDA would)."""
    mode = _HostReads()
    with mode:
        result = fn()
    return result, mode.ops

