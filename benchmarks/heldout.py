"""Shared by the quality benchmarks (bench_fidelity, bench_ablations, bench_learning): train a
variant of the tiny avatar, render a person's held-out evaluation set and score it exactly as the
nightly evaluation does, and draw ground truth | render pictures.

A *variant* is a name plus overrides: fields of :class:`avatars.training.TrainConfig`
(``steps``, ``lr_networks``, ...) and of the model config (``use_expression``,
``features.mapping``, ``use_diffusion``, ...). Runs are cached under ``<out>/<variant>/s<seed>/``
and reused when their recorded spec matches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from avatars.configs import DiffusionAvatarsConfig
from avatars.evaluation.metrics import masked_psnr
from avatars.models import DiffusionAvatarsModel
from avatars.pipelines import AvatarPipeline
from avatars.training import TrainConfig, TrainOptions, train_person
from avatars.training.callbacks import METRICS_FILE, MetricsLog, TrainerCallback
from cluster.eval_driver.driver import merge_evaluations
from cluster.eval_driver.tasks import TaskFrames, novel_view, open_store, self_reenactment
from common.io import atomic_write_json

#: Model-config fields a variant may override ("features.<field>" for the feature planes).
MODEL_KEYS = {f.name for f in dataclasses.fields(DiffusionAvatarsConfig)}


def parse_value(text: str) -> Any:
    """'600' -> 600, '1e-3' -> 0.001, 'false' -> False, '16-32-32' -> (16, 32, 32) (a layout, as in
    bench_base_vae.py), anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    parts = text.split("-")
    if len(parts) > 1 and all(p.isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass
class Variant:
    """A named set of overrides (see module docstring)."""

    name: str
    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def parse(spec: str) -> "Variant":
        """'name:key=value,key=value' (or just 'key=value,...', named by the spec itself)."""
        name, _, body = spec.rpartition(":")
        v = Variant(name or spec)
        for item in filter(None, body.split(",")):
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            target = v.model if key.split(".")[0] in MODEL_KEYS else v.train
            target[key] = parse_value(value.strip())
        return v

    def spec(self) -> dict:
        return {"train": self.train, "model": self.model}


def apply_model_overrides(config: DiffusionAvatarsConfig, overrides: dict[str, Any]) -> DiffusionAvatarsConfig:
    top, sub = {}, {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            sub.setdefault(head, {})[rest] = value
        else:
            top[key] = value
    for head, fields_ in sub.items():
        top[head] = dataclasses.replace(getattr(config, head), **fields_)
    config = dataclasses.replace(config, **top)
    config.validate()
    return config


@dataclass
class VariantTrainConfig(TrainConfig):
    """A TrainConfig whose model config gets the variant's overrides."""

    model_overrides: dict = field(default_factory=dict)

    def model_config(self, expression_dim: int) -> DiffusionAvatarsConfig:
        return apply_model_overrides(super().model_config(expression_dim), self.model_overrides)


def run_spec(cfg: TrainConfig, variant: Variant, train: dict[str, Any]) -> dict:
    """What a cached run must match to be reused: the variant, every training option as resolved
    (so a run trained under other preset defaults is retrained, not reused), seed, person, the base by
    content (a base pretrained again into the same folder is another base) and the training data (another
    held-out split, or other shards: frames it trained on might now be evaluated)."""
    from avatars.training.base_record import base_fingerprint
    from shards.writer import split_digest

    options = {f.name: str(getattr(cfg, f.name)) for f in dataclasses.fields(TrainOptions)
               if f.name not in ("base_model", "seed", "checkpoint_every", "resume")}
    return {"variant": variant.spec(), "train": {k: str(v) for k, v in train.items()}, "options": options,
            "seed": cfg.seed, "base_model": str(cfg.base_model), "base_fingerprint": base_fingerprint(cfg.base_model),
            "train_data": split_digest(cfg.shards, cfg.person, "train"), "person": cfg.person}


def train_variant(variant: Variant, person: str, seed: int, shards: Path, base_model: Path | None, out: Path,
                  callbacks: tuple = (), **defaults: Any) -> tuple[Path, dict]:
    """Trains (or reuses) one run; returns (run dir, its result.json plus the CPU seconds of training)."""
    run_root = Path(out) / variant.name / f"s{seed}"
    train = {"validate_every": 0, "num_workers": 0, **defaults, **variant.train}
    cfg = VariantTrainConfig(person=person, shards=Path(shards), out=run_root, base_model=base_model, seed=seed,
                             model_overrides=dict(variant.model), **train)
    if "checkpoint_every" not in train:
        cfg.checkpoint_every = cfg.steps  # one checkpoint, at the end
    spec = run_spec(cfg, variant, train)
    spec_file = cfg.run_dir / "variant.json"
    result_file = cfg.run_dir / "result.json"
    if spec_file.is_file() and result_file.is_file() and json.loads(spec_file.read_text()).get("spec") == spec:
        saved = json.loads(spec_file.read_text())
        return cfg.run_dir, {**json.loads(result_file.read_text()), "train_cpu_s": saved.get("train_cpu_s")}
    cfg.resume = "never"
    cpu = time.process_time()
    result = train_person(cfg, callbacks=[MetricsLog(cfg.run_dir / METRICS_FILE), *callbacks])
    cpu = time.process_time() - cpu
    atomic_write_json(spec_file, {"spec": spec, "train_cpu_s": cpu})
    return cfg.run_dir, {**result, "train_cpu_s": cpu}


def main_job_base(workdir: Path) -> Path:
    """The tiny base of a main-job work directory: ``<workdir>/base/tiny`` when one was written
    there by hand (``jobs/pretrain_base.py --output``), else the newest ``<workdir>/base/tiny-<key>``
    that ``launch_all`` keys by its settings and data."""
    from avatars.training.base_pretraining import newest_base

    by_hand = Path(workdir) / "base" / "tiny"
    return by_hand if by_hand.is_dir() else newest_base(Path(workdir) / "base")


def load_model(run_dir: Path, base_model: Path | None = None) -> DiffusionAvatarsModel:
    return DiffusionAvatarsModel.from_pretrained(Path(run_dir) / "model", base_model=base_model).eval()


def heldout_tasks(stores: Path, shards: Path, person: str, resolution: int,
                  tasks: tuple[str, ...] = ("self_reenactment", "novel_view")) -> list[TaskFrames]:
    """The evaluation driver's frames of the held-out tasks (sequences and camera) of a person, read."""
    store = open_store(stores, person)
    build = {"self_reenactment": self_reenactment, "novel_view": novel_view}
    return [dataclasses.replace(frames, clips=frames.load_clips())
            for frames in (build[t](store, shards, resolution) for t in tasks)]


def task_batch(frames: TaskFrames) -> dict[str, torch.Tensor]:
    """All frames of a task as one conditioning batch (channel-first float32 tensors)."""
    cond = [c for clip in frames.clips for c in clip.conditioning]
    return {k: torch.from_numpy(np.stack([c[k] for c in cond])) for k in cond[0]}


def ground_truth(frames: TaskFrames) -> torch.Tensor:
    """(T, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.concatenate([c.reference for c in frames.clips])).permute(0, 3, 1, 2).float()


@contextlib.contextmanager
def conditioning_scale(model: DiffusionAvatarsModel, scale: float) -> Iterator[None]:
    """Inside the block the model renders with ``scale`` as its config's ``conditioning_scale`` (what a trained
    avatar would render with, had it been saved so); its own config again after it."""
    saved = model.config
    model.config = dataclasses.replace(saved, conditioning_scale=scale)
    try:
        model.config.validate()
        yield
    finally:
        model.config = saved


@torch.no_grad()
def render(model: DiffusionAvatarsModel, batch: dict, steps: int = 20, sampler: str = "ddpm", seed: int = 0,
           chunk: int = 16) -> torch.Tensor:
    """(T, 3, H, W) renders in [0, 1] with the evaluation's fixed noise (one video seed)."""
    pipe = AvatarPipeline(model)
    size = batch["mask"].shape[0]
    out = [pipe({k: v[i:i + chunk] for k, v in batch.items()}, num_inference_steps=steps, sampler=sampler, seeds=seed)
           for i in range(0, size, chunk)]
    return torch.cat(out).float().clamp(0, 1)


def training_frames(shards: Path, person: str, count: int, resolution: int) -> dict:
    """``count`` of the person's training samples spread evenly over its training shards, uncropped (the
    evaluation's face window), as one batch of the training contract (``image`` in [-1, 1])."""
    from avatars.data.shard_dataset import LoaderConfig, ShardDataset, collate, expand_batch
    from shards.writer import shard_paths

    dataset = ShardDataset(shard_paths(shards, person, "train"),
                           LoaderConfig(resolution=resolution, augment=False, num_workers=0))
    index = np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int)
    return expand_batch(collate([dataset.compact(int(i)) for i in index]))


