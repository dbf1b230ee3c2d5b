"""Pretraining of the tiny base model on the tiny synthetic data set (a few steps each)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avatars.base_model import EMPTY_PROMPT_FILE, EMPTY_PROMPT_KEY, load_unet_and_vae
from avatars.configs import tiny_config
from avatars.data import LoaderConfig, ShardDataset
from avatars.models import DiffusionAvatarsModel
from avatars.models.base_networks import build_vae
from avatars.training import base_pretraining
from avatars.training.base_pretraining import (
    INFO_FILE,
    BasePretrainConfig,
    _optimizer_step,
    encode_latents,
    fold_latent_scale,
    held_out_images,
    image_batches,
    latent_shape,
    pretrain_base,
    reconstruction_loss,
    reconstruction_psnr,
    resolve_persons,
    train_unet,
    train_vae,
    unet_draws,
    vae_loss,
)
from jobs import pretrain_base as cli
from shards.writer import shard_paths


@pytest.fixture(scope="module")
def shard_root(tiny_dataset):
    return tiny_dataset[2]  # shared read-only (tests/conftest.py)


def _config(shard_root, output, **kw) -> BasePretrainConfig:
    base = dict(shard_root=shard_root, output=output, vae_steps=3, unet_steps=3, vae_batch_size=4,
                unet_batch_size=4, scale_batches=2, eval_images=4, num_workers=0, log_every=0)
    return BasePretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pretrained(shard_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny"
    info = pretrain_base(_config(shard_root, out))
    return out, info


def test_output_is_a_loadable_diffusers_base(pretrained):
    out, info = pretrained
    assert not info["skipped"]
    unet, vae = load_unet_and_vae(out)
    assert unet.config.cross_attention_dim == 32 and vae.config.latent_channels == 4
    emb = load_file(str(out / EMPTY_PROMPT_FILE))[EMPTY_PROMPT_KEY]
    assert emb.shape == (1, 77, 32)
    saved = json.loads((out / INFO_FILE).read_text())
    assert saved["vae"]["steps"] == 3 and saved["unet"]["steps"] == 3
    assert 0 < saved["cpu_seconds"]["vae"] < saved["cpu_seconds"]["total"]
    assert saved["vae"]["heldout_split"] == "test_seq" and saved["vae"]["heldout_images"] == 4
    # the held-out PSNR is the saved (scale-folded) VAE's
    held_out = held_out_images(saved["config"]["shard_root"], saved["config"]["persons_resolved"], 4, 64)
    assert saved["vae"]["heldout_psnr_db"] == pytest.approx(reconstruction_psnr(vae, held_out), abs=1e-3)
    assert saved["vae"]["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    # With folding, the config's factor makes the latents unit-variance (measured on training batches).
    assert saved["vae"]["scaled_latent_std"] == pytest.approx(1.0, rel=0.35)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_avatar_model_builds_on_the_base_with_its_frozen_weights(pretrained):
    out, _ = pretrained
    model = DiffusionAvatarsModel(tiny_config(expression_dim=10, requires_pretrained_base=True), base_model=out)
    unet, vae = load_unet_and_vae(out)
    unet_state = unet.state_dict()
    for name, value in vae.state_dict().items():
        assert torch.equal(model.vae.state_dict()[name], value), name
    model_unet = model.unet.state_dict()
    for name, value in unet_state.items():
        assert torch.equal(model_unet[name], value), name
    emb = load_file(str(out / EMPTY_PROMPT_FILE))[EMPTY_PROMPT_KEY]
    assert torch.equal(model.empty_prompt_embedding, emb)
    assert not any(p.requires_grad for p in model.vae.parameters())


def test_vae_training_reduces_reconstruction_loss(shard_root):
    persons = resolve_persons(shard_root, "all")
    loader = LoaderConfig(resolution=64, batch_size=4, augment=False, num_workers=0)
    batches = [next(image_batches(ShardDataset(shard_paths(shard_root, p, "train"), loader), loader, shuffle=False))
               for p in persons]
    images, masks = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert masks.shape == (images.shape[0], 1, 64, 64) and 0 < masks.mean() < 1
    model_config = tiny_config(expression_dim=10)
    # 12 steps bring the loss to ~0.2x (40 steps: ~0.09x; measured on this data), far past the 0.6x asked
    config = _config(shard_root, shard_root / "unused", vae_steps=12, vae_lr=4e-3, warmup_steps=2)
    weighting = dict(mask=masks, face_weight=config.vae_face_weight)  # the default face weighting
    torch.manual_seed(0)
    before_vae = build_vae(model_config.vae, 64)
    with torch.no_grad():
        before = vae_loss(before_vae, images, 0.0, **weighting)[1].item()
    vae, final, first = train_vae(config, model_config, iter([(images, masks)] * config.vae_steps))
    with torch.no_grad():
        after = vae_loss(vae, images, 0.0, torch.Generator().manual_seed(0), **weighting)[1].item()
    assert first == pytest.approx(before, rel=0.05)  # same seeded initialisation
    assert after < 0.6 * before, (before, after)


def test_vae_adam_beta2_reaches_the_optimizer(shard_root):
    # Adam's first step is the same for every beta2 (the bias correction); from the second on they part
    loader = LoaderConfig(resolution=64, batch_size=4, augment=False, num_workers=0)
    batch = next(image_batches(ShardDataset(shard_paths(shard_root, "000", "train"), loader), loader, shuffle=False))

    def trained(beta2: float, steps: int) -> torch.Tensor:
        config = _config(shard_root, shard_root / "unused", vae_steps=steps, vae_adam_beta2=beta2)
        vae = train_vae(config, tiny_config(expression_dim=10), iter([batch] * steps))[0]
        return torch.cat([p.flatten() for p in vae.parameters()])

    torch.testing.assert_close(trained(0.95, 1), trained(0.999, 1), rtol=0, atol=1e-6)
    assert not torch.allclose(trained(0.95, 3), trained(0.999, 3))
    torch.testing.assert_close(trained(0.95, 3), trained(0.95, 3), rtol=0, atol=0)


def test_unet_trains_the_same_on_only_the_images_it_draws(shard_root):
    # pretrain_base encodes only the training images stage 2 draws: the UNet must come out as it
    # does from every image encoded, and the rows must be those of the full encoding
    persons = resolve_persons(shard_root, "all")
    model_config = tiny_config(expression_dim=10)
    config = _config(shard_root, shard_root / "unused", unet_steps=3, unet_batch_size=4)
    loader = LoaderConfig(resolution=64, batch_size=8, augment=True, num_workers=0, seed=1)
    dataset = ShardDataset([s for p in persons for s in shard_paths(shard_root, p, "train")], loader)
    torch.manual_seed(0)
    vae = build_vae(model_config.vae, 64).eval().requires_grad_(False)
    full_mean, full_std = encode_latents(vae, dataset, loader, passes=2)
    images = 2 * len(dataset)
    assert full_mean.shape == (images, *latent_shape(model_config))
    draws = unet_draws(config, images, latent_shape(model_config), 1000)
    drawn = torch.cat([d[0] for d in draws]).unique()
    assert 0 < len(drawn) <= 12 < images
    mean, std = encode_latents(vae, dataset, loader, passes=2, indices=drawn.tolist())
    torch.testing.assert_close(mean, full_mean[drawn], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, full_std[drawn], rtol=1e-4, atol=1e-5)
    row = torch.full((images,), -1, dtype=torch.long)
    row[drawn] = torch.arange(len(drawn))
    context = torch.randn(1, 77, model_config.unet.cross_attention_dim)
    reference, ref_loss, _ = train_unet(config, model_config, 0.18215, context, full_mean, full_std)
    unet, loss, _ = train_unet(config, model_config, 0.18215, context, mean, std,
                               [(row[idx], *rest) for idx, *rest in draws])
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    for (name, value), ref in zip(unet.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, ref, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="must lie in"):
        encode_latents(vae, dataset, loader, passes=1, indices=[images])


def test_reconstruction_loss_weights_the_face_and_the_edges():
    images = torch.zeros(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    inside, outside = images.clone(), images.clone()
    inside[..., 1, 1] = 0.5  # the same error, once inside the face and once outside
    outside[..., 1, 6] = 0.5
    plain = reconstruction_loss(inside, images)
    assert plain == pytest.approx(3 * (0.5 + 0.25) / (3 * 64))  # L1 + MSE, the plain mean
    assert reconstruction_loss(outside, images) == pytest.approx(plain)
    # 1 + 3 inside the half of the image that is face: mean weight 2.5
    assert reconstruction_loss(inside, images, mask, face_weight=3.0) == pytest.approx(plain * 4 / 2.5)
    assert reconstruction_loss(outside, images, mask, face_weight=3.0) == pytest.approx(plain * 1 / 2.5)
    # a flat offset has no edges; a single bright pixel has four
    assert reconstruction_loss(images + 0.5, images, gradient_weight=1.0) == pytest.approx(0.75)
    edges = reconstruction_loss(inside, images, gradient_weight=1.0) - plain
    assert edges == pytest.approx(2 * 3 * 0.5 / (3 * 56) * 2)


def test_defaults_are_the_measured_ones():
    # 3e-3 beat 1e-3 by 1.7 dB of face PSNR at 800 steps (bench_base_vae, README); 1e-3 lost hair colours at 400
    config = BasePretrainConfig()
    assert config.vae_lr == 3e-3
    # 1600 steps of 4 images: the face PSNR and expression response of 800 x 16 for 57% of the CPU;
    # 800 x 8 lost 1.2 dB (bench_base_vae, README "Tiny base model")
    assert config.vae_steps == 1600 and config.vae_batch_size == 4 and config.scale_batches * 4 == 128
    # the face weighted 5x: +1.6 dB face PSNR, 0.18 instead of 0.10 of the expression change (README)
    assert config.vae_face_weight == 4.0 and config.vae_gradient_weight == 0.0
    # AdamW beta2 0.95 instead of 0.999: over 7 seeds the worst VAE 28.6 instead of 26.3 dB face PSNR (README)
    assert config.vae_adam_beta2 == 0.95
    # an avatar on a 200-step UNet (lr 2e-3) scored as well as on the 1000 steps (lr 1e-3) of before; at batch 16
    # instead of 32 the avatars of persons 000 / 003 lost 0.1-0.2 dB PSNR and gained face LPIPS (README)
    assert config.unet_steps == 200 and config.unet_lr == 2e-3 and config.unet_batch_size == 16


def test_fold_latent_scale_keeps_decoder_output():
    torch.manual_seed(0)
    vae = build_vae(tiny_config().vae, 64).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist
        ref_mean, ref_std, ref_rec = z.mean.clone(), z.std.clone(), vae.decode(z.mean).sample
        fold_latent_scale(vae, 3.0)
        z2 = vae.encode(x).latent_dist
        rec = vae.decode(z2.mean).sample
    torch.testing.assert_close(z2.mean, 3.0 * ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z2.std, 3.0 * ref_std, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec, ref_rec, rtol=1e-4, atol=1e-4)


def test_idempotent_and_force(shard_root, tmp_path):
    out = tmp_path / "base"
    args = ["--shard-root", str(shard_root), "--output", str(out), "--vae-steps", "2", "--unet-steps", "2",
            "--vae-batch-size", "4", "--unet-batch-size", "4", "--scale-batches", "1", "--eval-images", "2",
            "--num-workers", "0", "--log-every", "0"]
    first = cli.main(args)
    assert not first["skipped"]
    stamp = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = cli.main(args)
    assert again["skipped"] and again["vae"] == first["vae"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    changed = cli.main([a if a != "2" or args[i - 1] != "--vae-steps" else "3" for i, a in enumerate(args)])
    assert not changed["skipped"] and changed["vae"]["steps"] == 3
    forced = cli.main(args + ["--force"])
    assert not forced["skipped"] and forced["vae"]["steps"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["base"]


def test_clear_errors(tmp_path, shard_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_persons(tmp_path / "missing", "all")
    with pytest.raises(FileNotFoundError, match="person 'zz'"):
        resolve_persons(shard_root, "zz")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / INFO_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="pretrain_info.json is unreadable"):
        pretrain_base(_config(shard_root, tmp_path / "base"))
    for field in ("vae_face_weight", "vae_gradient_weight"):
        with pytest.raises(ValueError, match=f"{field} must be >= 0, got -1"):
            pretrain_base(_config(shard_root, tmp_path / "fresh", **{field: -1.0}))
        assert not (tmp_path / "fresh").exists()
    for beta2 in (1.0, -0.1):
        with pytest.raises(ValueError, match=f"vae_adam_beta2 must be in \\[0, 1\\), got {beta2}"):
            pretrain_base(_config(shard_root, tmp_path / "fresh", vae_adam_beta2=beta2))
        assert not (tmp_path / "fresh").exists()


# ---- options set away from their defaults: each one's effect on what is built --------------------
def _tiny(shard_root, output, **kw) -> BasePretrainConfig:
    """One step of each stage on single images: what the option tests below can afford to run whole."""
    sizes = dict(vae_steps=1, unet_steps=1, vae_batch_size=1, unet_batch_size=4, scale_batches=2, eval_images=1,
                 warmup_steps=1)
    return _config(shard_root, output, **{**sizes, **kw})


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_base(shard_root, tmp_path_factory):
    """(output, info, unet, vae) of one _tiny run at the defaults (seed 0, scaling folded, one latent pass)."""
    out = tmp_path_factory.mktemp("tiny-base") / "base"
    info = pretrain_base(_tiny(shard_root, out))
    return (out, info, *load_unet_and_vae(out))


@pytest.fixture(scope="module")
def unfolded_two_passes(shard_root, tmp_path_factory):
    """(output, info, unet, vae, encode_latents calls) of one _tiny run with --no-fold-scaling --latent-passes 2:
    the two options act on different stages (folding on the VAE after stage 1, the passes on stage 2's data)."""
    out = tmp_path_factory.mktemp("unfolded") / "base"
    encoded = []

    def spy(vae, dataset, loader_config, passes, indices=None):
        encoded.append((passes, len(dataset), list(indices)))
        return encode_latents(vae, dataset, loader_config, passes, indices)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base_pretraining, "encode_latents", spy)
        info = pretrain_base(_tiny(shard_root, out, fold_scaling=False, latent_passes=2))
    return (out, info, *load_unet_and_vae(out), encoded)


