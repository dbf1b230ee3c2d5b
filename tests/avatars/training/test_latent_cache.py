"""--latent-cache-mib: the frozen VAE's posterior of each sample, encoded once and reused; the loss unchanged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from train_cli import run_side_by_side, train_person_args

from avatars.configs import tiny_config
from avatars.models import DiffusionAvatarsModel
from avatars.testing import synthetic_batch
from avatars.training import TrainOptions
from avatars.training.latent_cache import LatentCache, latent_cache_for

ENTRY_BYTES = 2 * 4 * 16 * 16 * 4  # mean and std, 4 x 16 x 16 float32: one tiny sample


@pytest.fixture(scope="module")
def model() -> DiffusionAvatarsModel:
    return DiffusionAvatarsModel(tiny_config(expression_dim=16)).eval()


def _batch(keys: list[int]) -> dict:
    """A training batch whose image differs per key (the same key, the same image)."""
    batch = synthetic_batch(len(keys), 64)
    shift = torch.tensor(keys, dtype=torch.float32).view(-1, 1, 1, 1)
    batch["image"] = (batch["image"] + 0.1 * shift - 0.2).clamp(-1, 1)
    batch["__key__"] = [f"000/seq/frame_{k:05d}/cam_0" for k in keys]
    return batch


class _CountedEncoder:
    """Counts the images the model's VAE encodes."""

    def __init__(self, model: DiffusionAvatarsModel, monkeypatch):
        self.images = 0
        encode = model.vae.encode

        def counted(image, *args, **kwargs):
            self.images += image.shape[0]
            return encode(image, *args, **kwargs)

        monkeypatch.setattr(model.vae, "encode", counted)


