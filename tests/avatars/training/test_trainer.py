"""Pieces of the Trainer that need no engine: the data epochs its batches walk through."""

from __future__ import annotations

from pathlib import Path

import torch

from avatars.data import LoaderConfig, ResumableSampler, ShardDataset, make_loader
from avatars.training import Trainer, train_preset
from avatars.training.checkpoint import TrainerState
from shards.writer import shard_paths

BATCH = 2


def _trainer(shards: Path, state: TrainerState) -> Trainer:
    """A Trainer with the data set-up() gives it (random crops), at ``state``; no model or engine."""
    cfg = train_preset("tiny", person="000", shards=shards, min_crop=0.5, batch_size=BATCH, num_workers=0)
    trainer = Trainer(cfg)
    trainer.loader_config = LoaderConfig(resolution=32, batch_size=BATCH, num_workers=0, seed=cfg.seed, min_crop=0.5)
    trainer.dataset = ShardDataset(shard_paths(shards, "000", "train"), trainer.loader_config)
    trainer.sampler = ResumableSampler(len(trainer.dataset), seed=cfg.seed)
    trainer.loader = make_loader(trainer.dataset, trainer.sampler, trainer.loader_config)
    trainer.state = state
    return trainer


def _crops(trainer: Trainer, epochs: int) -> dict[tuple[int, str], torch.Tensor]:
    """(epoch, key) -> the training image of that draw, for the next ``epochs`` epochs."""
    data, out = trainer.batches(), {}
    first = trainer.state.epoch
    while True:
        batch = next(data)
        if trainer.state.epoch >= first + epochs:
            return out
        out.update({(trainer.state.epoch, key): image for key, image in zip(batch["__key__"], batch["image"])})


def test_random_crops_change_every_epoch_and_resume_with_it(train_shards):
    crops = _crops(_trainer(train_shards, TrainerState()), epochs=2)
    keys = {key for epoch, key in crops if epoch == 0} & {key for epoch, key in crops if epoch == 1}
    assert keys
    assert all(not torch.equal(crops[0, key], crops[1, key]) for key in keys)  # a new crop of every sample
    resumed = _crops(_trainer(train_shards, TrainerState(step=9, epoch=1)), epochs=1)
    assert resumed.keys() == {k for k in crops if k[0] == 1}
    assert all(torch.equal(resumed[k], crops[k]) for k in resumed)  # the same crops as the uninterrupted run
