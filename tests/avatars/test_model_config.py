import dataclasses

import pytest
import torch

from avatars.configs import DiffusionAvatarsConfig, FeatureConfig, paper_config, tiny_config
from avatars.models import DiffusionAvatarsModel


def test_paper_config_has_73_conditioning_channels():
    config = paper_config()
    assert config.conditioning_channels == 73
    spherical = dataclasses.replace(config, features=FeatureConfig(mapping="spherical"))
    assert spherical.conditioning_channels == 73
    none = dataclasses.replace(config, features=FeatureConfig(mapping="none"))
    assert none.conditioning_channels == 9
    wider = dataclasses.replace(config, features=FeatureConfig(channels=8))
    assert wider.conditioning_channels == 9 + 32


def test_sd21_layout_on_meta_device():
    config = paper_config()
    with torch.device("meta"):
        model = DiffusionAvatarsModel(config, allow_random_base=True)
    assert model.num_expression_layers == 15  # 6 down + 9 up, mid block excluded
    assert all(name.startswith(("down_blocks", "up_blocks")) for name in model.expression_layers.names)
    assert model.controlnet.config.conditioning_channels == 73
    assert model.controlnet.controlnet_cond_embedding.conv_in.in_channels == 73
    assert model.unet.config.cross_attention_dim == 1024
    assert list(model.unet.config.attention_head_dim) == [5, 10, 20, 20]
    assert model.unet.config.use_linear_projection
    assert model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.heads == 5
    feats = model.conditioning.features
    assert tuple(feats.spatial.shape) == (3, 16, 512, 512) and tuple(feats.ambient.shape) == (16, 512, 512)
    assert model.empty_prompt_embedding.shape == (1, 77, 1024)
    # UNet 865.9 M parameters in SD2.1; the UNet stays frozen
    assert abs(sum(p.numel() for p in model.unet.parameters()) / 1e6 - 865.9) < 0.1
    assert not any(p.requires_grad for p in model.unet.parameters())
    # parameter counts of the paper model (README, bench_model): expression tokens + 15 layers,
    # all trainable parts, and the frozen UNet + VAE
    expression = sum(p.numel() for part in (model.expression_tokens, model.expression_layers)
                     for p in part.parameters())
    assert expression == 44_866_496
    assert sum(p.numel() for p in model.trainable_state_dict().values()) == 425_882_032
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == 949_564_587


#: The fields of Stable Diffusion 2.1's unet/config.json that shape the network.
SD21_UNET_CONFIG = {
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-05,
    "use_linear_projection": True, "upcast_attention": True, "flip_sin_to_cos": True, "freq_shift": 0,
}


def test_random_paper_unet_matches_the_sd21_config():
    with torch.device("meta"):
        model = DiffusionAvatarsModel(paper_config(), allow_random_base=True)
    built = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.unet.config.items()}
    assert {k: built[k] for k in SD21_UNET_CONFIG} == SD21_UNET_CONFIG
    # the ControlNet and the expression layers inherit the float32 attention scores
    assert model.controlnet.config.upcast_attention
    assert all(layer.upcast_attention for layer in model.expression_layers.layers)
    assert not tiny_config().unet.upcast_attention  # diffusers' default, what the tiny base is built with


def test_paper_config_requires_base_model():
    with pytest.raises(ValueError, match="--base-model"):
        DiffusionAvatarsModel(paper_config())


def test_config_json_roundtrip_and_validation():
    config = tiny_config(use_expression=False)
    again = DiffusionAvatarsConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="bogus: Unexpected"):
        DiffusionAvatarsConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match=r"unet\.block_out_channels"):
        DiffusionAvatarsConfig.from_dict({**config.to_dict(), "unet": {"block_out_channels": "wide"}})
    with pytest.raises(ValueError, match="downsample"):
        tiny_config(conditioning_embedding_channels=(8, 16))
    with pytest.raises(ValueError, match="multiple"):
        tiny_config(resolution=60)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="conditioning_scale must be a positive number"):
            tiny_config(conditioning_scale=bad)


def test_train_timesteps_is_checked_and_older_avatars_trained_on_every_timestep():
    """train_timesteps lies in [0, num_train_timesteps]; the tiny preset trains on the evaluation's 20, the paper on
    all; a config saved before the field existed reads as 0 (every timestep, as it was trained)."""
    for bad in (-1, 1001):
        with pytest.raises(ValueError, match="train_timesteps must be 0"):
            tiny_config(train_timesteps=bad)
    assert tiny_config().train_timesteps == 20 and paper_config().train_timesteps == 0
    older = tiny_config().to_dict()
    del older["train_timesteps"]
    assert DiffusionAvatarsConfig.from_dict(older).train_timesteps == 0


def test_conditioning_scale_applies_to_diffusion_sampling_only_and_older_avatars_render_at_1():
    """The tiny preset renders with its measured scale; the single pass of "w/o diffusion" at 1; an avatar saved
    before the field existed (its config.json lacks it) loads with 1, the value it was rendered with then."""
    tiny = tiny_config()
    assert tiny.conditioning_scale == tiny.render_conditioning_scale == 1.4
    assert tiny_config(use_diffusion=False).render_conditioning_scale == 1.0
    assert paper_config().conditioning_scale == 1.0  # paper and official
    older = tiny.to_dict()
    del older["conditioning_scale"]
    assert DiffusionAvatarsConfig.from_dict(older).conditioning_scale == 1.0
