"""The ablation benchmark's pieces that decide what the README table says (no training here:
the benchmark itself is the measurement)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_ablations import VARIANTS, job_variant, summarise  # noqa: E402
from heldout import Variant, apply_model_overrides, parse_value  # noqa: E402

from avatars.configs import tiny_config  # noqa: E402


def _row(variant, person, seed, psnr_face, lpips_face=0.1, jod=7.0):
    return {"variant": variant, "person": person, "seed": seed, "psnr": 20.0, "ssim": 0.8, "lpips": 0.1,
            "jod": jod, "psnr_face": psnr_face, "lpips_face": lpips_face, "colour_error": 1.0}


def test_every_ablation_is_a_valid_model_config():
    for name, (_, overrides) in VARIANTS.items():
        config = apply_model_overrides(tiny_config(expression_dim=16), overrides)
        for key, value in overrides.items():
            head, _, rest = key.partition(".")
            assert (getattr(getattr(config, head), rest) if rest else getattr(config, head)) == value, name


def test_variant_spec_parsing():
    v = Variant.parse("fast:steps=200,lr_features=5e-2,use_expression=false,features.mapping=spherical")
    assert v.name == "fast"
    assert v.train == {"steps": 200, "lr_features": 0.05}
    assert v.model == {"use_expression": False, "features.mapping": "spherical"}
    assert parse_value("1e-3") == pytest.approx(1e-3) and parse_value("true") is True
    assert parse_value("16-32-32") == (16, 32, 32) and parse_value("-1") == -1 and parse_value("a-b") == "a-b"
    layout = Variant.parse("emb:conditioning_embedding_channels=16-32-32")
    assert layout.model == {"conditioning_embedding_channels": (16, 32, 32)}


def test_train_overrides_reach_every_variant_model_fields_included():
    """--train's model fields (e.g. train_unet) apply to every variant; the ablation's own switch wins."""
    overrides = Variant.parse("lr_networks=1e-3,train_unet=true,features.resolution=64")
    job = {"variant": "spherical", "train": overrides.train, "model": overrides.model, "steps": 1800}
    v = job_variant(job)
    assert v.train == {"lr_networks": 1e-3, "steps": 1800}
    assert v.model == {"train_unet": True, "features.resolution": 64, "features.mapping": "spherical"}
    config = apply_model_overrides(tiny_config(expression_dim=16), v.model)
    assert config.train_unet and config.features.resolution == 64 and config.features.mapping == "spherical"
    assert job_variant({**job, "variant": "full", "steps": None}).train == {"lr_networks": 1e-3}


def test_summary_marks_worse_only_beyond_the_paired_spread():
    rows = []
    for person in ("000", "001"):
        for seed in (0, 1):
            rows.append(_row("full", person, seed, 25.0 + 0.1 * seed))
            rows.append(_row("no_features", person, seed, 20.0 + 0.1 * seed))  # clearly worse, every pair
            rows.append(_row("no_expression", person, seed, 25.0 + (0.3 if seed else -0.3)))  # noise around 0
    summary = {r["variant"]: r for r in summarise(rows, ["full", "no_features", "no_expression"])}
    worse = summary[VARIANTS["no_features"][0]]
    assert worse["psnr_face worse"] == "yes" and worse["Δpsnr_face vs full"].startswith("-5")
    assert summary[VARIANTS["no_expression"][0]]["psnr_face worse"] == "no"
    assert summary[VARIANTS["full"][0]]["runs"] == 4 and "psnr_face worse" not in summary[VARIANTS["full"][0]]
    assert worse["Δpsnr vs full"].startswith("+0 ") and worse["psnr worse"] == "no"  # whole frame: equal here
    assert worse["train CPU s / run"] == "reused"  # rows without a training time


def test_cached_runs_are_keyed_by_the_resolved_training_options_the_base_and_the_data(tiny_dataset, tmp_path):
    """A run trained under other preset defaults (e.g. another lr), on a base pretrained again into the same
    folder, or on other training shards (another held-out split) must not be reused."""
    import json
    import shutil

    from heldout import VariantTrainConfig, run_spec

    from avatars.training import TrainConfig

    shards = tiny_dataset[2]
    v = Variant("full")
    a = run_spec(VariantTrainConfig(person="000", seed=0, shards=shards), v, {})
    assert a == run_spec(VariantTrainConfig(person="000", seed=0, shards=shards), v, {})
    assert a != run_spec(VariantTrainConfig(person="000", seed=0, shards=shards, lr_networks=5e-4), v, {})
    assert a != run_spec(VariantTrainConfig(person="000", seed=1, shards=shards), v, {})
    assert {"steps", "batch_size", "lr_networks", "lr_features", "model"} <= set(a["options"])
    assert isinstance(VariantTrainConfig(), TrainConfig)
    base = tmp_path / "base"
    base.mkdir()
    (base / "w.bin").write_bytes(b"v1")
    on_base = run_spec(VariantTrainConfig(person="000", seed=0, shards=shards, base_model=base), v, {})
    (base / "w.bin").write_bytes(b"v2")
    assert on_base != run_spec(VariantTrainConfig(person="000", seed=0, shards=shards, base_model=base), v, {})
    other = tmp_path / "shards"
    shutil.copytree(shards, other)
    manifest = json.loads((other / "000" / "manifest.json").read_text())
    del manifest["shards"][next(n for n, e in manifest["shards"].items() if e["split"] == "train")]
    (other / "000" / "manifest.json").write_text(json.dumps(manifest))
    assert a != run_spec(VariantTrainConfig(person="000", seed=0, shards=other), v, {})


def test_ablation_data_turns_every_option_on_and_shows_novel_expressions_in_the_held_out_sequences():
    """--ablation-data's generator config: each option that makes an ablation matter is on, and the
    sequences showing a person's withheld expression are exactly the ones the ingest holds out."""
    from bench_ablations import ABLATION_DATA

    from shards.ingest import IngestConfig

    assert ABLATION_DATA.stochastic_hair and ABLATION_DATA.folded_ears and ABLATION_DATA.detail_wavelength > 0
    held_out = sorted(ABLATION_DATA.sequence_names)[-IngestConfig().held_out_sequences:]
    assert ABLATION_DATA.novel_expression_sequences == held_out