def face_psnr(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over frames of the PSNR inside the rasterized ``mask`` (images in [0, 1]): the report's face PSNR
    (``masked_psnr``), so the benchmark's numbers read the same as the report's."""
    return float(masked_psnr(pred, gt, mask).nanmean())


@torch.no_grad()
def clean_estimate(model: DiffusionAvatarsModel, batch: dict, timestep: int, seed: int = 0) -> torch.Tensor:
    """(T, 3, H, W) in [0, 1]: the network's estimate of the clean image from the ground truth's latent noised to
    ``timestep`` (fixed noise; at the last timestep the input is pure noise, so it shows what the conditioning
    alone gives): x0 = sqrt(a) x_t - sqrt(1 - a) v."""
    latents = model.vae.encode(batch["image"]).latent_dist.mean * model.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    steps = torch.full((latents.shape[0],), timestep, dtype=torch.long)
    noisy = model.noise_scheduler.add_noise(latents, noise, steps)
    v = model.denoise(noisy, steps, model.conditioning(batch), model.encode_expression(batch.get("expression")))
    alpha = model.noise_scheduler.alphas_cumprod[timestep]
    return model.decode_latents(alpha.sqrt() * noisy - (1 - alpha).sqrt() * v.float())


def evaluate(evaluator, frames: TaskFrames, pred: torch.Tensor) -> dict[str, float]:
    """Metric means of one task, computed per clip (one video each) like the nightly evaluation."""
    images = pred.permute(0, 2, 3, 1).numpy()
    evals, start = [], 0
    for clip in frames.clips:
        face = np.stack([c["mask"][0] for c in clip.conditioning])
        evals.append(evaluator.evaluate_video(clip.reference, images[start:start + clip.frames], clip.alpha, face))
        start += clip.frames
    merged = merge_evaluations(evals)
    return {name: m["mean"] for name, m in merged["metrics"].items()}


def mean_metrics(per_task: list[dict[str, float]]) -> dict[str, float]:
    """Mean over tasks of every metric all of them have (None-safe)."""
    names = [n for n in per_task[0] if all(n in t for t in per_task)]
    out = {}
    for n in names:
        values = [t[n] for t in per_task if t[n] is not None]
        out[n] = float(np.mean(values)) if values else float("nan")
    return out


def picks(count: int, columns: int) -> np.ndarray:
    return np.linspace(0, count - 1, num=min(columns, count)).round().astype(int)


def save_rows(path: Path, rows: list[tuple[str, torch.Tensor]], columns: int = 8, scale: int = 2,
              gap: int = 4) -> None:
    """One labelled row of `columns` frames (spread evenly) per (label, (T, 3, H, W) images); the
    labels go to a text file beside the PNG (PIL has no reliable font here)."""
    from PIL import Image

    blocks = []
    for _, images in rows:
        idx = picks(len(images), columns)
        blocks.append(torch.cat([images[i].clamp(0, 1) for i in idx], 2))
        blocks.append(torch.ones(3, gap, blocks[-1].shape[2]))
    grid = torch.cat(blocks[:-1], 1)
    img = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    path.with_suffix(".txt").write_text("rows, top to bottom:\n" + "\n".join(label for label, _ in rows) + "\n")
    print(f"wrote {path}")


class ExpressionNormLog(TrainerCallback):
    """``<run>/expression_norms.jsonl``: every ``every`` steps, the Frobenius norms of the expression
    attention layers' output projections (zero at step 0) and of the expression token map. A growing
    norm shows the layers get gradients, not that they learn the expression: AdamW's steps are ~lr
    per weight even on noise (bench_expression_probe.py measures the renders' response)."""

    def __init__(self, every: int = 50):
        self.every = every

    def _write(self, trainer, step: int) -> None:
        layers = trainer.model.expression_layers
        if layers is None:
            return
        norms = [float(p.weight.detach().float().norm()) for p in layers.output_projections()]
        record = {"step": step, "to_out_norms": norms, "to_out_norm_mean": float(np.mean(norms)),
                  "token_map_norm": float(trainer.model.expression_tokens.proj.weight.detach().float().norm())}
        with (trainer.run_dir / "expression_norms.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer) -> None:
        (trainer.run_dir / "expression_norms.jsonl").unlink(missing_ok=True)
        self._write(trainer, trainer.state.step)

    def on_step_end(self, trainer, step: int) -> None:
        if step % self.every == 0:
            self._write(trainer, step)


def read_expression_norms(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "expression_norms.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