@pytest.fixture(scope="module")
def unet_inputs(shard_root):
    """Stage 2's inputs (random cached posteriors) and its seeded initial UNet (a run of 0 steps)."""
    model_config = tiny_config(expression_dim=10)
    g = torch.Generator().manual_seed(0)
    shape = latent_shape(model_config)
    inputs = (model_config, 1.0, torch.randn(1, 77, model_config.unet.cross_attention_dim, generator=g),
              torch.randn(2, *shape, generator=g), torch.rand(2, *shape, generator=g))
    start = train_unet(_tiny(shard_root, shard_root / "unused", unet_steps=0), *inputs)[0]
    return inputs, _weights(start)


def test_fold_scaling_false_registers_the_measured_factor_and_leaves_the_vae_unfolded(tiny_base, unfolded_two_passes):
    """--no-fold-scaling: the same VAE as the folded run but for the fold, with scaling_factor = the measured 1/std."""
    _, folded_info, _, folded = tiny_base
    out, info, _, vae, _ = unfolded_two_passes
    measured = info["vae"]["measured_scaling_factor"]
    assert measured == folded_info["vae"]["measured_scaling_factor"]  # the same seed trained the same VAE
    assert measured == pytest.approx(1 / info["vae"]["latent_std"])
    assert not info["vae"]["scaling_folded"] and vae.config.scaling_factor == pytest.approx(measured)
    assert folded.config.scaling_factor == 0.18215 and abs(measured - 0.18215) > 0.1
    refolded = {"quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight"}
    mine, theirs = vae.state_dict(), folded.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if k not in refolded)
    k, c = measured / 0.18215, vae.config.latent_channels  # what folding multiplies the latents by
    torch.testing.assert_close(theirs["quant_conv.weight"][:c], k * mine["quant_conv.weight"][:c])
    torch.testing.assert_close(theirs["post_quant_conv.weight"], mine["post_quant_conv.weight"] / k)
    # the avatar config must carry the registered factor
    with pytest.raises(ValueError, match="scaling_factor"):
        DiffusionAvatarsModel(tiny_config(expression_dim=10, requires_pretrained_base=True), base_model=out)
    config = tiny_config(expression_dim=10, requires_pretrained_base=True)
    config = dataclasses.replace(config, vae=dataclasses.replace(config.vae, scaling_factor=vae.config.scaling_factor))
    assert DiffusionAvatarsModel(config, base_model=out).vae.config.scaling_factor == vae.config.scaling_factor


