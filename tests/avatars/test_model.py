import dataclasses
import os

import pytest
import torch

from avatars.configs import FeatureConfig, tiny_config
from avatars.models import DiffusionAvatarsModel
from avatars.models.diffusion_avatars import load_trainable_weights
from avatars.models.expression_attention import ExpressionAttnProcessor, expression_target_blocks
from avatars.testing import synthetic_batch


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models are too small for intra-op threads; on the shared 2-core machine two
    threads per process oversubscribe the CPU (measured: 40 train steps 5.8 s vs 85 s under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _perturb_zero_layers(model: DiffusionAvatarsModel, scale: float = 0.05) -> None:
    """Gives the zero-initialised output layers small random values (as after a few steps)."""
    g = torch.Generator().manual_seed(1)
    zero_layers = list(model.controlnet.controlnet_down_blocks) + [
        model.controlnet.controlnet_mid_block,
        model.controlnet.controlnet_cond_embedding.conv_out,
    ]
    zero_layers += list(model.expression_layers.output_projections())
    with torch.no_grad():
        for layer in zero_layers:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _raw_base_output(model, latents, t, cond):
    """Frozen UNet + ControlNet called directly through diffusers, expression processors removed."""
    context = model.empty_prompt_embedding.expand(latents.shape[0], -1, -1)
    model.expression_layers.uninstall(model.unet)
    try:
        assert not any(isinstance(p, ExpressionAttnProcessor) for p in model.unet.attn_processors.values())
        down, mid = model.controlnet(latents, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
        out = model.unet(latents, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        plain = model.unet(latents, t, encoder_hidden_states=context).sample
    finally:
        model.expression_layers.install(model.unet)
    return out, plain


@torch.no_grad()
def test_zero_init_output_equals_base_model():
    model = DiffusionAvatarsModel(tiny_config())
    batch = synthetic_batch(2)
    cond = model.conditioning(batch)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    ours = model.denoise(latents, t, cond, model.encode_expression(batch["expression"]))
    base, plain = _raw_base_output(model, latents, t, cond)
    torch.testing.assert_close(ours, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)  # ControlNet zero convolutions
    # the comparison can fail: once the zero layers move, the output differs
    _perturb_zero_layers(model)
    moved = model.denoise(latents, t, cond, model.encode_expression(batch["expression"]))
    base_moved, _ = _raw_base_output(model, latents, t, cond)
    assert (moved - base_moved).abs().max() > 1e-4  # expression layers act
    assert (base_moved - plain).abs().max() > 1e-4  # ControlNet acts


@torch.no_grad()
def test_conditioning_scale_multiplies_the_controlnet_residuals_the_unet_adds():
    model = DiffusionAvatarsModel(tiny_config())
    _perturb_zero_layers(model)
    batch = synthetic_batch(2)
    cond, tokens = model.conditioning(batch), model.encode_expression(batch["expression"])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    made, added = [], []
    model.controlnet.register_forward_hook(lambda module, args, out: made.append(out))
    model.unet.register_forward_pre_hook(
        lambda module, args, kwargs: added.append((kwargs["down_block_additional_residuals"],
                                                   kwargs["mid_block_additional_residual"])), with_kwargs=True)
    default = model.denoise(latents, t, cond, tokens)
    scaled = model.denoise(latents, t, cond, tokens, conditioning_scale=1.4)
    assert (scaled - default).abs().max() > 1e-4
    (down, mid), (down_added, mid_added) = made[1], added[1]
    for produced, given in zip([*down, mid], [*down_added, mid_added]):
        torch.testing.assert_close(given, produced * 1.4, rtol=0, atol=0)
    # at 1 (training, and the default) the residuals are added as made: the same tensors
    assert all(given is produced for produced, given in zip([*made[0][0], made[0][1]], [*added[0][0], added[0][1]]))


def test_gradients_reach_exactly_the_trainable_parts():
    model = DiffusionAvatarsModel(tiny_config())
    _perturb_zero_layers(model)
    loss = model.training_loss(synthetic_batch(2), generator=torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    trainable_prefixes = ("controlnet.", "expression_tokens.", "expression_layers.", "conditioning.features.")
    names = set()
    for name, p in model.named_parameters():
        if name.startswith(trainable_prefixes):
            assert p.requires_grad, name
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
            names.add(name.split(".")[0])
        else:
            assert name.startswith(("unet.", "vae.")), name
            assert not p.requires_grad and p.grad is None, f"frozen {name} got a gradient"
    assert names == {"controlnet", "expression_tokens", "expression_layers", "conditioning"}
    assert set(model.trainable_state_dict()) == {n for n, p in model.named_parameters() if p.requires_grad}
    groups = model.parameter_groups(lr_networks=1e-4, lr_features=1e-2)
    assert [g["lr"] for g in groups] == [1e-4, 1e-2]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.conditioning.features.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(model.trainable_state_dict())


def test_fine_tuned_unet_is_trained_with_the_controlnet():
    """``train_unet``: the base UNet joins the trained parts (the paper keeps it frozen); the VAE stays
    frozen, and the official clipping scope still clips the ControlNet alone."""
    from avatars.training.optim import clipped_parameters

    model = DiffusionAvatarsModel(tiny_config(train_unet=True))
    _perturb_zero_layers(model)
    model.training_loss(synthetic_batch(2), generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert all(p.requires_grad and p.grad is not None for p in model.unet.parameters())
    assert model.unet.conv_out.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert set(model.trainable_modules()) == {"conditioning", "controlnet", "unet", "expression_tokens",
                                              "expression_layers"}
    clipped = {id(p) for p in clipped_parameters(model, "controlnet")}
    assert clipped == {id(p) for p in model.controlnet.parameters()}
    with pytest.raises(ValueError, match="train_unet"):
        tiny_config(train_unet=True, use_ldm_prior=False)


def _overfit(config, steps: int = 40) -> tuple[float, float]:
    torch.manual_seed(0)
    model = DiffusionAvatarsModel(config)
    batch = synthetic_batch(2, expression_dim=config.expression_dim)
    optimizer = torch.optim.Adam(model.parameter_groups(lr_networks=1e-3, lr_features=1e-2))
    losses = []
    for _ in range(steps):
        loss = model.training_loss(batch, generator=torch.Generator().manual_seed(0))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_tiny_model_overfits_one_batch():
    first, last = _overfit(tiny_config())
    assert last < 0.5 * first, (first, last)


def test_without_diffusion_ablation_overfits():
    first, last = _overfit(tiny_config(use_diffusion=False), steps=25)
    assert last < 0.5 * first, (first, last)


def test_single_pass_reads_its_output_as_the_bases_velocity(tmp_path):
    """w/o diffusion: one pass on a zero latent at the last timestep, read as the base was trained (v-prediction:
    x0 = -v at zero terminal SNR), so an untrained ablation starts from the base's own estimate, not its negation;
    the loss is MSE of that x0 to the clean latent, the pipeline renders it, and a checkpoint records the reading."""
    import json

    from avatars.pipelines import AvatarPipeline

    model = DiffusionAvatarsModel(tiny_config(use_diffusion=False))
    _perturb_zero_layers(model)
    batch = synthetic_batch(2)
    g = torch.Generator().manual_seed(3)
    loss = model.training_loss(batch, generator=g)["loss"]
    latents = model.encode_images(batch["image"], torch.Generator().manual_seed(3))
    cond, tokens = model.conditioning(batch), model.encode_expression(batch["expression"])
    t = torch.full((2,), 999)
    with torch.no_grad():
        out = model.denoise(torch.zeros_like(latents), t, cond, tokens)
    assert float(model.noise_scheduler.alphas_cumprod[999]) == 0.0
    torch.testing.assert_close(loss, torch.mean((-out - latents) ** 2), rtol=1e-5, atol=1e-6)
    frames = {k: batch[k] for k in ("mask", "depth", "normals", "canonical", "expression")}
    torch.testing.assert_close(AvatarPipeline(model)(frames), model.decode_latents(-out), rtol=0, atol=1e-4)

    model.save_pretrained(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert meta["single_pass"] == "v_at_last_timestep"
    DiffusionAvatarsModel.from_pretrained(tmp_path / "a")
    del meta["single_pass"]  # written before the output was read as v: refused, not rendered negated
    (tmp_path / "a" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="w/o diffusion.*retrain"):
        DiffusionAvatarsModel.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize("train_timesteps", [0, 20])
def test_training_loss_is_mse_to_velocity(train_timesteps):
    model = DiffusionAvatarsModel(tiny_config(train_timesteps=train_timesteps))
    batch = synthetic_batch(2)
    g = torch.Generator().manual_seed(3)
    loss = model.training_loss(batch, generator=g)["loss"]
    # recompute with the same random stream
    g = torch.Generator().manual_seed(3)
    latents = model.encode_images(batch["image"], g)
    noise = torch.randn(latents.shape, generator=g)
    if train_timesteps:  # one of the 20 timesteps a 20-step render visits: 999, 949, ..., 49
        t = 999 - 50 * torch.randint(0, 20, (2,), generator=g)
    else:
        t = torch.randint(0, 1000, (2,), generator=g)
    s = model.noise_scheduler
    assert s.config.prediction_type == "v_prediction" and float(s.alphas_cumprod[-1]) == 0.0
    alpha_bar = s.alphas_cumprod[t][:, None, None, None]
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    with torch.no_grad():
        pred = model.denoise(s.add_noise(latents, noise, t), t, model.conditioning(batch),
                             model.encode_expression(batch["expression"]))
    torch.testing.assert_close(loss, torch.mean((pred - velocity) ** 2), rtol=1e-5, atol=1e-6)


def test_train_timesteps_draws_only_the_timesteps_a_render_visits(monkeypatch):
    """train_timesteps=N: the loss trains on the N timesteps of an N-step render only; 0: on all of them."""
    drawn: list[int] = []
    for n in (10, 0):
        model = DiffusionAvatarsModel(tiny_config(train_timesteps=n))
        add_noise = model.noise_scheduler.add_noise
        monkeypatch.setattr(model.noise_scheduler, "add_noise",
                            lambda x, noise, t: drawn.extend(t.tolist()) or add_noise(x, noise, t))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _ in range(8):
                model.training_loss(synthetic_batch(4), generator=g)
        if n:
            assert set(drawn) <= set(range(99, 1000, 100)) and len(set(drawn)) >= 8, sorted(set(drawn))
            drawn.clear()
    assert len(set(drawn)) > 25 and not set(drawn) <= set(range(99, 1000, 100))


def test_ablation_switches():
    base = tiny_config()
    no_expr = DiffusionAvatarsModel(tiny_config(use_expression=False))
    assert no_expr.num_expression_layers == 0 and no_expr.expression_tokens is None
    batch = synthetic_batch(2)
    del batch["expression"]
    assert torch.isfinite(no_expr.training_loss(batch)["loss"])
    with pytest.raises(KeyError, match="expression"):
        DiffusionAvatarsModel(base).training_loss(batch)

    no_feat = DiffusionAvatarsModel(dataclasses.replace(base, features=FeatureConfig(mapping="none")))
    assert no_feat.controlnet.config.conditioning_channels == 9 + base.expression_dim  # + the expression channels
    assert len(no_feat.parameter_groups()) == 1
    spherical = FeatureConfig(mapping="spherical", resolution=32, channels=4)
    sph = DiffusionAvatarsModel(dataclasses.replace(base, features=spherical))
    assert sph.controlnet.config.conditioning_channels == base.conditioning_channels == 25 + base.expression_dim

    scratch = DiffusionAvatarsModel(tiny_config(use_ldm_prior=False))
    assert scratch.controlnet is None
    assert all(p.requires_grad for p in scratch.unet.parameters())
    assert scratch.unet.config.in_channels == 4 + base.unet.block_out_channels[0]
    assert not any(p.requires_grad for p in scratch.vae.parameters())
    loss = scratch.training_loss(synthetic_batch(2))["loss"]
    loss.backward()
    assert scratch.cond_embedding.conv_in.weight.grad.abs().sum() > 0
    for model in (no_feat, sph):
        assert torch.isfinite(model.training_loss(synthetic_batch(2))["loss"])


def _same_model(a: DiffusionAvatarsModel, b: DiffusionAvatarsModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, p in sa.items():
        torch.testing.assert_close(sb[name], p, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(b.empty_prompt_embedding, a.empty_prompt_embedding, rtol=0, atol=0)
    batch = synthetic_batch(2, expression_dim=a.config.expression_dim)
    if not a.config.use_expression:
        del batch["expression"]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        assert a.training_loss(batch, g1)["loss"] == b.training_loss(batch, g2)["loss"]


@pytest.mark.parametrize("variant", ["paper-like", "w/o LDM prior", "w/o features and expression", "fine-tuned UNet"])
def test_save_and_load_roundtrip(tmp_path, variant):
    config = {"paper-like": tiny_config(), "w/o LDM prior": tiny_config(use_ldm_prior=False),
              "w/o features and expression": tiny_config(features=FeatureConfig(mapping="none"),
                                                         use_expression=False),
              "fine-tuned UNet": tiny_config(train_unet=True)}[variant]
    model = DiffusionAvatarsModel(config)
    if config.use_ldm_prior and config.use_expression:
        _perturb_zero_layers(model)
        with torch.no_grad():
            model.conditioning.features.spatial.add_(1.0)
    if config.train_unet:  # the loaded model must use the stored UNet, not the base's
        assert "unet" in DiffusionAvatarsModel.part_names(config)
        with torch.no_grad():
            model.unet.conv_out.weight.add_(0.1)
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    model.save_pretrained(out)  # overwriting keeps a valid directory
    parts = DiffusionAvatarsModel.part_names(config)
    assert sorted(os.listdir(out)) == sorted(["config.json", "empty_prompt_embedding.safetensors", *parts])
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary leftovers
    for name in parts:  # each part is a diffusers model directory
        assert sorted(os.listdir(out / name)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    size = sum(os.path.getsize(out / name / "diffusion_pytorch_model.safetensors") for name in parts)
    n_trainable = sum(p.numel() for p in model.trainable_state_dict().values())
    assert size < 4 * n_trainable + 100_000  # frozen weights are not stored
    stored = load_trainable_weights(out)  # the parts' weights under the model's parameter names
    assert stored.keys() == model.trainable_state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in model.trainable_state_dict().items())
    _same_model(model, DiffusionAvatarsModel.from_pretrained(out))


def test_format_1_checkpoints_still_load(tmp_path):
    """Format 1 (before the parts were diffusers models): one trainable.safetensors keyed by the
    model's parameter names, which did not change."""
    import json

    from safetensors.torch import save_file

    model = DiffusionAvatarsModel(tiny_config())
    _perturb_zero_layers(model)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"format": 1, "base_model": None, "config": model.config.to_dict()}))
    save_file({k: v.detach().contiguous() for k, v in model.trainable_state_dict().items()},
              str(old / "trainable.safetensors"))
    save_file({"empty_prompt_embedding": model.empty_prompt_embedding}, str(old / "empty_prompt_embedding.safetensors"))
    loaded = DiffusionAvatarsModel.from_pretrained(old)
    _same_model(model, loaded)
    loaded.save_pretrained(tmp_path / "converted")  # saving converts it to the current format
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["format"] == 2
    _same_model(model, DiffusionAvatarsModel.from_pretrained(tmp_path / "converted"))


def test_from_pretrained_errors(tmp_path):
    import json
    import shutil

    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffusionAvatarsModel.from_pretrained(tmp_path / "missing")
    model = DiffusionAvatarsModel(tiny_config())
    model.save_pretrained(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**meta, "format": 3}))
    with pytest.raises(ValueError, match=r"format 3 .* \(1 or 2\)"):
        DiffusionAvatarsModel.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "a" / "expression_layers")
    with pytest.raises(FileNotFoundError, match="expression_layers"):
        DiffusionAvatarsModel.from_pretrained(tmp_path / "a")
    other = DiffusionAvatarsModel(tiny_config(use_expression=False))
    with pytest.raises(KeyError, match="missing"):
        other.load_trainable_state_dict(model.trainable_state_dict())
    # a part whose shape disagrees with the config is refused
    wrong = tiny_config(expression_dim=8)
    with pytest.raises(ValueError, match="expression_tokens"):
        DiffusionAvatarsModel(wrong, parts={"expression_tokens": model.expression_tokens})


def test_forward_is_training_loss_and_checks_expression_dim():
    model = DiffusionAvatarsModel(tiny_config())
    batch = synthetic_batch(2)
    with torch.no_grad():
        a = model(batch, torch.Generator().manual_seed(0))["loss"]
        b = model.training_loss(batch, torch.Generator().manual_seed(0))["loss"]
    assert a == b
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        model.training_loss(synthetic_batch(2, expression_dim=8))
    bad = dict(batch)
    del bad["canonical"]
    with pytest.raises(KeyError, match="canonical"):
        model.training_loss(bad)


@torch.no_grad()
def test_deepcopy_keeps_expression_processors_with_the_copy():
    import copy

    model = DiffusionAvatarsModel(tiny_config())
    clone = copy.deepcopy(model)
    _perturb_zero_layers(clone)  # only the clone's expression layers / ControlNet move
    batch = synthetic_batch(2)
    cond = model.conditioning(batch)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 900])
    original = model.denoise(latents, t, cond, model.encode_expression(batch["expression"]))
    base, _ = _raw_base_output(model, latents, t, cond)
    torch.testing.assert_close(original, base, rtol=0, atol=1e-6)
    moved = clone.denoise(latents, t, cond, clone.encode_expression(batch["expression"]))
    clone_base, _ = _raw_base_output(clone, latents, t, cond)
    assert (moved - clone_base).abs().max() > 1e-4
    # the clone's processors point at the clone's layers, and uninstall/install did not nest wrappers
    processors = [block.attn2.processor for _, block in expression_target_blocks(clone.unet)]
    assert [p.expression for p in processors] == list(clone.expression_layers.layers)
    assert not any(isinstance(p.base, ExpressionAttnProcessor) for p in clone.unet.attn_processors.values())


