"""Fixed noise per video: every frame of a video starts from the same latent and gets the same
per-step DDPM noise, a function of the video's seed only.

Drawn on the CPU from ``torch.Generator().manual_seed(seed)`` (identical on every device and for
every batch), in one stream: the initial latent first, then one draw per sampling step, so the
initial latent does not depend on the step count and step k's noise does not depend on later
steps. Drawn once per (seed, shape, steps) and kept on the device, so a batch gathers its frames'
noise with one device-side concatenation and the sampling loop never draws random numbers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch


def video_noise(seed: int, shape: tuple[int, int, int], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial (1, C, h, w), per-step (steps, 1, C, h, w)) float32 CPU noise of video ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    initial = torch.randn((1, *shape), generator=generator)
    per_step = [torch.randn((1, *shape), generator=generator) for _ in range(steps)]
    return initial, torch.stack(per_step) if per_step else torch.empty(0, 1, *shape)


class NoiseBank:
    """Device-resident :func:`video_noise` for recently used seeds (least recently used evicted)."""

    def __init__(self, capacity: int = 64):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, seed: int, shape: tuple[int, int, int], steps: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (int(seed), tuple(shape), int(steps), str(device))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        initial, per_step = video_noise(seed, shape, steps)
        if device.type == "cuda":  # pinned + non-blocking: no wait for the GPU's queue
            initial, per_step = (t.pin_memory().to(device, non_blocking=True) for t in (initial, per_step))
        else:
            initial, per_step = initial.to(device), per_step.to(device)
        self._cache[key] = (initial, per_step)
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return initial, per_step

    def batch(self, seeds: Sequence[int], shape: tuple[int, int, int], steps: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(initial (B, C, h, w), per-step (steps, B, C, h, w)) for frames with these video seeds."""
        parts = [self.get(seed, shape, steps, device) for seed in seeds]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1)