def test_seed_changes_every_object_pretrained(shard_root, tiny_base, unet_inputs, tmp_path):
    """--seed reaches both stages and the empty prompt: another seed gives another VAE, UNet and embedding."""
    base_out, _, unet0, vae0 = tiny_base
    out = tmp_path / "base"
    pretrain_base(_tiny(shard_root, out, seed=1))
    unet1, vae1 = load_unet_and_vae(out)
    assert _differ(_weights(vae0), _weights(vae1)) and _differ(_weights(unet0), _weights(unet1))
    embedding = [load_file(str(p / EMPTY_PROMPT_FILE))[EMPTY_PROMPT_KEY] for p in (base_out, out)]
    assert not torch.equal(*embedding)
    # the UNet's own initialisation, not only its other VAE (the same seed reproducing a stage: the fold test)
    inputs, start = unet_inputs
    assert _differ(start, _weights(train_unet(_tiny(shard_root, out, unet_steps=0, seed=1), *inputs)[0]))
    assert not _differ(start, _weights(train_unet(_tiny(shard_root, out, unet_steps=0), *inputs)[0]))


def test_latent_passes_draws_the_unet_images_from_more_augmented_passes(tiny_base, unfolded_two_passes):
    """--latent-passes 2: stage 2 draws from twice the training images, images of the second pass encoded."""
    _, base_info, _, _ = tiny_base
    _, info, _, _, encoded = unfolded_two_passes
    [(passes, images, indices)] = encoded
    assert passes == 2 and images == info["train_images"] == base_info["train_images"]
    assert info["unet"]["training_images"] == 2 * images == 2 * base_info["unet"]["training_images"]
    assert max(indices) >= images  # an image of the second pass is one the UNet trains on
    assert info["unet"]["cached_latents"] == len(indices)


