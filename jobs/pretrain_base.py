"""Pretrain the tiny base model (VAE + unconditional UNet) on the shards' training images.

    python jobs/pretrain_base.py [--shard-root data/shards] [--output data/base/tiny] [--force]

The output is a local diffusers directory usable as ``--base-model data/base/tiny`` with the
``tiny`` preset (the miniature of loading a pretrained Stable Diffusion 2.1). Re-running with the
same settings and data keeps the existing output; ``--force`` retrains. Exit code 2 with one line
on invalid input (no shards, a person without shards, an unreadable earlier output, a NaN, infinite or
negative learning rate or weight). Exit code 1 with one line when a stage diverges (NaN or infinite
weights or final loss): nothing is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tyro

from avatars.training.base_pretraining import STEP_COUNTS, BasePretrainConfig, pretrain_base, read_info, resolve_persons
from avatars.training.config import TrainingDiverged
from common.io import DataError
from jobs._presets import UsageError
from shards.writer import shard_paths


def check_inputs(config: BasePretrainConfig) -> list[str]:
    """The persons the base is made of, checked before anything trains: the shard root, each person's complete
    manifest, the 'train' images it trains on and the 'test_seq' images its VAE is scored on, and an earlier
    output it would compare itself with. A DataError naming the file, or a UsageError naming the option."""
    for name in STEP_COUNTS:
        if getattr(config, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    root = Path(config.shard_root)
    if not root.is_dir():
        raise DataError(root, "shard root does not exist (--shard-root); run jobs/preprocess.py first")
    try:
        persons = resolve_persons(root, config.persons)
    except (FileNotFoundError, ValueError) as e:  # none found, an empty list, a person without shards
        option = "--shard-root" if config.persons.strip() == "all" else f"--persons {config.persons!r}"
        raise UsageError(f"{option}: {e}") from None
    for split, why in (("train", "every camera of the persons is the held-out camera (--ingest.held-out-camera)"),
                       ("test_seq", "they were ingested without held-out sequences (--ingest.held-out-sequences)")):
        if not any(shard_paths(root, p, split) for p in persons):  # a missing or incomplete manifest: DataError
            raise DataError(root, f"no {split!r} shards for persons {', '.join(persons)}: {why}; re-run "
                                  "jobs/ingest.py and jobs/preprocess.py")
    if not config.force:
        try:
            read_info(config.output)
        except ValueError as e:  # its message names the file and says what to do (--force)
            raise UsageError(f"--output: {e}") from None
    return persons


def main(argv: list[str] | None = None) -> dict:
    config = tyro.cli(BasePretrainConfig, args=argv, description=__doc__)
    check_inputs(config)
    info = pretrain_base(config)
    summary = {
        "output": str(config.output),
        "skipped": info["skipped"],
        "vae_heldout_psnr_db": info["vae"]["heldout_psnr_db"],
        "vae_final_recon_loss": info["vae"]["final_recon_loss"],
        "unet_final_v_loss": info["unet"]["final_v_loss"],
        "seconds": info["seconds"]["total"],
    }
    print(json.dumps(summary, indent=2))
    return info


if __name__ == "__main__":
    try:
        main()
    except (DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:  # a failed run (nothing of it written), said in one line with what to try
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
