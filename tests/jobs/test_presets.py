"""Complete preset configs: --help shows the values a preset uses; typed configs cross the job boundary."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from avatars.configs import paper_config, tiny_config
from avatars.training import PRESETS, TrainConfig, TrainOptions, train_preset
from jobs import launch_all
from jobs import train_person as train_job
from jobs._presets import preset_cli


def test_presets_are_complete_configs():
    assert TrainConfig() == train_preset("tiny")  # the dataclass defaults are the tiny preset
    tiny, paper = PRESETS["tiny"][1], PRESETS["paper"][1]
    assert tiny.model == tiny_config()
    assert (tiny.steps, tiny.batch_size, tiny.lr_networks, tiny.lr_features) == (600, 4, 3e-3, 1e-1)
    assert (tiny.min_crop, paper.min_crop) == (1.0, 0.7)  # tiny: no crops (README "Training crops"); the official 0.7
    assert paper.model == paper_config()
    assert (paper.steps, paper.batch_size, paper.lr_networks, paper.lr_features) == (100_000, 8, 1e-4, 1e-2)
    assert (tiny.compile, paper.compile) == (False, True)  # README "GPU": 1.25x on one H200 for ~150 s of compiling
    config = train_preset("paper", steps=5)
    config.model.resolution = 256  # a copy: the preset itself is untouched
    assert PRESETS["paper"][1].model.resolution == 512
    with pytest.raises(ValueError, match="unknown preset"):
        train_preset("huge")


def test_help_shows_the_values_of_the_chosen_preset(capsys):
    presets = {name: (text, TrainConfig.for_person(options)) for name, (text, options) in PRESETS.items()}
    with pytest.raises(SystemExit):
        preset_cli(presets, default="tiny", description="d", args=["paper", "--help"])
    out = capsys.readouterr().out
    assert "(default: 100000)" in out and "(default: 320 640 1280 1280)" in out and "(default: 0.0001)" in out
    with pytest.raises(SystemExit):
        preset_cli(presets, default="tiny", description="d", args=["tiny", "--help"])
    out = capsys.readouterr().out
    assert "(default: 600)" in out and "(default: 32 64)" in out


def test_the_first_argument_picks_the_preset_and_tiny_is_the_default():
    args = preset_cli(launch_all.PRESETS, default="tiny", description="d",
                      args=["--persons", "000", "--train.steps", "3"])
    assert args.persons == "000" and args.train.steps == 3 and args.train.model == tiny_config()
    assert args.train.ema_decay == 0.99
    args = preset_cli(launch_all.PRESETS, default="tiny", description="d",
                      args=["paper", "--train.base-model", "/models/sd21"])
    assert args.train.model == paper_config() and args.train.steps == 100_000
    assert args.train.base_model == Path("/models/sd21")
    assert args.train.compile  # the paper preset compiles; a short GPU check can turn it off
    assert args.train.ema_decay == 0.0  # the official code averages no weights; the tiny preset does (0.99)
    args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=["paper", "--train.no-compile"])
    assert not args.train.compile and args.train.steps == 100_000
    # the README's nightly command for better tiny renders
    args = preset_cli(launch_all.PRESETS, default="tiny", description="d",
                      args=["--persons", "all", "--train.steps", "1800", "--train.model.train-unet"])
    assert args.train.steps == 1800 and args.train.model == tiny_config(train_unet=True)


def test_a_bad_min_crop_is_refused_when_the_options_are_parsed(capsys):
    # before any person's trainer has made its run folder
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="min_crop must be in"):
            train_preset("tiny", min_crop=bad)
    with pytest.raises(SystemExit):
        preset_cli(launch_all.PRESETS, default="tiny", description="d", args=["--train.min-crop", "0"])
    assert "min_crop must be in (0, 1]" in " ".join(capsys.readouterr().err.split())


def test_run_takes_typed_options_or_json_overrides(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(train_job, "train", lambda config, status=None: seen.append(config) or {"ok": True})
    options = dataclasses.replace(PRESETS["paper"][1], steps=3, base_model=tmp_path)
    train_job.run("017", options, shards=tmp_path / "shards", out=tmp_path / "runs")
    # what an sbatch job passes through --kwargs-json: overrides of a preset, paths as strings
    train_job.run("017", {"steps": 3, "base_model": str(tmp_path)}, preset="paper", shards=str(tmp_path / "shards"),
                  out=str(tmp_path / "runs"))
    typed, from_json = seen
    assert typed == from_json
    assert isinstance(from_json.shards, Path) and from_json.person == "017" and from_json.model == paper_config()
    train_job.run("017", {"model": {"use_expression": False}})
    assert seen[-1].model == dataclasses.replace(tiny_config(), use_expression=False)
    with pytest.raises(ValueError, match="stepz"):
        train_job.run("017", {"stepz": 3})
    with pytest.raises(ValueError, match="model.resolution"):
        train_job.run("017", {"model": {"resolution": "big"}})
    assert isinstance(options, TrainOptions)


@pytest.mark.parametrize("flag", ["--train.model.expression-dim", "--train.model.init-seed"])
def test_model_fields_the_trainer_sets_are_no_options(flag, capsys):
    """The data sets the expression dimension and --train.seed the initialisation seed: a flag for either would
    be parsed and then replaced without a word, so the command line offers neither."""
    with pytest.raises(SystemExit):
        preset_cli(launch_all.PRESETS, default="tiny", description="d", args=[flag, "7"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        preset_cli(launch_all.PRESETS, default="tiny", description="d", args=["--help"])
    assert flag not in capsys.readouterr().out
