"""How the model runs on the training device: precision, memory format, regional compilation.

Precision ``bf16`` (the default on CUDA):

* the frozen base (UNet, VAE) is *stored* in bf16: no fp32 master copy, nothing for autocast to
  re-cast on every step, half the memory traffic;
* the trainable parts (ControlNet, expression layers, feature planes) stay fp32 masters, updated
  by a fused AdamW (:mod:`avatars.training.optim`); DeepSpeed runs as an fp32 engine, so it neither
  casts the model nor wraps the optimizer in its unfused mixed-precision optimizers;
* the loss runs under bf16 autocast (the networks' matmuls and convolutions in bf16), except the
  feature-plane lookup, which stays fp32 (``avatars.models.conditioning``).

Precision ``fp32``: everything float32, no autocast (the original implementation's setting and the
default on CPU).

``channels_last`` stores convolution weights (and so activations) as NHWC: cuDNN's bf16
convolutions are NHWC kernels, and NCHW tensors get transposed around each one.

``compile_blocks`` compiles the repeated ResNet and transformer blocks (regional compilation,
diffusers' ``compile_repeated_blocks``) rather than the whole model: each distinct block shape is
compiled once, with static shapes (the loader drops the last partial batch and resizes every
crop to the training size).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

PrecisionName = Literal["auto", "fp32", "bf16"]
MemoryFormatName = Literal["auto", "channels_last", "contiguous"]

#: Block classes compiled by :func:`compile_blocks` (the repeated units of SD's UNet, ControlNet and VAE).
COMPILED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")
#: Frozen / trainable modules whose blocks are compiled (VAE: its encoder runs every step at full resolution).
COMPILED_MODULES = ("unet", "controlnet", "vae")


@dataclass(frozen=True)
class Precision:
    """The numeric set-up of one run (see the module docstring)."""

    bf16: bool
    device_type: str

    @property
    def frozen_dtype(self) -> torch.dtype:
        """dtype the frozen modules are stored in."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the loss (and validation) run in."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)


def resolve_precision(name: PrecisionName, device: torch.device) -> Precision:
    """'auto' is bf16 on CUDA and fp32 elsewhere."""
    if name not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto|fp32|bf16, got {name!r}")
    bf16 = name == "bf16" or (name == "auto" and device.type == "cuda")
    return Precision(bf16=bf16, device_type=device.type)


def frozen_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Direct children of ``model`` that have parameters and none of them trainable."""
    out = {}
    for name, child in model.named_children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            out[name] = child
    return out


def store_frozen(model: nn.Module, precision: Precision) -> list[str]:
    """Casts the frozen children of ``model`` to the precision's storage dtype; returns their names."""
    frozen = frozen_modules(model)
    for module in frozen.values():
        module.to(dtype=precision.frozen_dtype)
    return sorted(frozen)


def use_channels_last(name: MemoryFormatName, device: torch.device) -> bool:
    """'auto': channels_last on CUDA (cuDNN's bf16 convolutions are NHWC), contiguous elsewhere."""
    if name not in ("auto", "channels_last", "contiguous"):
        raise ValueError(f"memory_format must be auto|channels_last|contiguous, got {name!r}")
    return name == "channels_last" or (name == "auto" and device.type == "cuda")


#: The convolutional networks of the model (the feature planes are 4-D too but are no convolution weights).
CONV_MODULES = ("unet", "controlnet", "vae", "cond_embedding")


def channels_last_modules(compiled: bool) -> tuple[str, ...]:
    """The networks to store as NHWC under channels_last: all of them when their blocks are compiled,
    all but the frozen VAE when eager.

    Eager CUDA group norm takes NCHW only, so under channels_last each norm copies its input to NCHW
    and the next convolution copies back, through torch's generic strided copy. In the VAE encoder,
    which runs every step at full resolution, that cost more than NHWC convolutions gain (H200
    profile of 2026-11-27, paper config, batch 8, per step: ~23 ms of layout copies at 512^2, 256^2
    and 128^2 against 3.3 ms for the four 512^2 convolutions in NHWC and 7.2 ms in the peer's NCHW
    encoder). The UNet and the ControlNet keep NHWC (the whole step ran 35.8 samples/s with it,
    32.9 without). Compiled blocks fuse the norms into kernels that read NHWC, so there the VAE
    converts too."""
    return CONV_MODULES if compiled else tuple(name for name in CONV_MODULES if name != "vae")


def to_channels_last(model: nn.Module, trainable: bool = True,
                     modules: tuple[str, ...] = CONV_MODULES) -> list[str]:
    """Stores the convolution weights of the model's ``modules`` as NHWC; returns the modules converted.

    A convolution whose weight is channels_last produces channels_last outputs, so activations
    follow from the first convolution on. Call it after ``deepspeed.initialize``: DeepSpeed
    broadcasts parameters as byte views, which a channels_last weight does not allow.
    ``trainable=False`` leaves the trainable networks alone (ZeRO 1/2 keep them as views of
    their flat fp32 partitions, which a conversion would detach).
    """
    done = []
    for name in modules:
        module = getattr(model, name, None)
        if module is None or (not trainable and any(p.requires_grad for p in module.parameters())):
            continue
        module.to(memory_format=torch.channels_last)  # in place: Parameter objects (and optimizer references) stay
        done.append(name)
    return done


def compile_blocks(model: nn.Module, modules: tuple[str, ...] = COMPILED_MODULES,
                   blocks: tuple[str, ...] = COMPILED_BLOCKS, backend: str = "inductor") -> int:
    """Regionally compiles the repeated blocks of ``model``'s ``modules`` (lazily, at first call).

    Uses diffusers' ``ModelMixin.compile_repeated_blocks`` (``_repeated_blocks`` names the classes;
    diffusers does not set it for UNet2DConditionModel / ControlNetModel / AutoencoderKL) with
    ``dynamic=False``: every block shape is specialised once. Parameters keep their names
    (``Module.compile`` compiles in place), so checkpoints are unchanged. Returns the number of
    compiled blocks. ``backend``: torch.compile's; the CPU tests take "aot_eager" (dynamo's capture and
    AOTAutograd's forward/backward split, without inductor's C++ kernels for the CPU, which a GPU training
    does not run).
    """
    import torch._dynamo

    # A UNet has ~14 distinct ResNet block shapes; each is one entry of the same code object's cache.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    count = 0
    for name in modules:
        module = getattr(model, name, None)
        if module is None:
            continue
        found = [m for m in module.modules() if type(m).__name__ in blocks]
        if not found:
            continue
        module._repeated_blocks = list(blocks)
        module.compile_repeated_blocks(dynamic=False, backend=backend)
        count += len(found)
    return count


def eager() -> contextlib.AbstractContextManager:
    """Runs compiled blocks eagerly (validation: other batch size and no grad, rare, not worth compiling)."""
    return torch.compiler.set_stance("force_eager")


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning for the fixed training shapes (every batch has the same size)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


class Stopwatch:
    """Wall time of work queued on ``device``, synchronising only when read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()

    def read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start
