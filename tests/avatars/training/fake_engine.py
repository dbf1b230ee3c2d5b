"""A stand-in for the engine ``deepspeed.initialize`` returns, shared by the tests of ``build_engine``'s options
(the real DeepSpeed engine runs in test_optim.py's resume test, test_precision.py and test_step_work.py)."""

from __future__ import annotations

import torch

from avatars.models import DiffusionAvatarsModel
from avatars.training import TrainConfig


class FakeEngine:
    """Reduced to what ``TrainingEngine.micro_step`` calls: the loss is ``scale`` x the sum of the trainable weights
    (a gradient of ``scale`` on every one); ``step`` records the gradients the update applies and, with
    ``steps_optimizer``, then steps the optimizer and the schedule (DeepSpeed's order)."""

    device = torch.device("cpu")

    def __init__(self, module, optimizer, lr_scheduler, config, scale: float, steps_optimizer: bool):
        self.module, self.optimizer, self.lr_scheduler, self.config = module, optimizer, lr_scheduler, config
        self.scale, self.steps_optimizer = scale, steps_optimizer
        self.applied: dict[str, torch.Tensor] = {}

    def __call__(self, batch, noise):
        return self.scale * sum(p.sum() for p in self.module.parameters() if p.requires_grad)

    def backward(self, loss):
        loss.backward()

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        self.applied = {n: p.grad.clone() for n, p in self.module.model.named_parameters() if p.grad is not None}
        if not self.steps_optimizer:
            return
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def fake_engine(monkeypatch, scale: float, steps_optimizer: bool, **options):
    """build_engine(TrainConfig(**options)) on a fresh tiny model, one process, DeepSpeed's initialize replaced by
    :class:`FakeEngine`."""
    import deepspeed

    from avatars.training.engine import build_engine

    monkeypatch.setattr(deepspeed, "initialize", lambda model, optimizer, lr_scheduler, config: (
        FakeEngine(model, optimizer, lr_scheduler, config, scale, steps_optimizer), optimizer, None, lr_scheduler))
    cfg = TrainConfig(**options)
    return build_engine(cfg, DiffusionAvatarsModel(cfg.model_config(8)), 1)