def test_ablation_data_pretrains_its_base_with_the_longer_unet_prior(tmp_path, monkeypatch):
    """--ablation-data's base: the main job's base stage with the UNet pretrained for --base-unet-steps,
    in a folder of its own (the key covers the steps), so the main job's 200-step base is never taken for it."""
    import bench_ablations

    import avatars.training.base_pretraining as pretraining
    import jobs.launch_all as launch_all

    for person in bench_ablations.ABLATION_DATA.person_ids:  # what the base key reads of the shards
        (tmp_path / "shards" / person).mkdir(parents=True)
        (tmp_path / "shards" / person / pretraining.MANIFEST).write_text(f'{{"person": "{person}"}}')
    seen = []
    monkeypatch.setattr(launch_all, "_data", lambda args: (bench_ablations.ABLATION_DATA.person_ids, {}))
    monkeypatch.setattr(pretraining, "pretrain_base", lambda config: seen.append(config) or {})
    default = bench_ablations.prepare_ablation_data(tmp_path)
    shorter = bench_ablations.prepare_ablation_data(tmp_path, unet_steps=200)
    assert [c.unet_steps for c in seen] == [bench_ablations.ABLATION_BASE_UNET_STEPS, 200]
    assert seen[0].persons == ",".join(bench_ablations.ABLATION_DATA.person_ids)
    assert default == seen[0].output and shorter == seen[1].output
    assert default.parent == shorter.parent == tmp_path / "base" and default != shorter
    main_job = pretraining.BasePretrainConfig(shard_root=tmp_path / "shards", persons=seen[1].persons)
    assert shorter.name == f"tiny-{pretraining.base_key(main_job)[:16]}"  # 200 steps: the main job's own base


def test_base_unet_steps_is_refused_without_ablation_data(tmp_path):
    """The option only sets the base that --ablation-data pretrains; elsewhere it would be silently ignored."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ablations.py"
    for args, message in ((["--base-unet-steps", "100"], "--ablation-data"),
                          (["--ablation-data", "--base-unet-steps", "0"], "must be positive")):
        run = subprocess.run([sys.executable, str(script), "--workdir", str(tmp_path), *args],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr, run.stderr
    assert not any(tmp_path.iterdir())  # refused before preparing anything
