"""The DeepSpeed engine around the avatar model, and one optimizer micro-step on it.

DeepSpeed runs as an fp32 engine (ZeRO 0-2, data parallel, checkpoints) around a client fused
AdamW (`avatars.training.optim`) on the trainable fp32 masters. Mixed precision is not
DeepSpeed's: its bf16 mode casts every module, the frozen ones included, and wraps the optimizer
in an unfused one that checks every tensor on the host (hundreds of stream syncs and ~11k kernel
launches per step on the paper model). Ours (`avatars.training.performance`) stores the frozen
base in bf16 and runs the loss under autocast.

A micro-step never waits for the device: the loss comes back as a device tensor, clipping is
sync-free, and DeepSpeed's throughput timer (which synchronises twice a step) is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from avatars.models import DiffusionAvatarsModel
from avatars.pipelines.compile_cache import load_compiled

from . import performance as perf
from .config import TrainConfig
from .optim import clip_gradients, clipped_parameters, lr_schedule, make_optimizer


class LossModule(nn.Module):
    """What DeepSpeed wraps: forward(batch) -> scalar loss of the avatar model, in the run's precision."""

    def __init__(self, model: DiffusionAvatarsModel, precision: perf.Precision):
        super().__init__()
        self.model = model
        self.precision = precision

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        with self.precision.autocast():
            return self.model.training_loss(batch, generator)["loss"]


def deepspeed_config(cfg: TrainConfig) -> dict:
    """An fp32 engine. With ZeRO 0 the trainer clips (`optim.clip_gradients`); ZeRO 1/2 partition
    the gradients, so their optimizer clips. The throughput timer synchronises twice a step: off."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip if cfg.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": False},
        "timers": {"throughput": {"enabled": False}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


@dataclass
class TrainingEngine:
    """The initialised engine plus what a micro-step needs beyond it."""

    engine: object  # deepspeed.DeepSpeedEngine
    model: DiffusionAvatarsModel
    precision: perf.Precision
    clipped: list[nn.Parameter]  # clipped here (ZeRO 0); empty when DeepSpeed clips or clipping is off
    grad_clip: float

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def micro_step(self, batch: dict, noise: torch.Generator) -> torch.Tensor:
        """Forward, backward and (at an accumulation boundary) the update; returns the loss as a
        detached device tensor (reading it is a host sync: do it when logging)."""
        loss = self.engine(batch, noise)
        self.engine.backward(loss)
        if self.clipped and self.engine.is_gradient_accumulation_boundary():
            clip_gradients(self.clipped, self.grad_clip)  # after DeepSpeed's all-reduce, before the update
        self.engine.step()
        return loss.detach()


def build_engine(cfg: TrainConfig, model: DiffusionAvatarsModel, world_size: int) -> TrainingEngine:
    """Precision, optimizer, DeepSpeed, memory format and compilation for ``model`` (in that order:
    DeepSpeed broadcasts parameters as byte views, which channels_last weights do not allow, and
    compilation specialises on the final layouts)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    target = torch.device(get_accelerator().device_name())
    precision = perf.resolve_precision(cfg.precision, target)
    perf.store_frozen(model, precision)
    perf.configure_backends(target)
    optimizer = make_optimizer(model, cfg.lr_networks, cfg.lr_features, cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=LossModule(model, precision), optimizer=optimizer,
                                           lr_scheduler=lr_schedule(optimizer, cfg.lr_decay, cfg.steps),
                                           config=deepspeed_config(cfg))
    if world_size == 1 and cfg.zero_stage == 0:
        # One process, nothing to reduce: DeepSpeed would still flatten and copy back every gradient.
        engine.enable_backward_allreduce = False
    if perf.use_channels_last(cfg.memory_format, engine.device):
        perf.to_channels_last(model, trainable=cfg.zero_stage == 0, modules=perf.channels_last_modules(cfg.compile))
    if cfg.compile:
        if cfg.compile_cache is not None:  # before anything compiles: the first step then finds the code
            load_compiled(cfg.compile_cache, engine.device)
        perf.compile_blocks(model)
    clipped = clipped_parameters(model, cfg.clip_scope) if cfg.zero_stage == 0 and cfg.grad_clip > 0 else []
    return TrainingEngine(engine, model, precision, clipped, cfg.grad_clip)
