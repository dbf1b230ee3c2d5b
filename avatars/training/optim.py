"""The optimizer of a training run and its gradient clipping, in one place.

The official settings are the defaults: AdamW (betas 0.9/0.999, eps 1e-8) with weight decay
1e-2 on both groups, and the gradient norm clipped to 1.0 over the ControlNet's parameters only
(``clip_scope="controlnet"``; the feature planes, whose sparse gradients are large, and the
expression layers are not clipped); ``clip_scope="all"`` clips every trainable parameter jointly.

AdamW over the model's parameter groups (``networks``: ControlNet + expression layers;
``features``: TriPlanes + ambient map), on the fp32 master weights, with torch's fused kernel:
one launch per parameter group and step instead of several per tensor, and its step counters
live on the device (no host synchronisation).

Clipping the global gradient norm is torch's foreach ``clip_grad_norm_``: the norm and the clip
coefficient stay device tensors, so there is no per-parameter (or any) host synchronisation.
The trainer calls :func:`clip_gradients` itself with ZeRO stage 0; ZeRO 1/2 partition the
gradients, so there DeepSpeed's ZeRO optimizer clips (``gradient_clipping`` in its config).

The learning rate is constant (the official code's) or, with ``lr_decay="cosine"``, falls along a
half cosine over the run (:func:`lr_schedule`); DeepSpeed steps the schedule and keeps its state
in the checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

#: Whose gradient norm is clipped (see the module docstring).
CLIP_SCOPES = ("controlnet", "all")


def make_optimizer(model, lr_networks: float, lr_features: float, weight_decay: float = 1e-2) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.999, eps 1e-8, ``weight_decay`` on every group) over
    ``model.parameter_groups``, fused."""
    return torch.optim.AdamW(model.parameter_groups(lr_networks, lr_features), betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=weight_decay, fused=True)


def match_state_layout(optimizer) -> int:
    """Give every per-parameter state tensor (AdamW's moments) its parameter's memory layout; returns how many
    were re-laid. A checkpoint saved under one ``--memory-format`` and resumed under the other loads the moments
    with the saved strides (``Optimizer.load_state_dict`` keeps them): the fused kernel then pairs each moment
    with the wrong weight element on the CPU, silently, and refuses the mismatch on CUDA. ``optimizer`` may be a
    wrapper (DeepSpeed's) holding the torch optimizer as ``.optimizer``."""
    moved, seen = 0, set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, torch.optim.Optimizer):
            for param, state in optimizer.state.items():
                for key, value in state.items():
                    if (torch.is_tensor(value) and value.shape == param.shape and value.dim() > 1
                            and value.stride() != param.stride()):
                        state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
                        moved += 1
        optimizer = getattr(optimizer, "optimizer", None)
    return moved


#: Learning-rate schedules of a training run (see :func:`lr_schedule`).
LR_DECAYS = ("constant", "cosine")
#: Where the cosine schedule ends, as a fraction of the peak learning rate.
COSINE_FLOOR = 0.1


def check_lr_decay(decay: str) -> None:
    """Refuse a schedule name that :func:`lr_schedule` does not know."""
    if decay not in LR_DECAYS:
        raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {decay!r}")


def lr_schedule(optimizer: torch.optim.Optimizer, decay: str, total_steps: int) -> LambdaLR | None:
    """The schedule DeepSpeed steps after every optimizer step: None for "constant" (the official
    code's); "cosine": every group's learning rate falls from its peak along a half cosine to
    :data:`COSINE_FLOOR` of it at ``total_steps``, no warm-up."""
    check_lr_decay(decay)
    if decay == "constant":
        return None

    def factor(step: int) -> float:
        progress = min(1.0, step / max(1, total_steps))
        return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def clipped_parameters(model: nn.Module, scope: str = "controlnet") -> list[nn.Parameter]:
    """The parameters whose joint gradient norm is clipped: the ControlNet's (the official code;
    in the "w/o LDM prior" ablation the network in its place: the trainable UNet and its
    conditioning embedding), or every trainable one."""
    if scope not in CLIP_SCOPES:
        raise ValueError(f"clip scope must be one of {CLIP_SCOPES}, got {scope!r}")
    if scope == "controlnet":
        has_controlnet = getattr(model, "controlnet", None) is not None
        nets = [model.controlnet] if has_controlnet else [model.unet, model.cond_embedding]
        return [p for net in nets for p in net.parameters() if p.requires_grad]
    return [p for p in model.parameters() if p.requires_grad]


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scales the gradients so that their joint L2 norm is at most ``max_norm``; returns the norm
    before clipping as a device tensor (reading it is the caller's choice of host sync)."""
    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, foreach=True)
