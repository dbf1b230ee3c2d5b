"""How much of a synthetic person's held-out images only the expression code can explain.

    python benchmarks/bench_expression_effect.py [--persons 000,001] [--resolution 64]

For every held-out frame (the held-out sequences, frontal camera) the generator renders the
ground truth twice from the true mesh: with the real code, and with the expression-only dims
(mouth-interior colour, gaze x/y: they change the image but not the mesh or its canonical
coordinates) set to 0. Both are resized to the training resolution as the shard loader does
(bilinear, antialiased). A model that ignores the expression code can at best render the
second, so the PSNR of the second against the first, inside the face, bounds what the
expression conditioning can gain; also reported: the pixels that change by more than 0.05.
Writes benchmarks/results/expression_effect.json and a picture (real | zeroed | difference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, report  # noqa: E402

from avatars.evaluation.metrics import psnr_from_mse  # noqa: E402
from shards.synthetic import FRONTAL_SERIAL, SyntheticConfig  # noqa: E402
from shards.synthetic.generate import APPEARANCE_ONLY, PersonModel, expression_trajectory, stable_seed  # noqa: E402

EXPRESSION_ONLY = APPEARANCE_ONLY


def resize(rgb: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    if t.shape[-1] != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t[0]


def person_effect(config: SyntheticConfig, person: str, held_out: int, size: int):
    model = PersonModel.build(config, person)
    camera = model.cameras[FRONTAL_SERIAL]
    index = config.serials.index(FRONTAL_SERIAL)
    sequences = sorted(config.sequence_names)[-held_out:]
    real, zeroed, masks = [], [], []
    for seq in sequences:
        codes = expression_trajectory(np.random.default_rng(stable_seed(config.seed, person, seq)), seq,
                                      config.frames, config.expression_dim)
        for expr in codes:
            vertices = model.true_vertices(expr)
            flat = expr.copy()
            flat[list(EXPRESSION_ONLY)] = 0
            a, alpha = model.render(vertices, expr, camera, index)
            b, _ = model.render(vertices, flat, camera, index)
            real.append(resize(a, size))
            zeroed.append(resize(b, size))
            masks.append(resize(np.repeat(alpha[..., None], 3, 2), size)[:1] > 0.5)
    return torch.stack(real), torch.stack(zeroed), torch.stack(masks)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--persons", default="000,001")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--held-out-sequences", type=int, default=2)
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    config = SyntheticConfig()
    rows, pictures = [], []
    for person in a.persons.split(","):
        real, zeroed, mask = person_effect(config, person, a.held_out_sequences, a.resolution)
        diff = (real - zeroed).abs().amax(1, keepdim=True)
        mse = ((real - zeroed) ** 2 * mask).flatten(1).sum(1) / (3 * mask.flatten(1).sum(1))
        rows.append({"person": person, "frames": len(real),
                     "changed pixels > 0.05 (mean per frame)": float((diff > 0.05).flatten(1).sum(1).float().mean()),
                     "changed pixels > 0.05 (max)": int((diff > 0.05).flatten(1).sum(1).max()),
                     "face PSNR of ignoring expression (dB)": float(psnr_from_mse(mse.clamp_min(1e-10)).mean()),
                     "face pixels": float(mask.flatten(1).sum(1).float().mean())})
        rows_of_8 = (real, zeroed, (diff * 4).clamp(0, 1).expand_as(real))
        pictures.append(torch.cat([torch.cat(list(t[:8]), 2) for t in rows_of_8], 1))
    from PIL import Image

    grid = torch.cat(pictures, 1)
    img = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).repeat(2, 0).repeat(2, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(RESULTS / "expression_effect.png")
    report("expression_effect", rows, {"resolution": a.resolution, "expression_only_dims": list(EXPRESSION_ONLY),
                                       "picture": str(RESULTS / "expression_effect.png")})


if __name__ == "__main__":
    main()
