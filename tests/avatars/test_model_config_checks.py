"""Model options refused when they are parsed (DiffusionAvatarsConfig.validate), naming the flag; what the
depth normalisation and the noise schedule's betas do; a loaded base whose layout differs from the config's."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from avatars.configs import FeatureConfig, SchedulerConfig, paper_config, tiny_config

NAN, INF = float("nan"), float("inf")


def _scheduler(**fields) -> SchedulerConfig:
    return dataclasses.replace(SchedulerConfig(), **fields)


def _features(**fields) -> FeatureConfig:
    return dataclasses.replace(tiny_config().features, **fields)


@pytest.mark.parametrize("fields, flag", [
    ({"depth_scale": 0.0}, "depth-scale"), ({"depth_scale": -0.3}, "depth-scale"),
    ({"depth_scale": NAN}, "depth-scale"), ({"depth_scale": INF}, "depth-scale"),
    ({"depth_center": NAN}, "depth-center"), ({"depth_center": -INF}, "depth-center"),
    ({"scheduler": _scheduler(num_train_timesteps=0)}, "scheduler.num-train-timesteps"),
    ({"scheduler": _scheduler(num_train_timesteps=1)}, "scheduler.num-train-timesteps"),
    ({"scheduler": _scheduler(beta_start=-0.001)}, "scheduler.beta-start"),
    ({"scheduler": _scheduler(beta_start=0.012)}, "scheduler.beta-start"),  # not below beta_end
    ({"scheduler": _scheduler(beta_start=0.02)}, "scheduler.beta-start"),
    ({"scheduler": _scheduler(beta_end=NAN)}, "scheduler.beta-end"),
    ({"scheduler": _scheduler(beta_end=1.0)}, "scheduler.beta-end"),
    ({"scheduler": _scheduler(beta_end=0.3)}, "scheduler.beta-end"),  # its level underflows: NaN
    ({"scheduler": _scheduler(beta_start=0.0, beta_end=1e-9)}, "scheduler.beta-end"),  # no change: NaN
    ({"features": _features(resolution=0)}, "features.resolution"),
    ({"features": _features(channels=0)}, "features.channels"),
    ({"features": _features(init_std=-1.0)}, "features.init-std"),
    ({"features": _features(init_std=NAN)}, "features.init-std"),
    ({"conditioning_embedding_channels": (0, 16, 32)}, "conditioning-embedding-channels"),
])
def test_out_of_range_model_options_are_refused_naming_the_flag(fields, flag, capsys):
    """Each divided by zero (depth_scale 0), made the schedule or the features NaN, or failed deep inside a
    network's construction after the data and base stages; now refused when the options are parsed."""
    from avatars.training import TrainConfig
    from jobs import launch_all
    from jobs._presets import preset_cli

    with pytest.raises(ValueError, match=f"--model.{flag}; --train.model.{flag} in launch_all"):
        tiny_config(**fields)
    with pytest.raises(ValueError, match=f"--model.{flag}"):
        TrainConfig(model=dataclasses.replace(tiny_config(), **fields))
    name, value = next(iter(fields.items()))
    if not dataclasses.is_dataclass(value) and not isinstance(value, tuple):  # one flag on the command line
        with pytest.raises(SystemExit) as exit_:
            preset_cli(launch_all.PRESETS, default="tiny", description="",
                       args=[f"--train.model.{name.replace('_', '-')}", str(value)])
        assert exit_.value.code == 2 and flag.split(".")[-1].replace("-", "_") in capsys.readouterr().err


def test_refused_schedules_are_the_ones_diffusers_makes_nan_and_the_edges_kept_are_finite():
    """The schedule check (float64, without diffusers) against the schedule training builds (float32)."""
    from avatars.configs import schedule_problem
    from avatars.schedulers import training_scheduler

    def nan(config: SchedulerConfig) -> bool:
        scheduler = training_scheduler(config)
        return not (torch.isfinite(scheduler.betas).all() and torch.isfinite(scheduler.alphas_cumprod).all())

    refused = [_scheduler(num_train_timesteps=1), _scheduler(beta_end=0.3), _scheduler(beta_end=0.999),
               _scheduler(beta_start=0.0, beta_end=1e-9)]
    kept = [_scheduler(num_train_timesteps=2), _scheduler(beta_end=0.2), _scheduler(beta_start=0.0, beta_end=1e-5),
            _scheduler(num_train_timesteps=50, beta_end=0.9), SchedulerConfig()]
    for config in refused:
        assert schedule_problem(config) is not None and nan(config), config
    for config in kept:
        assert schedule_problem(config) is None and not nan(config), config


def test_depth_center_and_scale_normalise_the_depth_channel_as_the_formula_says():
    """(depth - depth_center) / depth_scale inside the mask, -1 outside, for other values than the defaults."""
    from avatars.models.conditioning import ConditioningBuilder
    from avatars.testing import synthetic_batch

    batch = synthetic_batch(batch_size=2, size=16, expression_dim=16)
    inside = batch["mask"][:, 0] > 0.5
    for center, scale in ((1.0, 0.3), (0.8, 0.05), (-0.5, 2.0)):
        config = tiny_config(depth_center=center, depth_scale=scale, resolution=16)
        depth = ConditioningBuilder(config)(batch)[:, 0]
        torch.testing.assert_close(depth[inside], (batch["depth"][:, 0][inside] - center) / scale)
        assert torch.all(depth[~inside] == -1.0)


