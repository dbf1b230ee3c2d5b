"""The weight average (--ema-decay): its arithmetic, the swap, the checkpoint round trip, and that the
saved avatar is the average."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _engine_scripts import ENGINE_RESUMES
from torch import nn

from avatars.models.diffusion_avatars import load_trainable_weights
from avatars.training import train_preset
from avatars.training.rendezvous import environment_without_group
from avatars.training.weight_average import WeightAverage

REPO = Path(__file__).resolve().parents[3]


def _params() -> dict[str, nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return {"a": nn.Parameter(torch.randn(3, 4, generator=g)), "b": nn.Parameter(torch.randn(5, generator=g))}


def test_the_average_follows_the_warmed_up_decay():
    params = _params()
    average = WeightAverage(params, decay=0.9)
    reference = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(1)
    for step in range(1, 30):
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=g))
        average.update(step)
        d = min(0.9, (1 + step) / (10 + step))
        reference = {n: d * reference[n] + (1 - d) * params[n].detach() for n in params}
        for n in params:
            torch.testing.assert_close(average.average[n], reference[n], rtol=1e-6, atol=1e-6)
    assert average.decay_at(1) == pytest.approx(2 / 11) and average.decay_at(1000) == 0.9
    assert not torch.equal(average.average["a"], params["a"])  # it lags the weights


def test_swapped_holds_the_average_and_restores_the_trained_weights():
    params = _params()
    average = WeightAverage(params, decay=0.5)
    with torch.no_grad():
        params["a"].add_(1.0)
    trained = params["a"].detach().clone()
    with average.swapped():
        assert torch.equal(params["a"], average.average["a"]) and not torch.equal(params["a"], trained)
    assert torch.equal(params["a"], trained)
    with pytest.raises(RuntimeError, match="inside"):
        with average.swapped():
            raise RuntimeError("inside")
    assert torch.equal(params["a"], trained)  # restored on an error too


def test_bad_decays_and_foreign_states_are_refused():
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="ema_decay"):
            WeightAverage(_params(), bad)
        with pytest.raises(ValueError, match="ema_decay"):
            train_preset("tiny", ema_decay=bad)
    average = WeightAverage(_params(), 0.9)
    with pytest.raises(KeyError, match="ckpt does not match the model: missing \\['b'\\]"):
        average.load_state_dict({"a": torch.zeros(3, 4)}, source="ckpt")
    with pytest.raises(ValueError, match="b has shape"):
        average.load_state_dict({"a": torch.zeros(3, 4), "b": torch.zeros(6)})


@pytest.mark.xdist_group(ENGINE_RESUMES)
def test_the_average_resumes_from_the_checkpoint(engine_resumes):
    """_engine_scripts.AVERAGE_RESUME (in a child process): the average resumed from the checkpoint steps as the
    uninterrupted one; then the checkpoint's average file, read here."""
    tmp_path, out = engine_resumes[0] / "average", engine_resumes[1]["average"]
    assert out == {"same": True, "moved": True}
    from avatars.training import checkpoint

    assert checkpoint.load_average(tmp_path / "ckpt", 4) is None  # no checkpoint of that step: no average
    corrupt = tmp_path / "ckpt" / "step_0000003" / "weight_average.pt"
    corrupt.write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match=r"weight_average\.pt: checkpoint file does not load"):
        checkpoint.load_average(tmp_path / "ckpt", 3)


def _train(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = environment_without_group()
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(REPO / "jobs" / "train_person.py"), "--person", "000", "--shards", str(shards),
           "--out", str(out), "--validate-every", "0", "--num-workers", "1", "--val-samples", "1",
           "--val-inference-steps", "1", "--batch-size", "2", "--lpips-weights", str(out / "no-lpips"), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _trained_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained (not averaged) weights of a DeepSpeed checkpoint folder, by trainable parameter name."""
    module = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {k.removeprefix("model."): v for k, v in module.items()}


def test_the_saved_avatar_is_the_average_not_the_last_weights(train_shards, tmp_path):
    _train(train_shards, tmp_path, "--steps", "4", "--checkpoint-every", "4", "--ema-decay", "0.5")
    ckpt = tmp_path / "000" / "checkpoints" / "step_0000004"
    saved = load_trainable_weights(tmp_path / "000" / "model")
    average = torch.load(ckpt / "weight_average.pt", weights_only=True)
    trained = _trained_weights(ckpt)
    assert saved.keys() == average.keys()
    assert all(torch.equal(saved[k], average[k]) for k in saved)
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)  # not the last iterate


def test_a_checkpoint_without_an_average_resumes_with_a_warning(train_shards, tmp_path):
    """A run checkpointed without --ema-decay (or by a version before it) goes on with one: the average
    starts from the restored weights (not the untrained ones), and the log says so rather than failing
    the person."""
    _train(train_shards, tmp_path, "--steps", "2", "--checkpoint-every", "2", "--ema-decay", "0")
    ckpts = tmp_path / "000" / "checkpoints"
    assert not (ckpts / "step_0000002" / "weight_average.pt").exists()
    proc = _train(train_shards, tmp_path, "--steps", "3", "--checkpoint-every", "1", "--ema-decay", "0.5")
    assert "holds no weight average" in proc.stderr and "starts from the weights of step 2" in proc.stderr
    assert json.loads((tmp_path / "000" / "result.json").read_text())["resumed_from"] == 2
    average = torch.load(ckpts / "step_0000003" / "weight_average.pt", weights_only=True)
    w2, w3 = _trained_weights(ckpts / "step_0000002"), _trained_weights(ckpts / "step_0000003")
    d = min(0.5, (1 + 3) / (10 + 3))  # the decay after step 3
    assert average.keys() == w2.keys()
    for k in average:
        torch.testing.assert_close(average[k], d * w2[k] + (1 - d) * w3[k], rtol=1e-5, atol=1e-6)
