"""An exponential moving average (EMA) of the trainable weights: the avatar that is validated and saved.

Why: a run's last iterate carries the noise of its last optimizer steps; the average over the last
~1/(1 - decay) steps does not. Measured on the tiny preset (README "An average of the weights"):
held-out PSNR higher on nearly every person at the same steps, LPIPS level, for an update per step
that is one fused lerp over the trainable tensors (no host sync).

The decay warms up as in diffusers' ``EMAModel`` (``min(decay, (1 + step) / (10 + step))``), so a
short run's average is not dominated by the random start. The average lives beside the optimizer:
updated after every optimizer step, written into each checkpoint (an exact resume), and swapped
into the model for validation and the final save (:meth:`WeightAverage.swapped`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def check_decay(decay: float) -> None:
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0: no average), got {decay}")


class WeightAverage:
    """EMA of ``params`` (name -> trainable parameter), kept in the parameters' dtype, layout and device."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        check_decay(decay)
        if not params:
            raise ValueError("no trainable parameters to average")
        self.decay = decay
        self.params = params
        self.average = {name: p.detach().clone() for name, p in params.items()}
        # the per-step update's operands, listed once (load_state_dict copies into the same tensors)
        self._pairs = (list(self.average.values()), [p.detach() for p in params.values()])

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step ``step`` (1-based)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step``: average <- decay * average + (1 - decay) * weights."""
        torch._foreach_lerp_(*self._pairs, 1.0 - self.decay_at(step))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.average)

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        # imported here: this module is imported with the training options (avatars.training.config),
        # which a command line parses before anything needs diffusers
        from avatars.models.diffusion_avatars import copy_matching

        copy_matching(self.average, state, source)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The model holds the average inside the block and its trained weights again after it."""
        with torch.no_grad():
            trained = {name: p.detach().clone() for name, p in self.params.items()}
            for name, p in self.params.items():
                p.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(trained[name])
