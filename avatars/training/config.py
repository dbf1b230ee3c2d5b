"""Configuration of one person's training run, and the complete `tiny` (CPU) and `paper` (GPU) presets.

A preset is a whole :class:`TrainOptions` (:data:`PRESETS`), so ``--help`` after a preset name
shows every value that run uses (``python jobs/train_person.py paper --help``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from avatars.configs import DiffusionAvatarsConfig, paper_config, tiny_config
from avatars.data.shard_dataset import check_min_crop
from avatars.training.latent_cache import check_latent_cache_mib
from avatars.training.optim import check_lr_decay
from avatars.training.weight_average import check_decay
from common.configs import to_jsonable
from common.names import host_problem
from common.paths import LPIPS_WEIGHTS


@dataclass
class TrainOptions:
    """How to train (the same for every person of a launch); the defaults are the tiny preset."""

    model: DiffusionAvatarsConfig = field(default_factory=tiny_config)
    """Model layout and ablation switches (its expression_dim is read from the data, its init_seed is --seed)."""
    base_model: Path | None = None
    """Local diffusers directory with the frozen base (unet/, vae/; SD2.1 for the paper preset)."""
    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 4
    """Micro-batch per process (the paper's 8; tiny: 4, at 61% of batch 8's CPU time: measured on persons
    000 and 003 with benchmarks/bench_fidelity.py on the main job's base, 0.4 dB below batch 8 at 600
    steps; 400 steps at batch 4 lost 2-2.6 dB; README "The main job now")."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    min_crop: float = 1.0
    """Smallest random training crop, as a fraction of the face window's side: a crop side drawn in [min_crop, 1]
    of the window, resized to the model's resolution (paper: the official 0.7). Tiny: 1, the whole window as the
    evaluation renders it: the tiny avatar under-fits in its 600 steps, and on 8 persons x 2 seeds the crops cost
    1.5 dB of held-out face PSNR (worse on 16 of 16 pairs) at the same CPU; README "Training crops"."""
    latent_cache_mib: float = 1024
    """Training-device memory (MiB) that keeps the frozen VAE's posterior of each training sample, so the
    encoder runs once per sample instead of at every draw (avatars/training/latent_cache.py). Used only when a
    sample is the same every epoch, i.e. min_crop 1 (the tiny preset; with random crops every draw is a new
    image); samples beyond the memory are encoded at every draw. 0: off. A tiny sample takes 8 KiB, a 512x512
    one 128 KiB."""
    lr_networks: float = 3e-3
    """Learning rate of ControlNet + expression layers (paper: 1e-4; tiny: 3e-3, it trains far fewer steps:
    measured on person 000 at 600 steps, 3e-3 with --lr-features 0.1 rendered the held-out face 0.8 dB closer
    than 1e-3 with 1e-2, at the same cost; benchmarks/bench_fidelity.py, README "Results")."""
    lr_features: float = 1e-1
    """Learning rate of the TriPlanes and the ambient map (paper: the official 1e-2; tiny: 1e-1, see lr_networks)."""
    lr_decay: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule: 'constant' (the official code's) or 'cosine' (from the peak to 10% of it
    at the last step, no warm-up)."""
    ema_decay: float = 0.99
    """Exponential moving average of the trainable weights, decay per optimizer step (with diffusers'
    warm-up); the average is what validation renders and ``model/`` holds, and the checkpoints keep it.
    0: none (the official code's and the paper preset's setting). Tiny: 0.99, measured on 8 persons x 2
    seeds at 600 steps: held-out PSNR +0.50 dB (better on 15 of 16), colour error -0.46, LPIPS level,
    at no cost measurable in the first run; README "An average of the weights". See
    avatars/training/weight_average.py."""
    grad_clip: float = 1.0
    """Gradient norm clipping (the paper's 1.0; 0 disables it)."""
    clip_scope: Literal["controlnet", "all"] = "controlnet"
    """Whose gradient norm is clipped: 'controlnet' (the official code: the ControlNet only, not the
    feature planes or the expression layers; needs --zero-stage 0) or 'all' trainable parameters."""
    weight_decay: float = 1e-2
    """AdamW weight decay of the networks and the feature planes (the official 1e-2)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-2; the trainable part is small, so 0 is usually best; 1 and 2 clip inside
    DeepSpeed, over every trainable parameter, so they need --clip-scope all or --grad-clip 0)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'bf16': frozen UNet/VAE stored in bf16, trainable parts fp32 under bf16 autocast; 'fp32': all
    float32 (the original's setting); 'auto': bf16 on GPU, fp32 on CPU."""
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    """Layout of the convolution weights (and so of the activations) of the UNet, the ControlNet, the VAE and (w/o
    LDM prior) the conditioning embedding: 'channels_last' (NHWC), 'contiguous' (NCHW); 'auto': channels_last on
    GPU (cuDNN's bf16 convolutions are NHWC), contiguous on CPU. Not every network converts under channels_last:
    the frozen VAE only with --compile (eager, its group norms copied NHWC back to NCHW at a cost above the gain),
    and with --zero-stage 1 or 2 the trained networks stay NCHW (DeepSpeed keeps them as views of its flat
    partitions), so there only the frozen UNet (and the VAE when compiled) converts
    (avatars/training/performance.py)."""
    compile: bool = False
    """torch.compile the repeated ResNet / transformer blocks of the UNet, ControlNet and VAE
    (regional compilation; each block shape compiles once, at the first steps). Paper preset: on (one
    H200, batch 8: 48.6 vs 38.8 samples/s eager, for ~150 s of compiling in the first step); tiny: off
    (on the 2-core CPU a compiled step took 108 ms against 104 eager, after 40 CPU s of compiling)."""
    compile_cache: Path | None = None
    """With --compile: a folder (shared storage on a cluster) keeping the compiled code between jobs: loaded
    before the first step, saved after it by rank 0, so a job on a fresh machine skips most of the compiling
    once one job of the torch version and GPU kind has saved it (avatars/pipelines/compile_cache.py; the
    main job uses <workdir>/compile-cache/train). None: torch's per-machine cache only. Unused without
    --compile."""
    checkpoint_every: int = 100
    """Save a resumable checkpoint every N optimizer steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a new one is complete."""
    resume: Literal["auto", "never"] = "auto"
    """'auto': continue from the newest complete checkpoint if any; 'never': start over (deletes old checkpoints)."""
    validate_every: int = 0
    """Render held-out samples every N steps (and at the end); 0 disables intermediate validation
    (tiny: 0, the validation at the end only: two more cost 13 CPU s of the first run's 8 persons, ~2%
    of the training, and change nothing that is trained; paper: 200)."""
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
    """Serve Prometheus metrics on the first free port of the 64 from this one up (1 to 65472, so that every port
    tried exists; the processes of a node take one each); 0: a free port the system picks; None: no exporter. The
    bound port is logged (a ``metrics_port`` record in metrics.jsonl)."""
    metrics_host: str = "127.0.0.1"
    """Address the Prometheus exporter listens on: loopback by default; the node's address (or 0.0.0.0) when a
    Prometheus on another machine scrapes it. A host name or IP address, without a port (that is
    --metrics-port)."""
    metrics_targets_dir: Path | None = None
    """Folder where the bound exporter is written as a Prometheus file_sd target (``training-<person>.json``,
    labels person and component; removed when the run ends or fails) for the ``file_sd_configs`` jobs of
    cluster/monitoring/prometheus.yml: a folder the Prometheus reads (shared on a cluster). A wildcard
    --metrics-host is written as the node's name. Needs --metrics-port; None: nothing is written (launch_all: its
    <workdir>/monitoring/targets when --train.metrics-port is set). A folder that cannot be written is a warning."""
    lpips_weights: Path = LPIPS_WEIGHTS
    """LPIPS AlexNet weights for validation (written by setup.sh into the checkout's weights/; the default is that
    file's absolute path, so it is found from any working directory); validation reports PSNR only if absent.
    launch_all evaluates with them too."""

    def __post_init__(self) -> None:
        # checked when the options are parsed, not when a person's trainer has already made its run folder
        check_min_crop(self.min_crop)
        check_lr_decay(self.lr_decay)
        check_latent_cache_mib(self.latent_cache_mib)
        check_decay(self.ema_decay)
        check_counts(self)
        check_metrics_address(self.metrics_port, self.metrics_host)
        if self.metrics_targets_dir is not None and self.metrics_port is None:
            raise ValueError(f"{_flag('metrics_targets_dir')} needs {_flag('metrics_port')}: without an exporter "
                             "there is no target to write")
        # the model's own rules (ablation combinations, ranges), here and not in each trainer's set-up: there they
        # failed every person after the data and base stages, and after --resume never had cleared the run
        self.model.validate()


#: Integer options and their smallest value: 0 cadences divided by zero after step 1, --keep-last 0 kept every
#: checkpoint and -1 deleted them all, --val-samples 0 and --val-inference-steps 0 failed after the last step.
MINIMUM = {"steps": 0, "batch_size": 1, "grad_accum": 1, "checkpoint_every": 1, "log_every": 1, "keep_last": 1,
           "validate_every": 0, "val_samples": 1, "val_inference_steps": 1, "num_workers": 0}


def _flag(name: str) -> str:
    flag = name.replace("_", "-")
    return f"{name} (--{flag}; --train.{flag} in launch_all)"


def check_counts(options: TrainOptions) -> None:
    """Refuses counts out of range when the options are parsed, naming the option, not after training."""
    for name, low in MINIMUM.items():
        value = getattr(options, name)
        if value < low:
            raise ValueError(f"{_flag(name)} must be >= {low}, got {value}")
    if options.zero_stage not in (0, 1, 2):
        raise ValueError(f"{_flag('zero_stage')} must be 0, 1 or 2, got {options.zero_stage}")
    if not options.grad_clip >= 0:  # also NaN
        raise ValueError(f"{_flag('grad_clip')} must be >= 0 (0 disables clipping), got {options.grad_clip}")
    # NaN, inf or a negative rate trained a run to NaN weights (or ascended the loss) without a word; 0 freezes the
    # group's parameters (an ablation: test_loss_curve.py's control run)
    for name in ("lr_networks", "lr_features"):
        value = getattr(options, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{_flag(name)} must be a finite number >= 0 (0 freezes its parameters), got {value}")
    if not (math.isfinite(options.weight_decay) and options.weight_decay >= 0):
        raise ValueError(f"{_flag('weight_decay')} must be a finite number >= 0 (0: no weight decay), got "
                         f"{options.weight_decay}")
    if options.zero_stage > 0 and options.grad_clip > 0 and options.clip_scope != "all":
        raise ValueError(f"{_flag('clip_scope')} {options.clip_scope!r} needs --zero-stage 0: ZeRO "
                         f"{options.zero_stage} clips inside DeepSpeed, over every trainable parameter; pass "
                         "--clip-scope all (or --grad-clip 0)")


#: Ports the Prometheus exporter tries from --metrics-port up (cluster.monitoring.metrics.PORT_RANGE; not imported
#: from there: the options are checked without the exporter's packages).
EXPORTER_PORTS = 64
#: The highest first port whose whole range exists (ports end at 65535).
MAX_METRICS_PORT = 65535 - EXPORTER_PORTS + 1


def check_metrics_address(port: int | None, host: str) -> None:
    """Refuses, when the options are parsed, an exporter port the exporter cannot bind (was: an OverflowError at
    the training's start, after the data and base stages, or -1 quietly meaning "any port") and a host that is no
    address (empty, or with a port: was "no free Prometheus port" after 64 failed tries)."""
    if port is not None and not 0 <= port <= MAX_METRICS_PORT:
        raise ValueError(f"{_flag('metrics_port')} must be 1 to {MAX_METRICS_PORT} (the exporter tries "
                         f"{EXPORTER_PORTS} ports from it up) or 0 (a free port the system picks), got {port}")
    if (why := host_problem(host)) is not None:
        raise ValueError(f"{_flag('metrics_host')} {host!r}: {why}")


#: Options a resumed run may change (``--resume auto``): how long it trains (unless a cosine schedule is spread
#: over --steps), how often it logs, validates and saves, how fast it runs and where things are (the base is
#: checked by content, avatars/training/base_record.py). Every other option defines the training state (the
#: model, the data, the optimizer: DeepSpeed restores the checkpoint's learning rates whatever --lr-* says; a
#: random base is rebuilt from --seed), so a checkpoint continues only with its own values of them.
RESUMABLE_FIELDS = frozenset({
    "steps", "checkpoint_every", "keep_last", "resume", "validate_every", "val_samples", "val_inference_steps",
    "log_every", "num_workers", "metrics_port", "metrics_host", "metrics_targets_dir", "lpips_weights", "precision",
    "memory_format", "compile", "compile_cache", "latent_cache_mib", "ema_decay", "base_model", "person", "shards",
    "out"})


#: The key of the training data's digest (shards.writer.split_digest of the person's 'train' shards) in the options a
#: checkpoint saves and in result.json: checkpoints continue, and an avatar counts as trained, only on that data
#: (another held-out split moves frames between training and evaluation).
TRAIN_DATA = "train_data"


#: The key of the number of training processes in the options a checkpoint saves: each process's data position and
#: noise generator are saved by its rank, and the global batch is the micro-batch times the processes, so a run
#: continues only on as many processes (fewer repeated data and lost generators; more found no state of theirs).
WORLD_SIZE = "world_size"


def state_options(config: "TrainConfig", train_data: str, world_size: int) -> dict[str, Any]:
    """The options a checkpoint saves and a resume compares (:func:`resume_conflicts`): ``config``'s, with the
    digest of the training data it reads and the number of processes training it."""
    return {**to_jsonable(config), TRAIN_DATA: train_data, WORLD_SIZE: world_size}


class ResumeMismatch(ValueError):
    """A resume asked to continue checkpoints with options that define another training state."""


class TrainingDiverged(RuntimeError):
    """The training loss, or the weights, became NaN or infinite: the run stops instead of saving them (a checkpoint
    of NaN weights would be resumed from, a NaN model published and counted as trained)."""


def _flat(options: dict, prefix: str = "") -> dict[str, Any]:
    """Nested option dicts as {"model.resolution": ...}."""
    out = {}
    for key, value in options.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


#: What a checkpoint must have recorded to be continued: one written before a version recorded them (or before it
#: saved any options) cannot be shown to continue on this run's training data and number of processes (such a
#: checkpoint, resumed at its last step on another held-out split, was published as trained on the new one).
MUST_BE_RECORDED = (TRAIN_DATA, WORLD_SIZE)


def resume_conflicts(saved: dict, now: dict) -> list[str]:
    """``"field: checkpoint's value -> this run's"`` for every state-defining option that differs between the
    options a checkpoint saved and this run's (both ``to_jsonable`` of a :class:`TrainConfig`), and for each of
    :data:`MUST_BE_RECORDED` this run has and the checkpoint did not record. Other options only one of them knows
    (added or removed by another version, with a default that keeps the old behaviour) are not compared."""
    resumable = set(RESUMABLE_FIELDS)
    if "cosine" in (saved.get("lr_decay"), now.get("lr_decay")):
        resumable.discard("steps")  # the schedule falls over --steps
    unrecorded = [f"{key}: not recorded (the checkpoint is of an older version) -> {now[key]!r}"
                  for key in MUST_BE_RECORDED if key in now and key not in saved]
    old, new = _flat(saved), _flat(now)
    return unrecorded + [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(old.keys() & new.keys())
                         if key.split(".")[0] not in resumable and old[key] != new[key]]


@dataclass
class TrainConfig(TrainOptions):
    """One person's training run: what to train on and where to write, plus the options."""

    person: str = "000"
    """Person id: trains on `<shards>/<person>/train-*.tar`, validates on its held-out splits."""
    shards: Path = Path("data/shards")
    """Shard root written by jobs/preprocess.py."""
    out: Path = Path("data/runs")
    """Run root: `<out>/<person>/{checkpoints,val,model}`, `metrics.jsonl`, `result.json`."""
    random_base: Annotated[bool, tyro.conf.Suppress] = False
    """Build the frozen base with the seeded random weights (benchmarks of the paper preset without SD2.1 weights;
    the avatar it trains is meaningless): the model's requires_pretrained_base is then set to False, whatever the
    preset says. Refused together with base_model. Python callers only (the benchmarks; ``run``'s fields): on the
    command line the same is --model.no-requires-pretrained-base without --base-model, so no flag offers it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.random_base and self.base_model is not None:  # neither preset sets both: refused when constructed
            raise ValueError(f"random_base builds the base model from random weights: do not also pass base_model "
                             f"(--base-model), got {self.base_model}")

    def base_problem(self) -> str | None:
        """Why this run cannot have its base, naming the flags, or None: the model requires a pretrained base
        (the paper preset) and neither --base-model nor random_base is given. Not checked when constructed (a
        preset's options are complete without their --base-model); the entry points (jobs/train_person.py's
        ``main`` and ``run``) check it before the trainer, whose --resume never clears the run folder first."""
        if self.model.requires_pretrained_base and self.base_model is None and not self.random_base:
            return ("--base-model is required (--train.base-model in launch_all): this model needs a pretrained base "
                    "(a local diffusers directory of Stable Diffusion 2.1 for the paper preset); "
                    "--model.no-requires-pretrained-base trains on a seeded random base instead (benchmarks only)")
        return None

    @classmethod
    def for_person(cls, options: TrainOptions, **fields: Any) -> "TrainConfig":
        """``options`` plus the per-person fields (person, shards, out, random_base)."""
        options = copy.deepcopy(options)  # never share the (mutable) model config with a preset
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(TrainOptions)}, **fields)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.person

    def model_config(self, expression_dim: int) -> DiffusionAvatarsConfig:
        """``model`` with the data's expression dimension and --seed; a model trained on a loaded
        base needs that base again, one on a random base does not: requires_pretrained_base is set to True with
        base_model, to False with random_base, and kept otherwise (see its help)."""
        config = dataclasses.replace(self.model, expression_dim=expression_dim, init_seed=self.seed)
        if self.base_model is not None:
            config = dataclasses.replace(config, requires_pretrained_base=True)
        if self.random_base:
            config = dataclasses.replace(config, requires_pretrained_base=False)
        config.validate()
        return config


#: Name -> (description, complete options). The dataclass defaults are the tiny preset.
PRESETS: dict[str, tuple[str, TrainOptions]] = {
    "tiny": ("CPU-sized model at 64x64 with random or tiny-pretrained weights, 600 steps at batch 4 "
             "(the main job pretrains a tiny base for it)", TrainOptions()),
    "paper": ("the paper's setting: SD2.1 layout at 512x512, 100k steps at lr 1e-4 (needs --base-model, "
              "--train.base-model in launch_all: "
              "a local Stable Diffusion 2.1 diffusers directory)",
              TrainOptions(model=paper_config(), steps=100_000, batch_size=8, min_crop=0.7, lr_networks=1e-4,
                           lr_features=1e-2, validate_every=200, compile=True, ema_decay=0.0)),
}


def train_preset(name: str, **fields: Any) -> TrainConfig:
    """A :class:`TrainConfig` with preset ``name``'s options, then ``fields`` (any TrainConfig field)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(TrainConfig.for_person(PRESETS[name][1]), **fields)
