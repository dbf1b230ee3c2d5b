"""Per-person training with DeepSpeed: the loop, validation, checkpoints, resume.

Run layout (`<out>/<person>/`)::

    checkpoints/step_<N>/   resumable checkpoints (see avatars.training.checkpoint)
    val/step_<N>.png        validation grids (ground truth / render / mask)
    metrics.jsonl           one JSON line per logged step / validation (the MetricsLog callback)
    model/                  the final avatar (DiffusionAvatarsModel.save_pretrained)
    result.json             final numbers
    base.json               the frozen base it is trained on (path and content fingerprint)

Everything that watches a run (metrics.jsonl, the progress bar, the cluster's status file and
Prometheus exporter) is a callback (:mod:`avatars.training.callbacks`); the trainer knows none of
them.

Determinism: data order and augmentation are functions of (seed, epoch, index), the
diffusion noise comes from one generator whose state is checkpointed, so a run
killed at any step and resumed from its last checkpoint repeats the uninterrupted
run's losses and weights exactly (same hardware and thread count).

Speed (`avatars.training.performance`, `avatars.training.optim`): DeepSpeed runs as an fp32
engine around a fused AdamW on the trainable fp32 masters; in bf16 the frozen base is stored
in bf16 and the loss runs under autocast. The loop never waits for the device except to log
(losses stay device tensors until then), clipping is sync-free, and the loader copies the next
batch to the device while the current step runs.

Divergence: a NaN or infinite loss (a too high learning rate, a NaN in a sample) is detected where the
loop reads the losses anyway (logging, checkpoints), and NaN weights before anything is saved; the run
stops with :class:`~avatars.training.config.TrainingDiverged` instead of checkpointing, resuming and
publishing them (one NaN batch would otherwise poison every later step, the weight average included).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from avatars.data import LoaderConfig, ResumableSampler, ShardDataset, make_loader
from avatars.models import DiffusionAvatarsModel
from avatars.pipelines.compile_cache import save_compiled
from common.io import DataError, atomic_write_bytes
from shards.integrity import MANIFEST
from shards.writer import shard_paths, split_digest

from . import checkpoint as ckpt
from . import performance as perf
from .base_record import BaseMismatch, base_fingerprint
from .base_record import mismatch as base_mismatch
from .base_record import write_record as write_base_record
from .callbacks import TrainerCallback, default_callbacks
from .config import TRAIN_DATA, ResumeMismatch, TrainConfig, TrainingDiverged, resume_conflicts, state_options
from .engine import build_engine
from .finite import first_names, non_finite
from .latent_cache import latent_cache_for
from .rendezvous import init_distributed
from .validation import Validator
from .weight_average import WeightAverage


def _to_device(batch: dict, device: torch.device) -> dict:
    """The loader already delivers on the training device; this only catches a CPU batch."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Trainer:
    """Trains one person's avatar: set-up, the DeepSpeed loop, validation, checkpoints, resume.

    Hook points: every :class:`~avatars.training.callbacks.TrainerCallback` in ``callbacks`` is
    called in list order, on rank 0 only:

    * ``on_train_start(trainer)``: after set-up and resume, before the first step;
      ``trainer.state.step`` is the step resumed from (``trainer.start_step``, 0 for a fresh run).
    * ``on_step_end(trainer, step)``: after every optimizer step.
    * ``on_log(trainer, record)``: for every record of the run, all sent through :meth:`log`:
      the first step's start-up cost (``step``, ``first_step_s``, ``compiled``), a training
      window every ``log_every`` steps and at the last step (``step``, ``loss`` = mean over the
      window, ``samples_per_s``, ``lr`` per parameter group, ``epoch``; a checkpoint saves the open window,
      so a resumed run logs the same means), each validation
      (``step``, ``val_psnr``, ``val_lpips``, ..., ``val_s``), with ``--latent-cache-mib`` in use one record after
      the last step (``step``, ``latent_cache``: samples kept, mib, encoded, reused), and whatever callbacks log
      themselves.
    * ``on_validation(trainer, step, metrics)``: after each validation render.
    * ``on_checkpoint(trainer, step, path)``: after a complete checkpoint.
    * ``on_train_end(trainer, result)``: after ``model/`` and ``result.json`` are written.
    * ``on_train_error(trainer, error)``: when the run raised instead (in set-up, a step, a hook), before
      the error leaves :meth:`train`; for releasing what the callback holds (a port, a bar).

    Callbacks may read ``trainer.config`` (the :class:`TrainConfig`), ``run_dir``,
    ``rank``, ``world_size``, ``state`` (:class:`~avatars.training.checkpoint.TrainerState`),
    ``model``, ``engine`` (the :class:`~avatars.training.engine.TrainingEngine`) and ``device``;
    they must not change the training state.
    """

    def __init__(self, config: TrainConfig, callbacks: Sequence[TrainerCallback] = ()):
        self.config = config
        self.callbacks = list(callbacks)
        self.state = ckpt.TrainerState()
        self.average: WeightAverage | None = None  # --ema-decay, built in setup()
        self.train_data: str | None = None  # the digest of the training shards, read in setup()
        self.world_size = 1  # the processes training it, known in setup()
        self.start_step = 0

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _emit(self, hook: str, *args) -> None:
        if self.rank == 0:
            for callback in self.callbacks:
                getattr(callback, hook)(self, *args)

    def log(self, record: dict) -> None:
        """Hands ``record`` to every callback's ``on_log`` (rank 0), counted in the checkpointed state."""
        if self.state.records is not None:
            self.state.records += 1
        self._emit("on_log", record)

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Process group, data, model, DeepSpeed engine; restores the newest checkpoint."""
        cfg = self.config
        # Checkpoints trained on another base, or with other values of the options that define the
        # state, must not continue (see base_record): refused before the process group is joined,
        # reported by rank 0 only (the rank its launcher gave; init_distributed reads the same).
        self.rank = int(os.environ.get("RANK", "0"))
        self.base_fingerprint = base_fingerprint(cfg.base_model)
        if cfg.resume == "auto" and (problem := base_mismatch(self.run_dir, self.base_fingerprint)):
            raise BaseMismatch(f"{problem}: its checkpoints do not fit this base. Retrain it on this base with "
                               "--resume never, or train with the base it was trained on")
        self.train_data = split_digest(cfg.shards, cfg.person, "train")  # the data it trains on, recorded
        if cfg.resume == "auto":
            self._check_resumable()
        self.rank, self.world_size = init_distributed()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.resume == "never":
                ckpt.clear_run(self.run_dir)
        if self.world_size > 1:
            torch.distributed.barrier()  # rank 0 has cleaned up before anyone reads checkpoints

        train_paths = shard_paths(cfg.shards, cfg.person, "train")
        if not train_paths:
            raise DataError(Path(cfg.shards) / cfg.person / MANIFEST, f"lists no 'train' shards of person {cfg.person}")
        self.loader_config = LoaderConfig(resolution=0, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                          seed=cfg.seed, min_crop=cfg.min_crop)
        # The model config needs the expression dim (read off a sample), the loader the model's
        # resolution (only used when samples are cropped, so it can be set after indexing).
        self.dataset = ShardDataset(train_paths, self.loader_config)
        model_config = cfg.model_config(int(self.dataset.decoded(0).expression.shape[0]))
        self.loader_config.resolution = model_config.resolution

        self.model = DiffusionAvatarsModel(model_config, base_model=cfg.base_model)
        self.model.base_fingerprint = self.base_fingerprint
        self.engine = build_engine(cfg, self.model, self.world_size)
        self.device = self.engine.device
        self.noise = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + self.rank)
        self.latent_cache = latent_cache_for(cfg.latent_cache_mib, cfg.min_crop)

        restored = None
        if cfg.resume == "auto":
            restored = ckpt.load_latest(self.engine.engine, self.checkpoint_dir, self.noise)
        if restored is not None:
            self.state = restored
        # Built after the restore: from a checkpoint without an average it starts from the restored weights.
        self.average = WeightAverage(self.model.trainable_state_dict(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        if restored is not None and self.average is not None:
            self._restore_average(restored.step)
        self.start_step = self.state.step

        self.sampler = ResumableSampler(len(self.dataset), seed=cfg.seed, rank=self.rank,
                                        num_replicas=self.world_size)
        # dequantised on the training device
        self.loader = make_loader(self.dataset, self.sampler, self.loader_config, device=self.device)
        if len(self.sampler.indices()) < cfg.batch_size:
            raise ValueError(f"{len(self.dataset)} training samples cannot fill one batch of {cfg.batch_size} per rank")
        self.validator = None
        if self.rank == 0:
            self.validator = Validator(cfg.shards, cfg.person, model_config.resolution, cfg.val_samples,
                                       cfg.lpips_weights, cfg.val_inference_steps)
            # only now, before the first checkpoint: a run that failed in set-up trained nothing on this base
            write_base_record(self.run_dir, cfg.base_model, self.base_fingerprint)

    # ---- the loop -------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        """Training batches forever, resuming at the checkpointed epoch and position."""
        state, cfg = self.state, self.config
        while True:
            self.sampler.set_epoch(state.epoch, start=state.position)
            self.dataset.set_epoch(state.epoch)  # crops are drawn from (seed, epoch, index): new ones each epoch
            for batch in self.loader:
                state.position += cfg.batch_size
                yield batch
            state.epoch, state.position = state.epoch + 1, 0

    def validate(self, step: int) -> dict:
        """Renders the fixed held-out samples (rank 0); returns their metrics ({} elsewhere)."""
        if self.validator is None:
            return {}
        watch = perf.Stopwatch(self.device)
        with self.engine.precision.autocast(), perf.eager(), self.averaged():  # eager: validation shapes differ
            out = self.validator.run(self.model, self.run_dir / "val" / f"{ckpt.tag(step)}.png")
        if out:
            self.log({"step": step, **out, "val_s": watch.read()})
            self._emit("on_validation", step, out)
        return out

    def _check_resumable(self) -> None:
        """The newest checkpoint continues only with the options that made its state (config.RESUMABLE_FIELDS)."""
        saved = ckpt.saved_options(self.checkpoint_dir)
        if problem := ckpt.past_steps(self.checkpoint_dir, self.config.steps):
            raise ResumeMismatch(problem)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))  # what init_distributed joins, read before it does
        now = state_options(self.config, self.train_data, world_size)
        if saved is not None and (conflicts := resume_conflicts(saved[1], now)):
            raise ResumeMismatch(f"{saved[0]}: the checkpoints of {self.run_dir} were trained with other values of "
                                 f"options that define the training state ({'; '.join(conflicts)}). Resume with the "
                                 "checkpoint's values (and as many processes), or start over with --resume never")

    def _restore_average(self, step: int) -> None:
        folder = self.checkpoint_dir / ckpt.tag(step)
        saved = ckpt.load_average(self.checkpoint_dir, step)
        if saved is None:
            # A checkpoint written without --ema-decay (or before it existed): go on rather than fail the
            # person, but say that the average is not the one an uninterrupted run would have.
            warnings.warn(f"{folder} holds no weight average (written without --ema-decay): the average of "
                          f"--ema-decay {self.config.ema_decay} starts from the weights of step {step}", stacklevel=2)
            return
        self.average.load_state_dict(saved, source=str(folder))

    def averaged(self) -> contextlib.AbstractContextManager:
        """The model holds the weight average (``--ema-decay``) inside the block; the trained weights otherwise."""
        return self.average.swapped() if self.average is not None else contextlib.nullcontext()

    # ---- divergence -------------------------------------------------------------------------
    def _any_process(self, flag: bool) -> bool:
        """``flag`` of any training process: each reads its own losses, and one that stopped alone would leave the
        others waiting in the next collective (one all-reduce, at logging and checkpoint cadence only)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def _remedy(self) -> str:
        cfg = self.config
        done = ckpt.complete_checkpoints(self.checkpoint_dir)
        kept = f"its newest checkpoint, {done[-1]}, is from before" if done else "it has no checkpoint"
        return (f"Nothing of it is saved ({kept}; resuming would repeat the same steps). Retrain it with --resume "
                f"never and a lower --lr-networks (now {cfg.lr_networks}) and/or --lr-features (now {cfg.lr_features}) "
                "(--train.lr-networks / --train.lr-features in launch_all), with --grad-clip on, or check the "
                f"person's training data ({cfg.shards}/{cfg.person}) for NaN or infinite values")

    def _check_losses(self, losses: list[float]) -> None:
        """Raises :class:`TrainingDiverged` when a loss of the window just read (its micro-steps', the last one this
        step's) is NaN or infinite. Called where the loop reads the losses anyway: no host sync of its own."""
        bad = next((i for i, value in enumerate(losses) if not math.isfinite(value)), None)
        if not self._any_process(bad is not None):
            return
        where = f"person {self.config.person} ({self.run_dir})"
        if bad is None:
            raise TrainingDiverged(f"{where}: training diverged by step {self.state.step}: the loss of another "
                                   f"training process is NaN or infinite. {self._remedy()}")
        step = self.state.step - (len(losses) - 1 - bad) // self.config.grad_accum
        raise TrainingDiverged(f"{where}: training diverged at step {step}: its loss is {losses[bad]}. "
                               f"{self._remedy()}")

    def _check_weights(self, what: str) -> None:
        """Raises :class:`TrainingDiverged` when a trainable weight, or the weight average, holds a NaN or infinite
        value, before the ``what`` (checkpoint, model) is written. One host sync (saving syncs anyway)."""
        tensors = dict(self.model.trainable_state_dict())
        if self.average is not None:
            tensors.update({f"{name} (weight average)": t for name, t in self.average.state_dict().items()})
        bad = non_finite(tensors)
        if not self._any_process(bool(bad)):
            return
        named = first_names(bad)
        raise TrainingDiverged(f"person {self.config.person} ({self.run_dir}): training diverged by step "
                               f"{self.state.step}: NaN or infinite weights ({named or 'in another process'}); "
                               f"the {what} is not written. {self._remedy()}")

    def save_checkpoint(self) -> Path:
        average = self.average.state_dict() if self.average is not None else None
        path = ckpt.save(self.engine.engine, self.checkpoint_dir, self.state, self.noise, self.config.keep_last,
                         average=average, options=state_options(self.config, self.train_data, self.world_size))
        self._emit("on_checkpoint", self.state.step, path)
        return path

    def train(self) -> dict:
        """Sets up, trains to ``config.steps``; returns the final numbers (also in result.json).
        When it raises, every callback's ``on_train_error`` runs first (what a callback opened is
        closed: a Ray worker goes on to the next attempt or person)."""
        try:
            return self._train()
        except BaseException as error:
            self._emit_error(error)
            raise

    def _emit_error(self, error: BaseException) -> None:
        """``on_train_error`` of every callback, even when one of them fails at it: the run's own
        error is the one raised. Set-up may have failed before the rank was known: rank 0 then."""
        if getattr(self, "rank", 0) != 0:
            return
        for callback in self.callbacks:
            try:
                callback.on_train_error(self, error)
            except Exception as e:
                warnings.warn(f"{type(callback).__name__}.on_train_error failed: {e}", stacklevel=2)

    def _train(self) -> dict:
        self.setup()
        cfg, state, engine = self.config, self.state, self.engine
        self._emit("on_train_start")
        start_time = time.time()
        # The logging window: a resumed run continues the one its checkpoint saved.
        window_t, window_samples, window_losses = time.time(), state.window_samples, list(state.window_losses)
        window_before = state.window_s  # training seconds of this window in the process that saved it
        data = self.batches()
        engine.engine.train()
        last_val: dict = {}
        first = perf.Stopwatch(self.device) if state.step < cfg.steps else None
        while state.step < cfg.steps:
            for _ in range(cfg.grad_accum):
                batch = _to_device(next(data), self.device)
                if self.latent_cache is not None:
                    batch = self.latent_cache.add_posteriors(self.model, batch)
                loss = engine.micro_step(batch, self.noise)
                window_losses.append(loss)  # read at logging time: no host sync per step
                window_samples += cfg.batch_size * self.world_size
            state.step += 1
            if self.average is not None:
                self.average.update(state.step)
            self._emit("on_step_end", state.step)
            if first is not None:
                # Start-up cost of this process's first step (compilation, cuDNN autotuning, allocator warm-up).
                self.log({"step": state.step, "first_step_s": first.read(), "compiled": cfg.compile})
                first = None
                if cfg.compile and cfg.compile_cache is not None and self.rank == 0:
                    save_compiled(cfg.compile_cache, self.device)  # what the first step compiled, for later jobs
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                losses = [float(v) for v in window_losses]
                self._check_losses(losses)
                dt = max(window_before + time.time() - window_t, 1e-9)
                lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.engine.optimizer.param_groups)}
                self.log({"step": state.step, "loss": sum(losses) / len(losses),
                          "samples_per_s": window_samples / dt, "lr": lrs, "epoch": state.epoch})
                window_t, window_samples, window_losses, window_before = time.time(), 0, [], 0.0
            if cfg.validate_every and state.step % cfg.validate_every == 0 and state.step < cfg.steps:
                last_val = self.validate(state.step)
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                state.elapsed_s += time.time() - start_time
                start_time = time.time()
                # one host sync per checkpoint (which syncs anyway): the window's losses as numbers
                state.window_losses = window_losses = [float(v) for v in window_losses]
                self._check_losses(window_losses)
                self._check_weights("checkpoint")  # before anything of it is written
                state.window_samples, state.window_s = window_samples, window_before + time.time() - window_t
                self.save_checkpoint()
        if self.latent_cache is not None:
            self.log({"step": state.step, "latent_cache": self.latent_cache.summary()})
        last_val = self.validate(state.step) or last_val
        result = {"person": cfg.person, "steps": state.step, "resumed_from": self.start_step,
                  "base_fingerprint": self.base_fingerprint, TRAIN_DATA: self.train_data,
                  "train_seconds": state.elapsed_s, **_finite_values(last_val)}
        self._check_weights("model")  # a run resumed at its last step has not checked them in this process
        if self.rank == 0:
            with self.averaged():
                self.model.save_pretrained(self.run_dir / "model")
            # strict JSON: a bare NaN in it parsed (json.loads) as a finished run's number
            text = json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n"
            atomic_write_bytes(self.run_dir / "result.json", text.encode())
        self._emit("on_train_end", result)
        return result


def _finite_values(metrics: dict) -> dict:
    """``metrics`` with a NaN or infinite number as None (JSON's null), with a warning: a metric the validation
    could not define (face masks empty in every sample: a NaN face PSNR; a render equal to its target: +inf)
    from weights checked finite."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            warnings.warn(f"validation: {key} is {value}; recorded as null", stacklevel=2)
            value = None
        out[key] = value
    return out


def train_person(config: TrainConfig, callbacks: Sequence[TrainerCallback] | None = None) -> dict:
    """Train one person's avatar; returns the final numbers (also written to result.json).

    ``callbacks`` default to :func:`~avatars.training.callbacks.default_callbacks`
    (metrics.jsonl and a progress bar)."""
    if callbacks is None:
        callbacks = default_callbacks(config.run_dir)
    return Trainer(config, callbacks).train()