def test_kl_weight_pulls_the_posterior_towards_the_prior(shard_root):
    """--kl-weight weighs the KL term: one step at 1.0 lowers the posterior's KL, where the default's raises it."""
    image = held_out_images(shard_root, ["000"], 1, 64)
    mask = torch.ones_like(image[:, :1])

    def kl_after(steps: int, weight: float) -> float:
        config = _tiny(shard_root, shard_root / "unused", vae_steps=steps, kl_weight=weight)
        vae = train_vae(config, tiny_config(expression_dim=10), iter([(image, mask)] * steps))[0]
        with torch.no_grad():
            return vae.encode(image).latent_dist.kl().mean().item()

    before = kl_after(0, 1e-6)  # the seeded initialisation
    # measured: 105 before, 159 after the default's step, 49 after a step at 1.0
    assert kl_after(1, 1.0) < 0.7 * before < before < kl_after(1, 1e-6)


def _first_unet_step(shard_root, unet_inputs, **kw) -> float:
    """The largest change of a UNet weight in stage 2's first step (warm-up done: the full learning rate)."""
    inputs, start = unet_inputs
    unet = train_unet(_tiny(shard_root, shard_root / "unused", unet_batch_size=1, **kw), *inputs)[0]
    return max((value - start[name]).abs().max().item() for name, value in unet.state_dict().items())


