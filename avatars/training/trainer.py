"""Per-person training with DeepSpeed: the loop, logging, validation, checkpoints, resume.

Run layout (`<out>/<person>/`)::

    checkpoints/step_<N>/   resumable checkpoints (see avatars.training.checkpoint)
    val/step_<N>.png        validation grids (ground truth / render / mask)
    metrics.jsonl           one JSON line per logged step / validation
    model/                  the final avatar (DiffusionAvatarsModel.save_pretrained)
    result.json             final numbers

Determinism: data order and augmentation are functions of (seed, epoch, index), the
diffusion noise comes from one generator whose state is checkpointed, so a run
killed at any step and resumed from its last checkpoint repeats the uninterrupted
run's losses and weights exactly (same hardware and thread count).

Speed (`avatars.training.performance`, `avatars.training.optim`): DeepSpeed runs as an fp32
engine around a fused AdamW on the trainable fp32 masters; in bf16 the frozen base is stored
in bf16 and the loss runs under autocast. The loop never waits for the device except to log
(losses stay device tensors until then), clipping is sync-free, and the loader copies the next
batch to the device while the current step runs.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch
from tqdm import tqdm

from avatars.data import LoaderConfig, ResumableSampler, ShardDataset, make_loader
from avatars.models import DiffusionAvatarsModel
from shards.contract import atomic_write_json
from shards.writer import shard_paths

from . import checkpoint as ckpt
from . import performance as perf
from .config import TrainConfig
from .engine import build_engine
from .validation import Validator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun / Ray / SLURM set up, or make a single-process one."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        # Each concurrent job needs its own port (several persons train on one node).
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _memory_bytes() -> dict[str, float]:
    import psutil

    mem = {"cpu_rss": float(psutil.Process().memory_info().rss)}
    if torch.cuda.is_available():
        mem["gpu_allocated"] = float(torch.cuda.memory_allocated())
        mem["gpu_peak"] = float(torch.cuda.max_memory_allocated())
    return mem


def _truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop lines logged after `after_step` (by a run that died before its next checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= after_step]
    path.write_text("".join(line + "\n" for line in keep))


def _to_device(batch: dict, device: torch.device) -> dict:
    """The loader already delivers on the training device; this only catches a CPU batch."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_person(config: TrainConfig) -> dict:
    """Train one person's avatar; returns the final numbers (also written to result.json)."""
    from cluster.status import report_progress

    cfg = config.resolved()
    rank, world = init_distributed()
    run = cfg.run_dir
    ckpt_dir, jsonl = run / "checkpoints", run / "metrics.jsonl"
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        if cfg.resume == "never":
            import shutil

            shutil.rmtree(ckpt_dir, ignore_errors=True)
            jsonl.unlink(missing_ok=True)
    if world > 1:
        torch.distributed.barrier()  # rank 0 has cleaned up before anyone reads checkpoints

    train_paths = shard_paths(cfg.shards, cfg.person, "train")
    loader_cfg = LoaderConfig(resolution=0, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed)
    # The model config needs the expression dim (read off a sample), the loader the model's
    # resolution (only used when samples are cropped, so it can be set after indexing).
    dataset = ShardDataset(train_paths, loader_cfg)
    model_config = cfg.model_config(int(dataset.decoded(0).expression.shape[0]))
    loader_cfg.resolution = model_config.resolution

    model = DiffusionAvatarsModel(model_config, base_model=cfg.base_model)
    trainer = build_engine(cfg, model, world)
    engine, device, precision = trainer.engine, trainer.device, trainer.precision
    noise = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + rank)

    state = ckpt.TrainerState()
    if cfg.resume == "auto":
        restored = ckpt.load_latest(engine, ckpt_dir, noise)
        if restored is not None:
            state = restored
    if rank == 0:
        _truncate_jsonl(jsonl, state.step)

    sampler = ResumableSampler(len(dataset), seed=cfg.seed, rank=rank, num_replicas=world)
    loader = make_loader(dataset, sampler, loader_cfg, device=device)  # dequantised on the training device
    if len(sampler.indices()) < cfg.batch_size:
        raise ValueError(f"{len(dataset)} training samples cannot fill one batch of {cfg.batch_size} per rank")

    validator = None
    metrics = None
    if rank == 0:
        validator = Validator(cfg.shards, cfg.person, model_config.resolution, cfg.val_samples, cfg.lpips_weights,
                              cfg.val_inference_steps)

    def batches():
        while True:
            sampler.set_epoch(state.epoch, start=state.position)
            for batch in loader:
                state.position += cfg.batch_size
                yield batch
            state.epoch, state.position = state.epoch + 1, 0

    def log(record: dict) -> None:
        if rank == 0:
            with jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")

    if rank == 0 and cfg.metrics_port is not None:
        from prometheus_client import CollectorRegistry

        from cluster.monitoring import TrainingMetrics, start_exporter_in_range

        # A registry per run: a Ray worker process may train several persons one after another.
        registry = CollectorRegistry()
        metrics = TrainingMetrics(registry)
        log({"step": state.step, "metrics_port": start_exporter_in_range(cfg.metrics_port, registry).port})

    def validate(step: int) -> dict:
        if validator is None:
            return {}
        watch = perf.Stopwatch(device)
        with precision.autocast(), perf.eager():  # validation shapes differ: never compile for them
            out = validator.run(model, run / "val" / f"{ckpt.tag(step)}.png")
        if out:
            log({"step": step, **out, "val_s": watch.read()})
        return out

    start_time, start_step = time.time(), state.step
    window_t, window_samples, window_losses = time.time(), 0, []
    data = batches()
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"train {cfg.person}", unit="step", disable=rank != 0)
    engine.train()
    last_val: dict = {}
    first = perf.Stopwatch(device) if state.step < cfg.steps else None
    while state.step < cfg.steps:
        for _ in range(cfg.grad_accum):
            loss = trainer.micro_step(_to_device(next(data), device), noise)
            window_losses.append(loss)  # read at logging time: no host sync per step
            window_samples += cfg.batch_size * world
        state.step += 1
        bar.update()
        report_progress(state.step, cfg.steps)
        if first is not None:
            # Start-up cost of this process's first step (compilation, cuDNN autotuning, allocator warm-up).
            log({"step": state.step, "first_step_s": first.read(), "compiled": cfg.compile})
            first = None
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            losses = [float(l) for l in window_losses]
            dt = max(time.time() - window_t, 1e-9)
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
            rec = {"step": state.step, "loss": sum(losses) / len(losses),
                   "samples_per_s": window_samples / dt, "lr": lrs, "epoch": state.epoch}
            log(rec)
            if metrics is not None:
                metrics.observe_step(cfg.person, state.step, rec["loss"], rec["samples_per_s"], learning_rates=lrs,
                                     memory_bytes=_memory_bytes())
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            window_t, window_samples, window_losses = time.time(), 0, []
        if cfg.validate_every and state.step % cfg.validate_every == 0 and state.step < cfg.steps:
            last_val = validate(state.step)
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            state.elapsed_s += time.time() - start_time
            start_time = time.time()
            ckpt.save(engine, ckpt_dir, state, noise, cfg.keep_last)
    bar.close()
    last_val = validate(state.step) or last_val
    result = {"person": cfg.person, "steps": state.step, "resumed_from": start_step,
              "train_seconds": state.elapsed_s, **last_val}
    if rank == 0:
        model.save_pretrained(run / "model")
        atomic_write_json(run / "result.json", result)
    return result
