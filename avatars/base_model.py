"""Loading the pretrained base model (a local diffusers directory, e.g. Stable Diffusion 2.1)
and the stored empty-prompt embedding.

The text encoder is only needed once: :func:`compute_empty_prompt_embedding` encodes "" to a
(1, 77, cross_attention_dim) tensor, which the model stores with its checkpoint.

CLI: ``python -m avatars.base_model --base-model PATH [--out FILE]`` writes the embedding to
``FILE`` (default ``PATH/empty_prompt_embedding.safetensors``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from common.io import DataError, read_safetensors

EMPTY_PROMPT_FILE = "empty_prompt_embedding.safetensors"
EMPTY_PROMPT_KEY = "empty_prompt_embedding"


def check_base_model_dir(path: str | os.PathLike, need: tuple[str, ...] = ("unet", "vae")) -> Path:
    """Checks that ``path`` is a local diffusers directory holding the subfolders ``need``."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"base model directory {root} does not exist; pass --base-model PATH pointing to a local "
            "diffusers directory (e.g. Stable Diffusion 2.1 saved with save_pretrained)"
        )
    for sub in need:
        if not (root / sub / "config.json").is_file():
            raise FileNotFoundError(f"base model directory {root} lacks {sub}/config.json (not a diffusers layout?)")
    return root


SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def check_prediction_type(root: Path) -> None:
    """The avatars read the frozen UNet's output as a v-prediction (Stable Diffusion 2.1, the 768-v model):
    a base whose ``scheduler/scheduler_config.json`` says it predicts something else (SD 2.1-base and SD 1.x
    predict the noise, ``epsilon``) would train and render without an error on a misread prior, so it is refused
    naming the file and the field. A directory without that file (the project's tiny bases) is not checked."""
    import json

    file = root / SCHEDULER_CONFIG
    if not file.is_file():
        return
    try:
        kind = json.loads(file.read_text()).get("prediction_type", "epsilon")  # diffusers' default
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(file, f"unreadable scheduler config ({e})") from None
    if kind != "v_prediction":
        raise DataError(file, f"prediction_type is {kind!r}: the avatars read the base's UNet output as "
                              "'v_prediction' (Stable Diffusion 2.1, the 768-v model); a base that predicts "
                              "the noise (e.g. SD 2.1-base) is not supported")


def load_unet_and_vae(path: str | os.PathLike):
    """Loads the UNet and the VAE (float32) from a local diffusers directory (its prediction type checked)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = check_base_model_dir(path)
    check_prediction_type(root)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True)
    return unet, vae


@torch.no_grad()
def compute_empty_prompt_embedding(path: str | os.PathLike) -> torch.Tensor:
    """Encodes the empty prompt with the base model's tokenizer + text encoder -> (1, L, D)."""
    from transformers import AutoTokenizer, CLIPTextModel

    root = check_base_model_dir(path, need=("text_encoder",))
    if not (root / "tokenizer").is_dir():
        raise FileNotFoundError(f"base model directory {root} lacks tokenizer/")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True).eval()
    ids = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return encoder(ids)[0].float().contiguous()


def save_tensor_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Writes a safetensors file to a temporary name in the same folder, then renames it."""
    from safetensors.torch import save

    from common.io import atomic_write_bytes

    atomic_write_bytes(Path(path), save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def load_empty_prompt_embedding(file: str | os.PathLike, width: int | None = None) -> torch.Tensor:
    """The embedding stored in ``file``; with ``width`` (the UNet's cross_attention_dim) one of another
    width is refused naming the file (the model would only say that its embedding has the wrong shape)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"empty-prompt embedding {file} not found")
    data = read_safetensors(file)
    if EMPTY_PROMPT_KEY not in data:
        raise KeyError(f"{file} has no tensor {EMPTY_PROMPT_KEY!r}")
    embedding = data[EMPTY_PROMPT_KEY]
    if width is not None and (embedding.dim() != 3 or embedding.shape[-1] != width):
        raise DataError(file, f"tensor {EMPTY_PROMPT_KEY!r} has shape {tuple(embedding.shape)}, the UNet needs "
                              f"(1, L, {width}) (its cross_attention_dim): an embedding of another base?")
    return embedding


def empty_prompt_embedding_for(path: str | os.PathLike, width: int | None = None) -> torch.Tensor:
    """The cached embedding ``PATH/empty_prompt_embedding.safetensors`` if present (checked against
    ``width``, see :func:`load_empty_prompt_embedding`), else computed with the text encoder (not
    written into the base model directory)."""
    cached = Path(path) / EMPTY_PROMPT_FILE
    if cached.is_file():
        return load_empty_prompt_embedding(cached, width)
    return compute_empty_prompt_embedding(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", required=True, help="local diffusers directory (SD 2.1)")
    parser.add_argument("--out", help=f"output file (default BASE/{EMPTY_PROMPT_FILE})")
    args = parser.parse_args(argv)
    embedding = compute_empty_prompt_embedding(args.base_model)
    out = Path(args.out) if args.out else Path(args.base_model) / EMPTY_PROMPT_FILE
    save_tensor_atomic({EMPTY_PROMPT_KEY: embedding}, out)
    print(f"wrote {out} {tuple(embedding.shape)}")


if __name__ == "__main__":
    main()