def test_unet_lr_is_the_size_of_the_first_adam_step(shard_root, unet_inputs):
    """--unet-lr reaches stage 2's AdamW: its first step moves a weight by at most the rate, the largest by it."""
    assert _first_unet_step(shard_root, unet_inputs, unet_lr=5e-4) == pytest.approx(5e-4, rel=1e-3)


def test_grad_clip_bounds_the_gradient_and_0_turns_it_off(shard_root, unet_inputs, tmp_path):
    """--grad-clip clips both stages' gradient norm; 0 turns clipping off (it used to zero every gradient)."""
    layer = torch.nn.Linear(3, 2)
    for clip, norm in ((0.5, 0.5), (0.0, 100 * 8 ** 0.5)):  # a gradient of 100 on each of the 8 parameters
        before = torch.cat([p.detach().flatten() for p in layer.parameters()])
        opt = torch.optim.SGD(layer.parameters(), lr=1.0)  # the step is the (clipped) gradient itself
        _optimizer_step(100 * sum(p.sum() for p in layer.parameters()), layer, opt,
                        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0), clip)
        step = before - torch.cat([p.detach().flatten() for p in layer.parameters()])
        assert step.norm().item() == pytest.approx(norm, rel=1e-4) and (step > 0).all()
    # in a stage: a clip far below the gradient's norm leaves Adam's first step near zero (below its eps); 0 trains
    assert _first_unet_step(shard_root, unet_inputs, grad_clip=1e-12) < 1e-3 * 2e-3
    assert _first_unet_step(shard_root, unet_inputs, grad_clip=0.0) == pytest.approx(2e-3, rel=1e-3)
    with pytest.raises(ValueError, match="grad_clip must be >= 0, got -1"):
        pretrain_base(_config(shard_root, tmp_path / "fresh", grad_clip=-1.0))
    assert not (tmp_path / "fresh").exists()


