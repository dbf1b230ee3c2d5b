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


def test_paper_config_requires_base_model():
    with pytest.raises(ValueError, match="--base-model"):
        DiffusionAvatarsModel(paper_config())


def test_config_json_roundtrip_and_validation():
    config = tiny_config(use_expression=False)
    again = DiffusionAvatarsConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="unknown"):
        DiffusionAvatarsConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="downsample"):
        tiny_config(conditioning_embedding_channels=(8, 16))
    with pytest.raises(ValueError, match="multiple"):
        tiny_config(resolution=60)
