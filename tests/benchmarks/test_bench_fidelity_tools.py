"""Pieces of the fidelity benchmarks that decide what they measure (no real training here)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import heldout  # noqa: E402
from bench_base_vae import colour_error, parse_variant, scores  # noqa: E402

from avatars.evaluation.metrics import srgb_to_lab  # noqa: E402


def test_base_vae_variant_parsing():
    name, pretrain, vae = parse_variant("f2:block_out_channels=16-32,vae_lr=3e-3,latent_channels=8,vae_steps=400")
    assert name == "f2"
    assert pretrain == {"vae_lr": pytest.approx(3e-3), "vae_steps": 400}
    assert vae == {"block_out_channels": (16, 32), "latent_channels": 8}


class _ShiftVAE:
    """decode(encode(x)) = x + 0.2 inside the top half of the image, exact elsewhere."""

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        out = z.clone()
        out[:, :, : z.shape[2] // 2] += 0.2
        return SimpleNamespace(sample=out)


def test_base_vae_face_psnr_counts_only_the_mask():
    images = torch.zeros(2, 3, 8, 8)
    top, bottom = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    top[:, :, :4], bottom[:, :, 4:] = 1, 1
    s_top, _ = scores(_ShiftVAE(), images, top)
    s_bottom, _ = scores(_ShiftVAE(), images, bottom)
    assert s_top["psnr_face"] == pytest.approx(20.0, abs=1e-3)  # error 0.1 in [0, 1] units everywhere in the mask
    assert s_bottom["psnr_face"] > 100  # no error inside this mask
    assert s_top["psnr"] == pytest.approx(23.01, abs=0.01)  # half the frame wrong


def test_base_vae_colour_error_is_the_distance_of_the_regions_mean_colours():
    gt = torch.full((2, 3, 8, 8), 0.5)
    recon = gt.clone()
    recon[:, 0, :4] = 0.7  # redder in the top half only
    top, bottom, tiny = (torch.zeros(2, 1, 8, 8, dtype=torch.bool) for _ in range(3))
    top[:, :, :4], bottom[:, :, 4:], tiny[:, :, 0, :3] = True, True, True
    expected = float((srgb_to_lab(torch.tensor([0.7, 0.5, 0.5])) - srgb_to_lab(torch.tensor([0.5, 0.5, 0.5]))).norm())
    assert colour_error(recon, gt, top) == pytest.approx(expected, rel=1e-5) and expected > 10
    assert colour_error(recon, gt, bottom) == pytest.approx(0.0, abs=1e-9)
    assert colour_error(recon, gt, tiny) != colour_error(recon, gt, tiny)  # no image with 10 pixels: NaN
    # the mean colour, not the mean error: a region half +0.2 and half -0.2 red has the ground truth's mean
    recon[:, 0, 4:] = 0.3
    assert colour_error(recon, gt, top | bottom) < 0.1 * expected


def test_train_variant_checkpoints_once_at_the_end(tmp_path, monkeypatch, tiny_dataset):
    seen = {}

    def fake_train(cfg, callbacks=()):
        seen["cfg"] = cfg
        return {"steps": cfg.steps}

    monkeypatch.setattr(heldout, "train_person", fake_train)
    run_dir, result = heldout.train_variant(heldout.Variant.parse("short:steps=7"), "000", 0, tiny_dataset[2],
                                            None, tmp_path / "out")
    assert seen["cfg"].steps == 7 and seen["cfg"].checkpoint_every == 7 and seen["cfg"].resume == "never"
    assert result["steps"] == 7 and (run_dir / "variant.json").is_file()


def test_main_job_base_is_the_keyed_base_launch_all_writes(tmp_path):
    """launch_all keys its base folder (<workdir>/base/tiny-<key>); the benchmarks find the newest
    finished one, or a base written by hand at <workdir>/base/tiny."""
    import os

    from avatars.training.base_pretraining import INFO_FILE

    with pytest.raises(FileNotFoundError, match="no pretrained tiny base"):
        heldout.main_job_base(tmp_path)
    for i, key in enumerate(("tiny-aaa", "tiny-bbb", "tiny-ccc")):
        (tmp_path / "base" / key).mkdir(parents=True)
        if key != "tiny-ccc":  # unfinished: no info file
            (tmp_path / "base" / key / INFO_FILE).write_text("{}")
            os.utime(tmp_path / "base" / key / INFO_FILE, (1000 + i, 1000 + i))
    assert heldout.main_job_base(tmp_path) == tmp_path / "base" / "tiny-bbb"
    (tmp_path / "base" / "tiny").mkdir()
    assert heldout.main_job_base(tmp_path) == tmp_path / "base" / "tiny"


def test_face_psnr_and_the_clean_estimate_from_pure_noise():
    """The training-frame rows: PSNR inside the mask only, and at t = 999 (alpha_bar 0) the clean estimate is
    the decoded -v of pure noise, i.e. what the conditioning alone gives."""
    from avatars.configs import tiny_config
    from avatars.models import DiffusionAvatarsModel
    from avatars.testing import synthetic_batch

    gt, mask = torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1
    pred = gt.clone()
    pred[:, :, :4] += 0.1
    assert heldout.face_psnr(pred, gt, mask) == pytest.approx(20.0, abs=1e-3)
    assert heldout.face_psnr(pred, gt, 1 - mask) > 90

    model = DiffusionAvatarsModel(tiny_config(expression_dim=8)).eval()
    batch = synthetic_batch(2, expression_dim=8)
    out = heldout.clean_estimate(model, batch, 999, seed=3)
    assert float(model.noise_scheduler.alphas_cumprod[999]) == 0.0
    latents = model.vae.encode(batch["image"]).latent_dist.mean
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v = model.denoise(noise, torch.full((2,), 999), model.conditioning(batch),
                          model.encode_expression(batch["expression"]))
        expected = model.decode_latents(-v)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert out.shape == batch["image"].shape and 0 <= float(out.min()) and float(out.max()) <= 1


def test_conditioning_scale_renders_the_same_avatar_at_another_scale_and_restores_its_own():
    """bench_fidelity's --scales rows: inside the block the render is the one of a model saved with that scale,
    after it the model's own again; a scale the config refuses is refused here too, leaving the config as it was."""
    import dataclasses

    from avatars.configs import tiny_config
    from avatars.models import DiffusionAvatarsModel
    from avatars.testing import activate_zero_layers, synthetic_batch

    model = activate_zero_layers(DiffusionAvatarsModel(tiny_config(expression_dim=8))).eval()
    batch = {k: v for k, v in synthetic_batch(1, expression_dim=8).items() if k != "image"}
    own = model.config
    at_own = heldout.render(model, batch, steps=2)
    with heldout.conditioning_scale(model, 1.0):
        at_one = heldout.render(model, batch, steps=2)
    assert model.config is own
    saved_at_one = activate_zero_layers(DiffusionAvatarsModel(dataclasses.replace(own, conditioning_scale=1.0))).eval()
    torch.testing.assert_close(at_one, heldout.render(saved_at_one, batch, steps=2), rtol=0, atol=0)
    assert (at_one - at_own).abs().max() > 1e-3
    with pytest.raises(ValueError, match="conditioning_scale must be a positive number"):
        with heldout.conditioning_scale(model, 0.0):
            pass
    assert model.config is own