@torch.no_grad()
def test_expression_channels_reach_the_controlnet():
    """With ``expression_channels`` (the tiny preset) the code changes the ControlNet's output by itself, i.e. with
    the expression cross-attentions silent; without them (the paper's layout) it does not."""
    batch = synthetic_batch(2)
    other = {**batch, "expression": batch["expression"].flip(0)}
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    changes = {}
    for channels in (True, False):
        model = DiffusionAvatarsModel(tiny_config(expression_channels=channels))
        _perturb_zero_layers(model)
        for out in model.expression_layers.output_projections():
            out.weight.zero_()
            out.bias.zero_()

        def run(b):
            return model.denoise(latents, t, model.conditioning(b), model.encode_expression(b["expression"]))

        changes[channels] = float((run(batch) - run(other)).abs().max())
    assert changes[True] > 1e-4 and changes[False] == 0.0, changes


def test_expression_tokens_sets_how_many_tokens_the_expression_attentions_read(monkeypatch):
    """DiffusionAvatarsConfig.expression_tokens: that many tokens reach every expression attention in a step."""
    model = DiffusionAvatarsModel(tiny_config(expression_tokens=2))
    batch = synthetic_batch(2)
    tokens = model.encode_expression(batch["expression"])
    assert tokens.shape == (2, 2, model.config.unet.cross_attention_dim)
    seen = []
    call = ExpressionAttnProcessor.__call__

    def spy(self, attn, hidden_states, *args, expression_tokens=None, **kwargs):
        if self.expression is not None:
            seen.append(tuple(expression_tokens.shape))
        return call(self, attn, hidden_states, *args, expression_tokens=expression_tokens, **kwargs)

    monkeypatch.setattr(ExpressionAttnProcessor, "__call__", spy)
    model.training_loss(batch, generator=torch.Generator().manual_seed(0))
    assert model.num_expression_layers > 0
    assert seen == [(2, 2, model.config.unet.cross_attention_dim)] * model.num_expression_layers


def test_a_saved_avatar_with_a_flipped_byte_is_refused(tmp_path):
    """A flipped byte in a weights file loads as other weights without any error: config.json records the
    sha256 of every file, checked before loading; an avatar saved before that loads with a warning."""
    import json

    from common.io import DataError

    model = DiffusionAvatarsModel(tiny_config())
    model.save_pretrained(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "controlnet/diffusion_pytorch_model.safetensors" in meta["sha256"]
    assert "empty_prompt_embedding.safetensors" in meta["sha256"] and "config.json" not in meta["sha256"]
    weights = tmp_path / "a" / "controlnet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    for load in (DiffusionAvatarsModel.from_pretrained, load_trainable_weights):
        with pytest.raises(DataError, match="sha256 differs") as error:
            load(tmp_path / "a")
        assert error.value.path == weights
    model.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["sha256"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="written before avatars recorded the sha256"):
        _same_model(model, DiffusionAvatarsModel.from_pretrained(tmp_path / "old"))
