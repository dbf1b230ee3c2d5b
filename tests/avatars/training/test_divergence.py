"""A training run that diverges (a NaN or infinite loss, NaN weights) stops with TrainingDiverged instead of saving
NaN checkpoints, resuming from them and publishing a NaN model with a result.json that launch_all counts as trained;
a checkpoint of NaN weights written before is refused; NaN / infinite / negative learning rates and weight decay are
refused when the options are parsed.

In process, on the tiny model and person 000 of the shared tiny shards, a few steps each (seconds of CPU). A NaN
reaches the run the way a corrupt sample past the loader's checks would: in one batch's expression code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from avatars.training import TrainConfig, TrainerCallback, train_preset
from common.io import DataError


def _diverged() -> type[Exception]:
    """TrainingDiverged, imported when a test needs it (the option tests run without it)."""
    from avatars.training.config import TrainingDiverged

    return TrainingDiverged


def _config(shards: Path, out: Path, **options) -> TrainConfig:
    fields = {"steps": 6, "checkpoint_every": 2, "log_every": 100, "batch_size": 2, "num_workers": 0,
              "validate_every": 0, "val_samples": 1, "val_inference_steps": 1, "lpips_weights": out / "none",
              "latent_cache_mib": 0, **options}
    return train_preset("tiny", person="000", shards=shards, out=out, **fields)


def _nan_batch(monkeypatch, at_step: int) -> None:
    """The batch of optimizer step ``at_step`` (1-based) carries a NaN in its expression code."""
    from avatars.training.trainer import Trainer

    batches = Trainer.batches

    def poisoned(self):
        for i, batch in enumerate(batches(self)):
            if i == at_step - 1:
                batch = {**batch, "expression": batch["expression"].clone()}
                batch["expression"][0, 0] = float("nan")
            yield batch

    monkeypatch.setattr(Trainer, "batches", poisoned)


class _Poison(TrainerCallback):
    """Sets a trainable weight (or, with ``average``, the weight average's copy of it) to NaN at step ``step`` (at
    on_train_start with step 0): NaN weights behind a loss that was still finite."""

    def __init__(self, step: int, average: bool = False):
        self.step, self.average = step, average

    def _poison(self, trainer) -> None:
        name = "controlnet.conv_in.weight"
        target = trainer.average.average[name] if self.average else trainer.model.trainable_state_dict()[name]
        with torch.no_grad():
            target.view(-1)[0] = float("nan")

    def on_train_start(self, trainer):
        if self.step == 0:
            self._poison(trainer)

    def on_step_end(self, trainer, step):
        if step == self.step:
            self._poison(trainer)


def _checkpoints(out: Path) -> list[str]:
    folder = out / "000" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _nothing_published(out: Path) -> None:
    assert not (out / "000" / "result.json").exists() and not (out / "000" / "model").exists()


@pytest.mark.parametrize("log_every, checkpoint_every, read_at", [(1, 100, "log"), (100, 2, "checkpoint")])
def test_a_nan_loss_stops_the_run_where_the_losses_are_read(train_shards, tmp_path, monkeypatch, log_every,
                                                            checkpoint_every, read_at):
    """One NaN batch at step 3: the loss is read at the next log line (step 3) or checkpoint (step 4), and the run
    stops there naming the step, its loss and what to try; no checkpoint of it, no model, no result.json."""
    from avatars.training import train_person

    _nan_batch(monkeypatch, at_step=3)
    out = tmp_path / read_at
    with pytest.raises(_diverged()) as error:
        train_person(_config(train_shards, out, log_every=log_every, checkpoint_every=checkpoint_every))
    said = str(error.value)
    assert "person 000" in said and "training diverged at step 3: its loss is nan" in said, said
    assert "--resume never" in said and "--lr-networks (now 0.003)" in said and "--train.lr-features" in said, said
    assert "training data" in said, said
    if read_at == "checkpoint":  # the checkpoint of step 2 is from before the NaN; step 4's is not written
        assert _checkpoints(out) == ["step_0000002"]
        assert "step_0000002, is from before" in said, said
    else:
        assert _checkpoints(out) == []
    _nothing_published(out)
    losses = [json.loads(line).get("loss") for line in (out / "000" / "metrics.jsonl").read_text().splitlines()]
    assert all(v is None or math.isfinite(v) for v in losses), losses  # no NaN line logged


def test_a_cluster_attempt_that_diverges_fails_with_the_message(train_shards, tmp_path, monkeypatch):
    """The way launch_all's backends train a person (cluster.person_job.run_attempt -> jobs.train_person.run): the
    attempt raises and its status file says failed, with the message first."""
    from cluster.person_job import PersonJob, run_attempt
    from cluster.status import read_status

    _nan_batch(monkeypatch, at_step=2)
    options = {"steps": 4, "checkpoint_every": 2, "log_every": 100, "batch_size": 2, "num_workers": 0,
               "val_samples": 1, "val_inference_steps": 1, "lpips_weights": str(tmp_path / "none")}
    job = PersonJob("000", "jobs.train_person:run", {"options": options, "shards": str(train_shards),
                                                     "out": str(tmp_path / "runs")})
    with pytest.raises(_diverged(), match="training diverged at step 2: its loss is nan"):
        run_attempt(job, 1, tmp_path / "status")
    [status] = read_status(tmp_path / "status")
    assert status.state == "failed" and status.message.startswith(
        f"TrainingDiverged: person 000 ({tmp_path / 'runs' / '000'}): training diverged at step 2"), status.message
    assert _checkpoints(tmp_path / "runs") == []
    _nothing_published(tmp_path / "runs")


@pytest.mark.parametrize("average", [False, True], ids=["weights", "weight average"])
def test_nan_weights_are_not_checkpointed(train_shards, tmp_path, average):
    """Weights (or their average) NaN after step 2 while the losses of steps 1-2 were finite: the checkpoint of step
    2 is refused before anything of it is written."""
    from avatars.training import train_person
    from avatars.training.callbacks import default_callbacks

    cfg = _config(train_shards, tmp_path, ema_decay=0.99 if average else 0.0)
    with pytest.raises(_diverged(), match="training diverged by step 2: NaN or infinite weights "
                                               r"\(controlnet.conv_in.weight" + (r" \(weight average\)" if average
                                                                                 else "")
                                               + r"\); the checkpoint is not written"):
        train_person(cfg, [*default_callbacks(cfg.run_dir), _Poison(2, average)])
    assert _checkpoints(tmp_path) == []
    _nothing_published(tmp_path)


def test_nan_weights_are_not_published_as_the_model(train_shards, tmp_path):
    """A run whose loop trains nothing (resumed at its last step; here --steps 0) checks the weights before the final
    save too."""
    from avatars.training import train_person
    from avatars.training.callbacks import default_callbacks

    cfg = _config(train_shards, tmp_path, steps=0)
    with pytest.raises(_diverged(), match="NaN or infinite weights .*; the model is not written"):
        train_person(cfg, [*default_callbacks(cfg.run_dir), _Poison(0)])
    _nothing_published(tmp_path)


def test_result_json_is_strict_json(train_shards, tmp_path, monkeypatch):
    """A validation metric that is not a number (every validation sample's face mask empty: a NaN face PSNR) is
    written as null: result.json parses as strict JSON."""
    from avatars.training import train_person
    from avatars.training.trainer import Trainer

    monkeypatch.setattr(Trainer, "validate", lambda self, step: {"val_psnr": 21.5, "val_psnr_face": float("nan")})

    def strict(text):
        raise ValueError(f"not JSON: {text}")

    with pytest.warns(UserWarning, match="val_psnr_face is nan; recorded as null"):
        result = train_person(_config(train_shards, tmp_path, steps=0))
    written = json.loads((tmp_path / "000" / "result.json").read_text(), parse_constant=strict)
    assert written["val_psnr"] == 21.5 and written["val_psnr_face"] is None
    assert result["val_psnr_face"] is None


def test_a_checkpoint_of_nan_weights_is_refused_on_resume(train_shards, tmp_path, monkeypatch):
    """A checkpoint an earlier version wrote after the run diverged (NaN weights) is not resumed from: a DataError
    naming its folder and what to do, before a step is trained on it."""
    from avatars.training import train_person
    from avatars.training.trainer import Trainer

    with monkeypatch.context() as earlier:  # the version that saved whatever the weights were
        earlier.setattr(Trainer, "_check_losses", lambda self, losses: None, raising=False)
        earlier.setattr(Trainer, "_check_weights", lambda self, what: None, raising=False)
        earlier.setattr(Trainer, "validate", lambda self, step: {})
        _nan_batch(earlier, at_step=1)
        train_person(_config(train_shards, tmp_path, steps=2, checkpoint_every=2, ema_decay=0.0))
    (tmp_path / "000" / "result.json").unlink()  # as if it stopped before its end
    with pytest.raises(DataError, match="NaN or infinite weights .*--resume never") as error:
        train_person(_config(train_shards, tmp_path, steps=4, checkpoint_every=2, ema_decay=0.0))
    assert error.value.path == tmp_path / "000" / "checkpoints" / "step_0000002"
    assert not (tmp_path / "000" / "result.json").exists()


# ---- checkpoint.load_latest / load_average on stand-in engines ------------------------------------------------

class _Engine:
    """DeepSpeed's part of a checkpoint: a weights file; loading "restores" ``weights`` into ``module``."""

    def __init__(self, weights: torch.Tensor | None = None) -> None:
        self.module = torch.nn.Linear(3, 1)
        self.weights = weights

    def save_checkpoint(self, folder, tag, **kwargs):
        (Path(folder) / tag).mkdir(parents=True)
        (Path(folder) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")

    def load_checkpoint(self, folder, tag, **kwargs):
        if self.weights is not None:
            with torch.no_grad():
                self.module.weight.copy_(self.weights)
        return folder, None


def _save(ckpt_dir: Path, step: int, average: dict | None = None, window: list[float] | None = None) -> Path:
    from avatars.training import checkpoint

    state = checkpoint.TrainerState(step=step, window_losses=window or [])
    return checkpoint.save(_Engine(), ckpt_dir, state, torch.Generator(), keep_last=2, average=average)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_latest_refuses_non_finite_weights(tmp_path, bad):
    from avatars.training import checkpoint

    folder = _save(tmp_path, 2)
    assert checkpoint.load_latest(_Engine(torch.ones(1, 3)), tmp_path, torch.Generator()).step == 2
    with pytest.raises(DataError, match=r"NaN or infinite weights \(weight\); the run diverged.*--resume never") as e:
        checkpoint.load_latest(_Engine(torch.tensor([[1.0, bad, 1.0]])), tmp_path, torch.Generator())
    assert e.value.path == folder


def test_load_latest_refuses_a_non_finite_loss_window(tmp_path):
    from avatars.training import checkpoint

    folder = _save(tmp_path, 2, window=[0.5, float("nan")])
    with pytest.raises(DataError, match="non-finite training loss.*--resume never") as e:
        checkpoint.load_latest(_Engine(), tmp_path, torch.Generator())
    assert e.value.path == folder


def test_load_average_refuses_a_non_finite_average(tmp_path):
    from avatars.training import checkpoint

    _save(tmp_path, 2, average={"w": torch.ones(3)})
    assert torch.equal(checkpoint.load_average(tmp_path, 2)["w"], torch.ones(3))
    folder = _save(tmp_path, 4, average={"w": torch.tensor([1.0, float("nan"), 1.0])})
    with pytest.raises(DataError, match=r"NaN or infinite weight average \(w\)") as e:
        checkpoint.load_average(tmp_path, 4)
    assert e.value.path == folder


# ---- launch_all: a result.json of a diverged run is not a trained avatar -----------------------------------------

@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999", "{"])
def test_launch_all_does_not_take_a_non_finite_result_as_trained(train_shards, tmp_path, value):
    from avatars.training.base_record import base_fingerprint
    from avatars.training.config import TRAIN_DATA, TrainOptions
    from jobs.launch_all import LaunchAllArgs, _trained
    from shards.writer import split_digest

    (tmp_path / "shards").symlink_to(train_shards)
    run = tmp_path / "runs" / "000"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    result = {"person": "000", "steps": 9, "base_fingerprint": base_fingerprint(None),
              TRAIN_DATA: split_digest(train_shards, "000", "train"), "val_psnr": 12.5}
    args = LaunchAllArgs(workdir=tmp_path, train=TrainOptions(steps=9))
    (run / "result.json").write_text(json.dumps(result))
    assert list(_trained(args, ["000"], None)) == ["000"]  # a finished run is taken as trained
    (run / "result.json").write_text(json.dumps(result).replace("12.5", value))
    assert _trained(args, ["000"], None) == {}


# ---- the options --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, bad", [(f, v) for f in ("lr_networks", "lr_features", "weight_decay")
                                        for v in (float("nan"), float("inf"), -1e-3)])
def test_non_finite_or_negative_rates_are_refused_naming_the_flag(field, bad, capsys):
    from jobs import launch_all
    from jobs._presets import preset_cli

    flag = field.replace("_", "-")
    with pytest.raises(ValueError, match=f"{field} \\(--{flag}; --train.{flag} in launch_all\\) must be a finite"):
        TrainConfig(**{field: bad})
    with pytest.raises(ValueError, match=f"--{flag}"):
        train_preset("paper", **{field: bad})
    for presets, prefix in ((launch_all.PRESETS, "--train."), (_train_person_presets(), "--")):
        with pytest.raises(SystemExit) as exit_info:
            preset_cli(presets, default="tiny", description="", args=["tiny", f"{prefix}{flag}", str(bad)])
        assert exit_info.value.code == 2
        said = " ".join(capsys.readouterr().err.replace("│", " ").split())  # tyro boxes the message
        assert f"--train.{flag} in launch_all) must be a finite number >= 0" in said, said
    TrainConfig(lr_networks=0.0, lr_features=0.0, weight_decay=0.0)  # 0 freezes a group / no weight decay


def _train_person_presets() -> dict:
    from avatars.training import PRESETS

    return {name: (text, TrainConfig.for_person(options)) for name, (text, options) in PRESETS.items()}
