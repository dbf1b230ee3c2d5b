"""Helpers for the tests that run jobs/launch_all.py end to end (imported by path, like workloads.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH_ALL = REPO / "jobs" / "launch_all.py"

#: The tiny synthetic data set (seconds to build) as launch_all flags; --synthetic.persons is left to the test.
TINY_DATA = ["--synthetic.sequences", "3", "--synthetic.frames", "2", "--synthetic.cameras", "3",
             "--synthetic.image-size", "48", "--synthetic.n-lat", "24", "--synthetic.n-lon", "32",
             "--synthetic.expression-dim", "10", "--synthetic.seed", "3", "--ingest.held-out-sequences", "1",
             "--shards.samples-per-shard", "8", "--workers", "2"]
#: A few training steps, no validation, a 2-step evaluation.
TINY_TRAIN = ["--train.steps", "3", "--train.batch-size", "4", "--train.checkpoint-every", "3",
              "--train.validate-every", "0", "--train.val-samples", "1", "--train.val-inference-steps", "1",
              "--train.num-workers", "0", "--eval-inference-steps", "2"]


def random_tiny_base(out: Path, seed: int = 0) -> Path:
    """A base model directory of the tiny preset with random weights (unet/, vae/, empty-prompt
    embedding): what launch_all's tiny base pretraining writes, without the minutes it takes."""
    import torch

    from avatars.base_model import EMPTY_PROMPT_FILE, EMPTY_PROMPT_KEY, save_tensor_atomic
    from avatars.configs import tiny_config
    from avatars.models.base_networks import build_unet, build_vae
    from avatars.training.base_pretraining import empty_prompt_embedding

    c = tiny_config()
    torch.manual_seed(seed)
    latent = c.vae.latent_channels
    build_unet(c.unet, latent, latent, c.resolution // c.vae.downsample_factor).save_pretrained(out / "unet")
    build_vae(c.vae, c.resolution).save_pretrained(out / "vae")
    save_tensor_atomic({EMPTY_PROMPT_KEY: empty_prompt_embedding(c.unet.cross_attention_dim, seed)},
                       out / EMPTY_PROMPT_FILE)
    return out


def run_launch_all(args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """jobs/launch_all.py in a fresh interpreter; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, str(LAUNCH_ALL), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
