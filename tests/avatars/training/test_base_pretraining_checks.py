"""Base pretraining refuses learning rates and weights that cannot train (when parsed), and a base that diverged
(before anything is written)."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from avatars.training import base_pretraining
from avatars.training.base_pretraining import BasePretrainConfig, pretrain_base
from avatars.training.config import TrainingDiverged

SCRIPT = Path(__file__).resolve().parents[3] / "jobs" / "pretrain_base.py"
#: one step of each stage on single images (what test_base_pretraining.py's _tiny runs)
TINY = dict(vae_steps=1, unet_steps=1, vae_batch_size=1, unet_batch_size=4, scale_batches=2, eval_images=1,
            warmup_steps=1, num_workers=0, log_every=0)


@pytest.fixture(scope="module")
def shard_root(tiny_dataset):
    return tiny_dataset[2]  # shared read-only (tests/conftest.py)


@pytest.mark.parametrize(("field", "value"), [(f, v) for f in ("vae_lr", "unet_lr", "kl_weight")
                                               for v in (-1.0, float("nan"), float("inf"), float("-inf"))]
                         + [("warmup_steps", -1)])
def test_the_config_refuses_non_finite_or_negative_rates_and_weights(field, value):
    """Not checked before: a negative or NaN rate failed inside AdamW after the shards were indexed, inf trained NaN
    weights that were written as the base, a negative KL weight rewarded the KL term."""
    with pytest.raises(ValueError, match=f"{field} must be .*>= 0, got {value} \\(--{field.replace('_', '-')}\\)"):
        BasePretrainConfig(**{field: value})


def test_nan_weights_and_clips_are_refused_too():
    for field in ("vae_face_weight", "vae_gradient_weight", "grad_clip"):
        with pytest.raises(ValueError, match=f"{field} must be a finite number >= 0, got nan"):
            BasePretrainConfig(**{field: float("nan")})
    BasePretrainConfig(vae_lr=0.0, unet_lr=0.0, kl_weight=0.0, warmup_steps=0)  # 0 is a setting (frozen, none)


def _run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return exit_.value.code, " ".join(capsys.readouterr().err.replace("│", " ").split())


@pytest.mark.parametrize("flags", [["--vae-lr", "-0.001"], ["--unet-lr", "nan"], ["--kl-weight", "inf"],
                                   ["--warmup-steps", "-1"]])
def test_the_command_line_refuses_them_before_any_work(flags, shard_root, tmp_path, monkeypatch, capsys):
    small = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v)) if k != "warmup_steps"]
    code, said = _run_cli(["--shard-root", str(shard_root), "--output", str(tmp_path / "base"), *small, *flags],
                          monkeypatch, capsys)
    assert code == 2 and flags[0] in said, said
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize(("stage", "field"), [("vae", "vae_lr"), ("unet", "unet_lr")])
def test_a_stage_that_diverges_writes_nothing(stage, field, shard_root, tmp_path):
    """An infinite rate (set past the parse-time check) trains NaN weights; the base was written anyway."""
    config = BasePretrainConfig(shard_root=shard_root, output=tmp_path / "base", **TINY)
    setattr(config, field, float("inf"))
    said = (f"diverged in the {stage} stage: .*NaN or infinite weights.*nothing is written to "
            f"{re.escape(str(tmp_path / 'base'))}.*--{field.replace('_', '-')}")
    with pytest.raises(TrainingDiverged, match=said):
        pretrain_base(config)
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_says_a_divergence_in_one_line(shard_root, tmp_path, monkeypatch, capsys):
    train_vae = base_pretraining.train_vae

    def nan_vae(*args, **kwargs):
        vae, final, first = train_vae(*args, **kwargs)
        with torch.no_grad():
            next(vae.parameters()).fill_(float("nan"))
        return vae, final, first

    monkeypatch.setattr(base_pretraining, "train_vae", nan_vae)
    small = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    code, said = _run_cli(["--shard-root", str(shard_root), "--output", str(tmp_path / "base"), *small],
                          monkeypatch, capsys)
    assert code == 1 and said.startswith("error: base pretraining diverged in the vae stage"), said
    assert "Traceback" not in said and list(tmp_path.iterdir()) == []


def test_the_loader_config_has_no_shuffle_option_and_image_batches_takes_it(shard_root):
    """LoaderConfig.shuffle was read only by image_batches: ShardLoader iterates its sampler's order and the trainer
    builds its own sampler, so shuffle=False (the eval driver's, the benchmarks') did nothing. The order is the
    sampler's; image_batches says whether it shuffles."""
    import dataclasses

    from avatars.data import LoaderConfig, ShardDataset
    from avatars.training.base_pretraining import image_batches
    from shards.writer import shard_paths

    assert "shuffle" not in {f.name for f in dataclasses.fields(LoaderConfig)}
    with pytest.raises(TypeError):
        LoaderConfig(shuffle=False)
    loader = LoaderConfig(resolution=32, batch_size=4, augment=False, num_workers=0, seed=1)
    dataset = ShardDataset(shard_paths(shard_root, "000", "train"), loader)
    in_order = torch.stack([dataset[i]["image"] for i in range(4)])
    torch.testing.assert_close(next(image_batches(dataset, loader, shuffle=False))[0], in_order, rtol=0, atol=0)
    assert not torch.equal(next(image_batches(dataset, loader))[0], in_order)  # seeded permutation
