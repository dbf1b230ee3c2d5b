"""The frozen base networks (UNet, VAE) built from a config with random weights: the base of a
random-base run, of the tiny base's pretraining and of FLOP counting, where no pretrained
Stable Diffusion directory is loaded."""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel

from avatars.configs import UNetConfig, VAEConfig

#: Token count of the stored empty-prompt embedding for random bases (CLIP's max length).
EMPTY_PROMPT_TOKENS = 77


def build_unet(config: UNetConfig, in_channels: int, out_channels: int, sample_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        attention_head_dim=tuple(config.attention_heads),  # diffusers' legacy name for head count
        cross_attention_dim=config.cross_attention_dim,
        use_linear_projection=config.use_linear_projection,
        norm_num_groups=config.norm_num_groups,
        upcast_attention=config.upcast_attention,
    )


def build_vae(config: VAEConfig, sample_size: int) -> AutoencoderKL:
    n = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=sample_size,
        scaling_factor=config.scaling_factor,
    )