def test_scheduler_betas_reach_the_training_schedule():
    """The betas of --model.scheduler shape the schedule the model trains with (before the zero-terminal-SNR
    rescale: scaled_linear from beta_start to beta_end), and the single pass's scale."""
    from diffusers import DDPMScheduler

    from avatars.models import DiffusionAvatarsModel

    default = DiffusionAvatarsModel(tiny_config())
    other_config = tiny_config(scheduler=SchedulerConfig(num_train_timesteps=500, beta_start=0.0001, beta_end=0.02))
    other = DiffusionAvatarsModel(other_config)
    scheduler = other.noise_scheduler
    assert (scheduler.config.num_train_timesteps, scheduler.config.beta_start, scheduler.config.beta_end) == (
        500, 0.0001, 0.02)
    want = DDPMScheduler(num_train_timesteps=500, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                         rescale_betas_zero_snr=True)
    torch.testing.assert_close(scheduler.alphas_cumprod, want.alphas_cumprod)
    assert scheduler.alphas_cumprod.shape != default.noise_scheduler.alphas_cumprod.shape
    shorter = tiny_config(scheduler=SchedulerConfig(beta_start=0.0001, beta_end=0.02))
    assert not torch.allclose(DiffusionAvatarsModel(shorter).noise_scheduler.alphas_cumprod,
                              default.noise_scheduler.alphas_cumprod)
    assert other.single_pass_timestep() == 499


# ---- a loaded base's layout ----------------------------------------------------------------

def _tiny_base(root):
    from avatars.models.base_networks import build_unet, build_vae

    config = tiny_config()
    torch.manual_seed(7)
    build_unet(config.unet, 4, 4, 16).save_pretrained(root / "unet")
    build_vae(config.vae, 64).save_pretrained(root / "vae")
    return root


@pytest.mark.parametrize("part, field, value", [
    ("unet", "layers_per_block", 2), ("unet", "attention_heads", (4, 4)),
    ("unet", "down_block_types", ("DownBlock2D", "DownBlock2D")),
    ("unet", "up_block_types", ("UpBlock2D", "UpBlock2D")),
    ("unet", "use_linear_projection", False), ("unet", "norm_num_groups", 4), ("unet", "block_out_channels", (32, 32)),
    ("unet", "cross_attention_dim", 64), ("unet", "upcast_attention", True),
    ("vae", "block_out_channels", (16, 32, 64)), ("vae", "layers_per_block", 2), ("vae", "norm_num_groups", 4),
    ("vae", "scaling_factor", 0.5), ("vae", "latent_channels", 8),
])
def test_a_base_whose_layout_differs_from_the_config_is_refused_naming_the_flag(tmp_path, part, field, value):
    """With --base-model the base's own UNet and VAE run: a layout field set otherwise (layers_per_block,
    attention_heads, the block types, use_linear_projection, norm_num_groups; the VAE's widths of the same
    factor, layers, groups) was ignored without a word, yet recorded in the avatar's config.json."""
    from avatars.models import DiffusionAvatarsModel

    base = _tiny_base(tmp_path)
    config = tiny_config()
    config = dataclasses.replace(config, **{part: dataclasses.replace(getattr(config, part), **{field: value})})
    flag = f"{part}.{field}".replace("_", "-")
    with pytest.raises(ValueError, match=rf"does not match the config: .*{part}.{field} \(--model.{flag}; "
                                         rf"--train.model.{flag} in launch_all\): the base has"):
        DiffusionAvatarsModel(config, base_model=base, empty_prompt_embedding=torch.zeros(1, 77, 32))
    DiffusionAvatarsModel(tiny_config(), base_model=base, empty_prompt_embedding=torch.zeros(1, 77, 32))


def test_the_layout_comparison_reads_diffusers_config_names():
    """SD2.1's unet/config.json (attention_head_dim is its head count) matches the paper config; a base that names
    num_attention_heads, or gives one value for every block, is read as diffusers builds it."""
    from test_model_config import SD21_UNET_CONFIG  # pytest puts this folder on sys.path

    from avatars.models.diffusion_avatars import _unet_layout

    paper = paper_config()
    sd21 = SimpleNamespace(num_attention_heads=None, **SD21_UNET_CONFIG)
    assert all(base == ours for base, ours in _unet_layout(sd21, paper).values())
    explicit = SimpleNamespace(**{**vars(sd21), "num_attention_heads": [5, 10, 20, 20], "attention_head_dim": 64})
    assert all(base == ours for base, ours in _unet_layout(explicit, paper).values())
    single = SimpleNamespace(**{**vars(sd21), "attention_head_dim": 8})
    assert _unet_layout(single, paper)["attention_heads"] == ((8, 8, 8, 8), (5, 10, 20, 20))