def test_each_sample_is_encoded_once_and_its_posterior_is_the_encoders(model, monkeypatch):
    encoder = _CountedEncoder(model, monkeypatch)
    cache = LatentCache(1 << 20)
    first = cache.add_posteriors(model, _batch([0, 1, 2, 3]))
    assert encoder.images == 4
    mean, std = model.encode_posterior(_batch([0, 1, 2, 3])["image"])
    torch.testing.assert_close(first["latent_mean"], mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(first["latent_std"], std, rtol=0, atol=1e-5)

    encoder.images = 0
    again = cache.add_posteriors(model, _batch([2, 0, 4, 1]))  # three seen before, in other places, one new
    assert encoder.images == 1
    for row, key in enumerate([2, 0, None, 1]):
        if key is not None:  # the stored posterior itself, bit for bit
            assert torch.equal(again["latent_mean"][row], first["latent_mean"][key])
            assert torch.equal(again["latent_std"][row], first["latent_std"][key])
    assert cache.summary() == {"samples": 5, "mib": 5 * ENTRY_BYTES / 2**20, "encoded": 5, "reused": 3}


def test_a_batch_whose_keys_do_not_match_its_images_is_refused(model):
    batch = _batch([0, 1, 2])
    batch["__key__"] = batch["__key__"][:2]
    with pytest.raises(ValueError, match="2 keys for 3 images"):
        LatentCache(1 << 20).add_posteriors(model, batch)


def test_a_posterior_does_not_depend_on_the_batch_it_first_arrives_in(model):
    """What keeps resume exact: a resumed run meets its samples in other batches than the uninterrupted run did
    (on this CPU a batch-4 encode differs from a batch-1 encode in the last bits)."""
    in_four = LatentCache(1 << 20).add_posteriors(model, _batch([0, 1, 2, 3]))
    in_two = LatentCache(1 << 20).add_posteriors(model, _batch([3, 5]))
    alone = LatentCache(1 << 20).add_posteriors(model, _batch([3]))
    for name in ("latent_mean", "latent_std"):
        assert torch.equal(in_four[name][3], in_two[name][0]) and torch.equal(in_four[name][3], alone[name][0])


def test_the_loss_on_cached_posteriors_is_the_loss_that_encodes(model, monkeypatch):
    batch = _batch([0, 1, 2, 3])
    cached = LatentCache(1 << 20).add_posteriors(model, batch)
    encoder = _CountedEncoder(model, monkeypatch)
    with torch.no_grad():
        encoding = model.training_loss(batch, torch.Generator().manual_seed(5))["loss"]
        assert encoder.images == 4
        from_cache = model.training_loss(cached, torch.Generator().manual_seed(5))["loss"]
        assert encoder.images == 4  # the cached batch ran no encoder
        torch.testing.assert_close(from_cache, encoding, rtol=1e-5, atol=0)
        # and the loss reads the cached posterior (not the image): another posterior, another loss
        shifted = {**cached, "latent_mean": cached["latent_mean"] + 1}
        assert not torch.allclose(model.training_loss(shifted, torch.Generator().manual_seed(5))["loss"], encoding)


def test_samples_beyond_the_capacity_are_encoded_at_every_draw(model, monkeypatch):
    encoder = _CountedEncoder(model, monkeypatch)
    cache = LatentCache(2 * ENTRY_BYTES)
    first = cache.add_posteriors(model, _batch([0, 1, 2]))
    again = cache.add_posteriors(model, _batch([0, 1, 2]))
    assert len(cache.entries) == 2 and cache.bytes == 2 * ENTRY_BYTES
    # what is counted is what is held: no entry keeps a larger tensor (the encoder's moments) alive
    assert all(m.untyped_storage().nbytes() + s.untyped_storage().nbytes() == ENTRY_BYTES
               for m, s in cache.entries.values())
    assert encoder.images == 4  # 0, 1, 2, then 2 again
    assert torch.equal(again["latent_mean"], first["latent_mean"])  # encoded alone each time: the same bits
    assert cache.summary()["encoded"] == 4 and cache.summary()["reused"] == 2


def test_the_cache_is_on_only_for_samples_that_repeat():
    assert isinstance(latent_cache_for(1, min_crop=1.0), LatentCache)
    assert latent_cache_for(1, min_crop=1.0).capacity_bytes == 2**20
    assert latent_cache_for(0, min_crop=1.0) is None
    assert latent_cache_for(1024, min_crop=0.7) is None  # random crops: every draw is a new image
    with pytest.raises(ValueError, match="latent_cache_mib"):
        latent_cache_for(-1, min_crop=1.0)
    with pytest.raises(ValueError, match="latent_cache_mib"):
        TrainOptions(latent_cache_mib=-1)
    with pytest.raises(ValueError, match="capacity"):
        LatentCache(0)


def _train(shards: Path, root: Path, runs: dict[str, tuple[str, ...]]) -> dict[str, list[dict]]:
    """name -> the metrics.jsonl records of a 6-step run under ``root/<name>`` with the extra flags of ``runs``.
    The runs go side by side (one thread each: a second core works instead of idling)."""
    run_side_by_side({name: [sys.executable, *train_person_args(
        shards, root / name, "--steps", "6", "--batch-size", "4", "--log-every", "1", "--checkpoint-every", "6",
        "--num-workers", "0", *extra)] for name, extra in runs.items()}, root, timeout=600)
    return {name: [json.loads(line) for line in (root / name / "000" / "metrics.jsonl").read_text()
                   .splitlines()] for name in runs}


def test_a_run_encodes_each_training_sample_once_and_trains_as_without_the_cache(train_shards, tmp_path):
    """6 steps of 4 over person 000's 8 training samples (3 epochs): 8 encoded, 16 reused, the same losses."""
    runs = _train(train_shards, tmp_path, {"cached": (), "plain": ("--latent-cache-mib", "0"),
                                           "cropped": ("--min-crop", "0.8")})
    cached, plain, cropped = runs["cached"], runs["plain"], runs["cropped"]
    [summary] = [r["latent_cache"] for r in cached if "latent_cache" in r]
    assert summary["samples"] == summary["encoded"] == 8 and summary["reused"] == 16
    assert not any("latent_cache" in r for r in plain)
    losses = [[r["loss"] for r in run if "loss" in r] for run in (cached, plain)]
    assert len(losses[0]) == 6
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert not any("latent_cache" in r for r in cropped)  # random crops: no cache, whatever its memory
