"""Pretrain the tiny base model (VAE + unconditional UNet) on the shards' training images.

    python jobs/pretrain_base.py [--shard-root data/shards] [--output data/base/tiny] [--force]

The output is a local diffusers directory usable as ``--base-model data/base/tiny`` with the
``tiny`` preset (the miniature of loading a pretrained Stable Diffusion 2.1). Re-running with the
same settings and data keeps the existing output; ``--force`` retrains.
"""

from __future__ import annotations

import json

import tyro

from avatars.training.base_pretraining import BasePretrainConfig, pretrain_base


def main(argv: list[str] | None = None) -> dict:
    config = tyro.cli(BasePretrainConfig, args=argv, description=__doc__)
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
    main()
