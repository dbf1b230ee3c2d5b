"""Training options that must work: ZeRO stages, gradient accumulation, Prometheus + JSONL metrics."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_cli import single_thread_env, train_person_args

from avatars.training import TrainConfig
from avatars.training.rendezvous import environment_without_group

#: One training per (ZeRO stage, accumulation) of argv[3] (JSON: [[stage, accumulation, metrics port], ...]), one
#: after the other in this process (each with its own callbacks, exporter and run folder <out>/<stage>-<accumulation>).
SCRIPT = textwrap.dedent("""
    import json, sys, urllib.request
    from pathlib import Path
    from avatars.training import TrainConfig, TrainerCallback, train_person
    from cluster.monitoring.training import training_callbacks

    def run(zero_stage, grad_accum, port):
        cfg = TrainConfig(person="000", shards=Path(sys.argv[1]), out=Path(sys.argv[2]) / f"{zero_stage}-{grad_accum}",
                          steps=4, batch_size=4, checkpoint_every=2, validate_every=2, log_every=1, num_workers=0,
                          val_samples=2, val_inference_steps=2, zero_stage=zero_stage, grad_accum=grad_accum,
                          clip_scope="all", metrics_port=port, lpips_weights=Path(sys.argv[4]), min_crop=0.8)

        class Recorder(TrainerCallback):
            # every hook call, in order
            events = []
            def on_train_start(self, trainer):
                self.events.append(["start", trainer.state.step, trainer.loader_config.min_crop])
            def on_step_end(self, trainer, step): self.events.append(["step", step])
            def on_log(self, trainer, record):
                kinds = {"metrics_port": "port", "first_step_s": "first step", "loss": "window",
                         "val_psnr": "validation"}
                self.events.append(["log", [kind for key, kind in kinds.items() if key in record]])
            def on_validation(self, trainer, step, metrics): self.events.append(["validation", step])
            def on_checkpoint(self, trainer, step, path): self.events.append(["checkpoint", step, path.name])
            def on_train_end(self, trainer, result): self.events.append(["end", result["steps"]])

        class Scraper(TrainerCallback):
            # reads the exporter at the end of the run, before Prometheus' own on_train_end stops it
            body = None
            def on_train_end(self, trainer, result):
                url = f"http://127.0.0.1:{cfg.metrics_port}/metrics"
                Scraper.body = urllib.request.urlopen(url, timeout=10).read().decode()

        # the cluster's callbacks (metrics.jsonl, progress bar, status file, Prometheus) + the recorder
        result = train_person(cfg, [Scraper(), *training_callbacks(cfg), Recorder()])
        try:  # the exporter stops with the run (its port is free for the next person)
            urllib.request.urlopen(f"http://127.0.0.1:{cfg.metrics_port}/metrics", timeout=10)
            stopped = False
        except OSError:
            stopped = True
        return {"result": result, "metrics": Scraper.body, "events": Recorder.events, "stopped": stopped}

    print("RESULT" + json.dumps({f"{stage}-{accum}": run(stage, accum, port)
                                 for stage, accum, port in json.loads(sys.argv[3])}))
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LPIPS = Path(__file__).resolve().parents[3] / "weights" / "lpips_alex.safetensors"
ZERO_ACCUMULATION = [(2, 1), (1, 2)]


