"""Configuration of one person's training run, with the `tiny` (CPU) and `paper` (GPU) presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from avatars.configs import DiffusionAvatarsConfig, paper_config, tiny_config

Preset = Literal["tiny", "paper"]


@dataclass
class TrainOptions:
    """How to train (the same for every person of a launch). Fields left None take the preset's value."""

    preset: Preset = "tiny"
    """'tiny': CPU-sized model at 64x64; 'paper': SD2.1 layout at 512x512 (needs --base-model)."""
    base_model: Path | None = None
    """Local diffusers directory with the frozen base (unet/, vae/; SD2.1 for 'paper')."""
    steps: int | None = None
    """Optimizer steps (tiny: 600, paper: 100000)."""
    batch_size: int | None = None
    """Micro-batch per process (both presets: 8, the paper's)."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    lr_networks: float | None = None
    """Learning rate of ControlNet + expression layers (paper: 1e-4; tiny: 1e-3, it trains far fewer steps)."""
    lr_features: float = 1e-2
    """Learning rate of the TriPlanes and the ambient map (the paper's 1e-2)."""
    grad_clip: float = 1.0
    """Gradient norm clipping (the paper's 1.0; 0 disables it)."""
    clip_scope: Literal["controlnet", "all"] = "controlnet"
    """Whose gradient norm is clipped: 'controlnet' (the official code: the ControlNet only, not the
    feature planes or the expression layers; needs --zero-stage 0) or 'all' trainable parameters."""
    weight_decay: float = 1e-2
    """AdamW weight decay of the networks and the feature planes (the official 1e-2)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-2; the trainable part is small, so 0 or 1 is usually best)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'bf16': frozen UNet/VAE stored in bf16, trainable parts fp32 under bf16 autocast; 'fp32': all
    float32 (the original's setting); 'auto': bf16 on GPU, fp32 on CPU."""
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    """Layout of the networks' convolution weights and activations; 'auto': channels_last on GPU
    (cuDNN's bf16 convolutions are NHWC), contiguous on CPU."""
    compile: bool = False
    """torch.compile the repeated ResNet / transformer blocks of the UNet, ControlNet and VAE
    (regional compilation; each block shape compiles once, at the first steps)."""
    checkpoint_every: int = 100
    """Save a resumable checkpoint every N optimizer steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a new one is complete."""
    resume: Literal["auto", "never"] = "auto"
    """'auto': continue from the newest complete checkpoint if any; 'never': start over (deletes old checkpoints)."""
    validate_every: int = 200
    """Render held-out samples every N steps (and at the end); 0 disables intermediate validation."""
    val_samples: int = 4
    """Held-out samples rendered per validation (fixed, evenly spread over the held-out splits)."""
    val_inference_steps: int = 20
    """Sampling steps of the validation renders (DDPM, the paper's 20)."""
    num_workers: int = 2
    """Data-loader decoding threads (0: decode in the training loop)."""
    seed: int = 0
    """Seed of data order, augmentation, diffusion noise and model initialisation."""
    log_every: int = 10
    """Write a metrics.jsonl line (and Prometheus values) every N steps."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on the first free port from this one up (None: no exporter); the port is logged."""
    lpips_weights: Path = Path("weights/lpips_alex.safetensors")
    """LPIPS AlexNet weights for validation (written by setup.sh); validation reports PSNR only if absent."""


@dataclass
class TrainConfig(TrainOptions):
    """One person's training run: what to train on and where to write, plus the options."""

    person: str = "000"
    """Person id: trains on `<shards>/<person>/train-*.tar`, validates on its held-out splits."""
    shards: Path = Path("data/shards")
    """Shard root written by jobs/preprocess.py."""
    out: Path = Path("data/runs")
    """Run root: `<out>/<person>/{checkpoints,val,model}`, `metrics.jsonl`, `result.json`."""
    random_base: bool = False
    """Build the frozen base with random weights instead of loading --base-model (benchmarks of the
    paper preset without SD2.1 weights; the avatar it trains is meaningless)."""

    def resolved(self) -> "TrainConfig":
        """A copy with every preset default filled in."""
        d = PRESETS[self.preset]
        return dataclasses.replace(
            self,
            steps=self.steps if self.steps is not None else d["steps"],
            batch_size=self.batch_size if self.batch_size is not None else d["batch_size"],
            lr_networks=self.lr_networks if self.lr_networks is not None else d["lr_networks"],
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.person

    def model_config(self, expression_dim: int) -> DiffusionAvatarsConfig:
        factory = tiny_config if self.preset == "tiny" else paper_config
        config = factory(expression_dim=expression_dim)
        if self.random_base and self.base_model is not None:
            raise ValueError("random_base builds the base model from random weights: do not also pass base_model")
        if self.preset == "tiny" and self.base_model is not None:
            config = dataclasses.replace(config, requires_pretrained_base=True)
        if self.random_base:
            config = dataclasses.replace(config, requires_pretrained_base=False)
        return dataclasses.replace(config, init_seed=self.seed)


PRESETS: dict[str, dict] = {
    "tiny": {"steps": 600, "batch_size": 8, "lr_networks": 1e-3},
    "paper": {"steps": 100_000, "batch_size": 8, "lr_networks": 1e-4},
}
