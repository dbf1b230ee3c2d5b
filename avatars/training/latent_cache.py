"""The frozen VAE's posterior of each training sample, encoded once and reused whenever the sample returns.

The VAE never trains, so a sample that is the same every epoch (no random crop: ``--min-crop 1``, the
tiny preset) has the same posterior (mean, std) every epoch; only the draw from it (the trainer's noise
generator, as before) changes. The cache keeps the posteriors on the training device, keyed by the
sample's shard key, and hands them to the loss in the batch (``latent_mean``, ``latent_std``; see
:meth:`~avatars.models.DiffusionAvatarsModel.training_loss`), so the encoder runs once per sample instead
of once per draw.

A new sample is encoded on its own (batch 1), not with the batch it first arrives in: a convolution's
result can differ in the last bits with the batch around it, and a resumed run meets its samples in other
batches than the uninterrupted run did; encoded alone, each posterior is the same in both, so resume
stays exact (on CPU: on a GPU, cudnn.benchmark and grid_sample's atomic backward make no run bit-for-bit
repeatable). With random crops every draw is a new image: :func:`latent_cache_for` builds no cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from avatars.models import DiffusionAvatarsModel


class LatentCache:
    """Posteriors of up to ``capacity_bytes`` of samples on the training device; samples beyond that
    are encoded at every draw (alone, as the cached ones were)."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.bytes = 0
        self.encoded = 0  # samples run through the encoder (first draws, and every draw beyond the capacity)
        self.reused = 0  # draws served from the cache

    def _posterior(self, model: DiffusionAvatarsModel, key: str, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if key in self.entries:
            self.reused += 1
            return self.entries[key]
        mean, std = model.encode_posterior(image[None])
        self.encoded += 1
        size = 2 * mean.numel() * mean.element_size()
        if self.bytes + size > self.capacity_bytes:
            return mean[0], std[0]  # not kept: add_posteriors' stack copies it anyway
        entry = mean[0].clone(), std[0].clone()  # own storage: the mean is a view of the encoder's moments
        self.entries[key] = entry
        self.bytes += size
        return entry

    def add_posteriors(self, model: DiffusionAvatarsModel, batch: dict) -> dict:
        """``batch`` plus ``latent_mean`` and ``latent_std`` (B, C, h, w) of its images, by ``__key__``."""
        keys = batch["__key__"]
        if len(keys) != batch["image"].shape[0]:
            raise ValueError(f"batch has {len(keys)} keys for {batch['image'].shape[0]} images")
        pairs = [self._posterior(model, key, image) for key, image in zip(keys, batch["image"])]
        return {**batch, "latent_mean": torch.stack([m for m, _ in pairs]),
                "latent_std": torch.stack([s for _, s in pairs])}

    def summary(self) -> dict:
        """What the cache holds and did (logged at the end of a run)."""
        return {"samples": len(self.entries), "mib": self.bytes / 2**20, "encoded": self.encoded,
                "reused": self.reused}


def check_latent_cache_mib(cache_mib: float) -> None:
    """``--latent-cache-mib`` is a memory size: refuse a negative one (0 turns the cache off)."""
    if cache_mib < 0:
        raise ValueError(f"latent_cache_mib must be >= 0, got {cache_mib}")


def latent_cache_for(cache_mib: float, min_crop: float) -> LatentCache | None:
    """The cache a run with ``--latent-cache-mib`` and ``--min-crop`` uses: None when it is off (0) or
    when random crops make every draw a new image (min_crop < 1)."""
    check_latent_cache_mib(cache_mib)
    if cache_mib == 0 or min_crop < 1:
        return None
    return LatentCache(int(cache_mib * 2**20))