@pytest.fixture(scope="module")
def zero_accumulation_runs(train_shards, tmp_path_factory) -> tuple[Path, dict]:
    """(folder, {"<stage>-<accumulation>": what SCRIPT reports}) of the ZeRO / accumulation runs, made one after the
    other in one child process: one interpreter's start (~9 CPU s of imports) for both parameters, which share an
    xdist group so that one worker makes them."""
    out = tmp_path_factory.mktemp("zero")
    runs = json.dumps([[stage, accum, _port()] for stage, accum in ZERO_ACCUMULATION])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(train_shards), str(out), runs, str(LPIPS)],
                          env=environment_without_group(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.xdist_group("training-zero-accumulation")
@pytest.mark.parametrize("zero_stage,grad_accum", ZERO_ACCUMULATION)
def test_zero_accumulation_and_metrics(zero_accumulation_runs, zero_stage, grad_accum):
    lpips = LPIPS
    folder, runs = zero_accumulation_runs
    tmp_path, out = folder / f"{zero_stage}-{grad_accum}", runs[f"{zero_stage}-{grad_accum}"]
    result, metrics = out["result"], out["metrics"]
    window, validation = ["log", ["window"]], ["log", ["validation"]]
    assert out["events"] == [
        # Prometheus (called before the recorder) logs its port through the trainer
        ["log", ["port"]], ["start", 0, 0.8],  # --min-crop reaches the training loader
        ["step", 1], ["log", ["first step"]], window,
        ["step", 2], window, validation, ["validation", 2], ["checkpoint", 2, "step_0000002"],
        ["step", 3], window,
        ["step", 4], window, ["checkpoint", 4, "step_0000004"], validation, ["validation", 4],
        ["end", 4],
    ]
    assert result["steps"] == 4 and 0 < result["val_psnr"] < 100
    assert 0 < result["val_psnr_face"] < 100 and result["val_colour_error"] >= 0
    if lpips.is_file():
        assert 0 <= result["val_lpips"] <= 1.5
    assert out["stopped"]
    assert 'da_train_step{person="000"} 4.0' in metrics
    assert 'da_train_learning_rate{group="features",person="000"} 0.1' in metrics  # the tiny preset's rates
    assert 'da_train_learning_rate{group="networks",person="000"} 0.003' in metrics
    lines = [json.loads(line) for line in (tmp_path / "000" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3, 4] and all(r["samples_per_s"] > 0 for r in lines if "loss" in r)
    assert [r["step"] for r in lines if "val_psnr" in r] == [2, 4]
    assert (tmp_path / "000" / "val" / "step_0000002.png").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "000" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000002", "step_0000004"]
    assert (tmp_path / "000" / "model" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()


def test_two_processes_data_parallel(train_shards, tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks step, checkpoint collectively and resume."""
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
            *train_person_args(train_shards, tmp_path, "--batch-size", "2", "--checkpoint-every", "2",
                               "--log-every", "1", "--num-workers", "0")]
    for steps in ("2", "4"):  # the second run resumes from the first one's checkpoint
        proc = subprocess.run(base + ["--steps", steps], env=single_thread_env(), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "000"
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 4 and result["resumed_from"] == 2
    ckpt = run / "checkpoints" / "step_0000004"
    assert (ckpt / "rank000_trainer_state.pt").is_file() and (ckpt / "rank001_trainer_state.pt").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(r["samples_per_s"] > 0 for r in lines)


def test_random_base_builds_the_paper_preset_without_weights(tmp_path):
    """bench_gpu.py trains the paper preset with random weights: no SD2.1 needed, and the saved
    avatar records that its base is the seeded random one (from_pretrained rebuilds it)."""
    import torch

    from avatars.models import DiffusionAvatarsModel
    from avatars.training import train_preset

    with pytest.raises(ValueError, match="base-model"):
        with torch.device("meta"):
            DiffusionAvatarsModel(train_preset("paper").model_config(100))
    config = train_preset("paper", random_base=True).model_config(100)
    assert not config.requires_pretrained_base and config.resolution == 512
    with torch.device("meta"):
        model = DiffusionAvatarsModel(config)
    assert model.config.unet.block_out_channels == (320, 640, 1280, 1280)
    with pytest.raises(ValueError, match="random_base"):
        train_preset("paper", random_base=True, base_model=tmp_path).model_config(100)


def _set_up(monkeypatch, shards: Path, out: Path, **options):
    """Trainer.setup on person 000 with the process group and DeepSpeed stood in for (--seed is consumed outside
    them: test_optim.py builds the engine)."""
    from avatars.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "init_distributed", lambda: (0, 1))
    monkeypatch.setattr(trainer_module, "build_engine",
                        lambda cfg, model, world: SimpleNamespace(engine=None, device=torch.device("cpu")))
    config = TrainConfig(person="000", shards=shards, out=out, num_workers=0, val_samples=1, ema_decay=0.0,
                         lpips_weights=out / "none", **options)
    trainer = trainer_module.Trainer(config)
    trainer.setup()
    return trainer


def test_seed_sets_the_initial_weights_the_data_order_and_the_noise(train_shards, tmp_path, monkeypatch):
    """--seed: one seed sets up the same trainable weights, sample order, first batch and noise; another, others."""
    def drawn(seed: int, folder: str) -> dict:
        trainer = _set_up(monkeypatch, train_shards, tmp_path / folder, seed=seed)
        assert trainer.model.config.init_seed == seed
        return {"weights": trainer.model.trainable_state_dict(), "order": trainer.sampler.indices(),
                "batch": next(trainer.batches())["image"], "noise": torch.rand(8, generator=trainer.noise)}

    first, again, other = drawn(0, "a"), drawn(0, "b"), drawn(1, "c")
    for name in ("order", "batch", "noise"):
        assert torch.equal(torch.as_tensor(first[name]), torch.as_tensor(again[name])), name
        assert not torch.equal(torch.as_tensor(first[name]), torch.as_tensor(other[name])), name
    assert first["weights"].keys() == other["weights"].keys()
    assert all(torch.equal(first["weights"][k], again["weights"][k]) for k in first["weights"])
    assert all(not torch.equal(first["weights"][k], other["weights"][k]) for k in ("conditioning.features.spatial",
                                                                                  "controlnet.conv_in.weight"))


def test_keep_last_is_the_number_of_checkpoints_the_trainer_keeps(tmp_path):
    """--keep-last N: after each checkpoint the Trainer saves, only the newest N complete ones are left."""
    from avatars.training.trainer import Trainer

    class Engine:  # DeepSpeed's part of a checkpoint: a file in the folder
        def save_checkpoint(self, folder, tag, **kwargs):
            (Path(folder) / tag).mkdir(parents=True)
            (Path(folder) / tag / "weights").write_text(tag)

    for keep in (1, 3):
        trainer = Trainer(TrainConfig(out=tmp_path / str(keep), keep_last=keep))
        trainer.rank, trainer.noise = 0, torch.Generator()
        trainer.engine = SimpleNamespace(engine=Engine())
        saved = []
        for step in (2, 4, 6, 8):
            trainer.state.step = step
            saved.append(trainer.save_checkpoint().name)
            assert sorted(p.name for p in trainer.checkpoint_dir.iterdir()) == saved[-keep:], (keep, step)


@pytest.mark.parametrize("field, bad", [("steps", -1), ("batch_size", 0), ("grad_accum", 0), ("checkpoint_every", 0),
                                        ("log_every", 0), ("keep_last", 0), ("keep_last", -1), ("validate_every", -1),
                                        ("val_samples", 0), ("val_inference_steps", 0), ("num_workers", -1),
                                        ("zero_stage", 3), ("grad_clip", -1.0)])
def test_out_of_range_counts_are_refused_naming_the_flag(field, bad):
    """Refused when the options are parsed: they crashed after the first step (a 0 cadence), after the last
    (--val-inference-steps 0: no model/), deep inside DeepSpeed (ZeRO 3) or silently meant something else
    (--keep-last -1 deleted every checkpoint, --grad-clip -1 disabled clipping)."""
    from avatars.training import train_preset

    flag = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=f"{field} \\({flag}; --train.{flag[2:]} in launch_all\\) must be"):
        TrainConfig(**{field: bad})
    with pytest.raises(ValueError, match=flag):
        train_preset("paper", **{field: bad})
    TrainConfig(steps=0, validate_every=0, num_workers=0, grad_clip=0.0, zero_stage=2)  # the smallest valid ones


@pytest.mark.parametrize("model_fields, message", [
    ({"train_unet": True, "use_ldm_prior": False}, "train_unet fine-tunes the pretrained UNet"),
    ({"expression_tokens": 0}, "expression_tokens must be positive"),
    ({"conditioning_scale": -1.0}, "conditioning_scale must be a positive number"),
    ({"train_timesteps": 5000}, "train_timesteps must be 0"),
])
def test_model_options_are_checked_when_the_options_are_parsed(model_fields, message):
    """The model's own rules ran in each trainer's set-up: every person failed after the data and base stages
    (and --resume never had cleared its run first). Now TrainOptions refuses them, so launch_all stops with exit
    code 2 before any work."""
    import dataclasses

    from avatars.configs import tiny_config
    from jobs import launch_all
    from jobs._presets import preset_cli

    with pytest.raises(ValueError, match=message):
        TrainConfig(model=dataclasses.replace(tiny_config(), **model_fields))
    flags = [f"--train.model.{k.replace('_', '-')}" if v is True else
             f"--train.model.no-{k.replace('_', '-')}" if v is False else f"--train.model.{k.replace('_', '-')}={v}"
             for k, v in model_fields.items()]
    with pytest.raises(SystemExit) as exit_info:
        preset_cli(launch_all.PRESETS, default="tiny", description="", args=["tiny", *flags])
    assert exit_info.value.code == 2


def test_the_command_line_refuses_a_zero_cadence(tmp_path):
    proc = subprocess.run([sys.executable, *train_person_args(tmp_path, tmp_path, "--checkpoint-every", "0")],
                          env=single_thread_env(), capture_output=True, text=True, timeout=600)
    said = " ".join(proc.stderr.replace("│", " ").split())  # tyro boxes the message
    assert proc.returncode == 2 and "checkpoint_every (--checkpoint-every; --train.checkpoint-every in launch_all) " \
        "must be >= 1, got 0" in said, said
    assert not (tmp_path / "000").exists()  # refused before any run folder is made


@pytest.mark.parametrize("splits, what", [(("train",), "lists no 'train' shards of person 000"),
                                          (("test_seq", "test_cam"), "lists no held-out shards")])
def test_a_person_without_training_or_held_out_shards_names_the_manifest(train_shards, tmp_path, monkeypatch,
                                                                          splits, what):
    import shutil

    from common.io import DataError

    shards = tmp_path / "shards"
    shutil.copytree(train_shards / "000", shards / "000")
    manifest_path = shards / "000" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["shards"].values():
        if entry["split"] in splits:
            entry["split"] = "unused"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=what) as error:
        _set_up(monkeypatch, shards, tmp_path / "runs")
    assert error.value.path == manifest_path


def test_a_resume_may_change_cadences_but_not_what_defines_the_state():
    from avatars.training.config import resume_conflicts
    from common.configs import to_jsonable

    def conflicts(before: dict, after: dict) -> list[str]:
        return resume_conflicts(to_jsonable(TrainConfig(**before)), to_jsonable(TrainConfig(**after)))

    assert conflicts({}, {"steps": 900, "checkpoint_every": 7, "log_every": 3, "num_workers": 0, "ema_decay": 0.0,
                          "keep_last": 5, "val_samples": 2, "metrics_port": 9000, "base_model": Path("moved")}) == []
    assert conflicts({}, {"lr_networks": 1e-2, "seed": 1}) == ["lr_networks: 0.003 -> 0.01", "seed: 0 -> 1"]
    assert conflicts({}, {"batch_size": 8, "zero_stage": 1, "clip_scope": "all", "weight_decay": 0.0}) == [
        "batch_size: 4 -> 8", "clip_scope: 'controlnet' -> 'all'", "weight_decay: 0.01 -> 0.0", "zero_stage: 0 -> 1"]
    model = dataclasses.replace(TrainConfig().model, conditioning_scale=2.0)
    assert conflicts({}, {"model": model}) == ["model.conditioning_scale: 1.4 -> 2.0"]
    assert conflicts({"lr_decay": "cosine"}, {"lr_decay": "cosine", "steps": 900}) == ["steps: 600 -> 900"]
    saved = to_jsonable(TrainConfig())
    del saved["min_crop"]  # an option the version that wrote the checkpoint did not have
    assert resume_conflicts(saved, to_jsonable(TrainConfig(min_crop=0.5))) == []
    # but the training data and the processes must have been recorded (an older version's checkpoint, or one without
    # any options: it cannot be shown to continue on this data)
    now = {**to_jsonable(TrainConfig()), "train_data": "abc", "world_size": 1}
    assert resume_conflicts({**saved, "train_data": "abc", "world_size": 1}, now) == []
    assert resume_conflicts({**saved, "world_size": 1}, now) == [
        "train_data: not recorded (the checkpoint is of an older version) -> 'abc'"]
    assert len(resume_conflicts({}, now)) == 2