def _first_vae_step(shard_root, **kw) -> tuple[float, float]:
    """(reconstruction loss of stage 1's first step, largest change of a VAE weight in that step) on one
    held-out image."""
    image = held_out_images(shard_root, ["000"], 1, 64)
    mask = torch.ones_like(image[:, :1])
    torch.manual_seed(0)  # train_vae seeds its initialisation with config.seed (0) the same way
    start = _weights(build_vae(tiny_config(expression_dim=10).vae, 64))
    config = _tiny(shard_root, shard_root / "unused", **kw)
    vae, _, first = train_vae(config, tiny_config(expression_dim=10), iter([(image, mask)]))
    return first, max((value - start[name]).abs().max().item() for name, value in vae.state_dict().items())


def test_vae_gradient_weight_adds_the_edge_error_to_the_first_loss(shard_root):
    """--vae-gradient-weight reaches stage 1's loss: 1.0 adds the L1 error of the image's finite differences
    to the first step's reconstruction loss (the seeded VAE's, computed here), where the default adds none."""
    image = held_out_images(shard_root, ["000"], 1, 64)
    mask = torch.ones_like(image[:, :1])

    def expected(gradient_weight: float) -> float:
        torch.manual_seed(0)
        vae = build_vae(tiny_config(expression_dim=10).vae, 64).train()
        with torch.no_grad():
            return vae_loss(vae, image, 1e-6, torch.Generator().manual_seed(1), mask, 4.0, gradient_weight)[1].item()

    plain, edges = _first_vae_step(shard_root)[0], _first_vae_step(shard_root, vae_gradient_weight=1.0)[0]
    assert plain == pytest.approx(expected(0.0), rel=1e-4)
    assert edges == pytest.approx(expected(1.0), rel=1e-4)
    assert edges > 1.05 * plain


def test_warmup_steps_scales_the_first_step_of_both_stages(shard_root, unet_inputs):
    """--warmup-steps 4: the first step runs at a quarter of the peak rate (Adam's first step moves a weight by at
    most the rate, the largest by it), in stage 1 (--vae-lr) and in stage 2 (--unet-lr); 1: at the peak."""
    assert _first_vae_step(shard_root, warmup_steps=1)[1] == pytest.approx(3e-3, rel=1e-3)
    assert _first_vae_step(shard_root, warmup_steps=4)[1] == pytest.approx(3e-3 / 4, rel=1e-3)
    assert _first_unet_step(shard_root, unet_inputs, warmup_steps=4) == pytest.approx(2e-3 / 4, rel=1e-3)


def test_the_base_key_follows_the_layout_of_the_networks(shard_root, monkeypatch):
    """The key (the main job's base folder name, and what reuse compares) covered the pretraining settings and the
    data, not the tiny preset's UNet / VAE / scheduler / resolution: after a code change of the layout, the main job
    reused the old base under the same key and trained avatars on networks of another shape."""
    config = BasePretrainConfig(shard_root=shard_root)
    key = base_pretraining.base_key(config)
    assert base_pretraining.base_key(BasePretrainConfig(shard_root=shard_root)) == key
    wider = tiny_config()
    wider = dataclasses.replace(wider, unet=dataclasses.replace(wider.unet, block_out_channels=tuple(
        2 * c for c in wider.unet.block_out_channels)))
    monkeypatch.setattr(BasePretrainConfig, "model_config", lambda self: wider)
    assert base_pretraining.base_key(config) != key
    assert base_pretraining.full_fingerprint(config)["layout"]["unet"]["block_out_channels"] == list(
        wider.unet.block_out_channels)


@pytest.mark.parametrize("flags", [["--vae-steps", "0"], ["--unet-steps", "-1"], ["--num-workers", "-1"],
                                   ["--vae-adam-beta2", "1"], ["--eval-images", "0"]])
def test_the_command_line_refuses_bad_numbers_before_any_work(flags, shard_root, tmp_path, monkeypatch, capsys):
    """Checked in pretrain_base() before, after the persons' shards were indexed: a traceback from the command line
    (and negative workers crashed the loader's thread pool). Now exit code 2 naming the option, before any work
    (the config refuses most when parsed; the step counts, which a stage may run at 0, the command line)."""
    import runpy
    import sys

    script = Path(__file__).resolve().parents[3] / "jobs" / "pretrain_base.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--shard-root", str(shard_root), "--output",
                                      str(tmp_path / "base"), *flags])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    said = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert exit_.value.code == 2 and flags[0].lstrip("-").replace("-", "_") in said.replace("-", "_"), said
    assert not (tmp_path / "base").exists()
