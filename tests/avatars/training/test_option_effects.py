"""Training options set away from their defaults, each one's effect on the engine the trainer builds
(``avatars.training.engine.build_engine``, what ``Trainer.setup`` calls): --lr-decay and --grad-clip.

DeepSpeed's ``initialize`` is stood in for by :class:`fake_engine.FakeEngine` (the real engine runs in test_optim.py's
resume test, test_precision.py and test_step_work.py): it keeps the optimizer and the schedule it is
given and, as DeepSpeed's engine does, steps the optimizer and then the schedule at every step. A few
seconds of CPU on the tiny model. (--weight-decay: test_optim.py's
test_weight_decay_reaches_every_group_and_decays_a_weight_without_gradient.)
"""

from __future__ import annotations

import pytest
import torch
from fake_engine import fake_engine

from avatars.training.optim import COSINE_FLOOR


def _build(monkeypatch, scale: float = 1.0, **options):
    """build_engine(TrainConfig(**options), fresh tiny model, one process) on the stand-in engine, which steps the
    optimizer and the schedule."""
    return fake_engine(monkeypatch, scale, True, **options)


def _rates(trainer) -> list[float]:
    """Each parameter group's learning rate, as the trainer logs it (``engine.optimizer.param_groups``)."""
    return [g["lr"] for g in trainer.engine.optimizer.param_groups]


def test_lr_decay_cosine_lowers_the_rate_at_every_step_and_the_default_keeps_it(monkeypatch):
    """--lr-decay cosine: the rate the engine's optimizer applies falls at every micro-step, halfway down to
    COSINE_FLOOR at half of --steps; the default ('constant') keeps each group at its peak."""
    peaks = [1e-3, 1e-1]
    rates = {}
    for decay in ("cosine", "constant"):
        trainer = _build(monkeypatch, lr_decay=decay, steps=4, lr_networks=peaks[0], lr_features=peaks[1])
        seen = [_rates(trainer)]
        for _ in range(2):
            trainer.micro_step({}, None)
            seen.append(_rates(trainer))
        rates[decay] = seen
    cosine, constant = rates["cosine"], rates["constant"]
    assert cosine[0] == pytest.approx(peaks)
    assert all(later[i] < earlier[i] for earlier, later in zip(cosine, cosine[1:]) for i in range(2)), cosine
    assert cosine[2] == pytest.approx([p * (1 + COSINE_FLOOR) / 2 for p in peaks])  # step 2 of 4: halfway
    assert constant == [peaks] * 3


def test_grad_clip_value_is_the_norm_the_controlnet_gradient_is_clipped_to(monkeypatch):
    """--grad-clip 0.25 (ZeRO 0, the default ControlNet scope): the update applies the ControlNet's gradient scaled
    to norm 0.25, not the default's 1.0; a clip above the gradient's norm leaves it as it is."""
    def controlnet_norm(grad_clip: float) -> float:
        trainer = _build(monkeypatch, scale=100.0, grad_clip=grad_clip)
        trainer.micro_step({}, None)
        grads = [g for n, g in trainer.engine.applied.items() if n.startswith("controlnet.")]
        assert grads
        return torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()

    raw = controlnet_norm(0.0)  # clipping off: the raw norm, 100 x sqrt(number of ControlNet weights)
    assert raw > 1e3
    assert controlnet_norm(0.25) == pytest.approx(0.25, rel=1e-4)
    assert controlnet_norm(1.0) == pytest.approx(1.0, rel=1e-4)
    assert controlnet_norm(2 * raw) == pytest.approx(raw, rel=1e-6)
