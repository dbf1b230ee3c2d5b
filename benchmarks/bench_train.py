"""Training throughput: measured for the tiny preset on this CPU, expected for the paper preset.

    python benchmarks/bench_train.py [--steps 60] [--shards data/shards] [--person 000] [--base-model DIR]

The tiny rows are real DeepSpeed runs of jobs/train_person.py's library function, one with the
trainer's latent cache (the default) and one without (``--latent-cache-mib 0``): samples/s in
steady state (the first logging window, with worker start-up, is excluded) and the whole run's
training seconds (the cache's first epoch encodes every sample on its own, so it only pays off once
samples return: give ``--steps`` past one epoch, e.g. 600 on the main job's 480 samples a person). The
paper rows divide the FLOP count of one training sample of the full SD2.1-size
model (torch.utils.flop_counter on the meta device, see bench_model.py) by an
assumed achieved fraction of each GPU's dense peak; the paper's own figure
(about 2 days for 100k steps at batch 8 on one RTX A6000 = 4.6 samples/s) is
listed next to it as the reality check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import report  # noqa: E402

from avatars.training import TrainOptions  # noqa: E402

#: Dense peak TFLOP/s (no sparsity) of the precision each GPU would train in.
GPUS = {
    "RTX A6000 (TF32, as the paper: fp32 weights)": 77.4,
    "A100 80GB (bf16)": 312.0,
    "H100 SXM (bf16)": 989.0,
}
ASSUMED_MFU = 0.35
PAPER_SAMPLES_PER_S = 100_000 * 8 / (2 * 24 * 3600)


def tiny_run(shards: Path, person: str, steps: int, base_model: Path | None, latent_cache_mib: float) -> dict:
    from avatars.training import TrainConfig, train_person

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(person=person, shards=shards, out=Path(out), steps=steps, log_every=10,
                          validate_every=0, checkpoint_every=steps, val_samples=1, val_inference_steps=1,
                          lpips_weights=Path(out) / "none", base_model=base_model, latent_cache_mib=latent_cache_mib)
        result = train_person(cfg)
        lines = [json.loads(line) for line in (Path(out) / person / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in lines if "samples_per_s" in r][1:]
    sps = sum(r["samples_per_s"] for r in windows) / len(windows)
    cache = next((r["latent_cache"] for r in lines if "latent_cache" in r), None)
    return {"batch": cfg.batch_size, "samples/s": sps, "step ms": 1000 * cfg.batch_size / sps,
            "train s": result["train_seconds"],
            "latent cache": f"{cache['encoded']} encoded, {cache['reused']} reused" if cache else "off"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--shards", type=Path, default=Path("data/shards"))
    ap.add_argument("--person", default="000")
    ap.add_argument("--base-model", type=Path, default=None, help="the tiny base (default: random weights)")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    if not (a.shards / a.person / "manifest.json").is_file():
        from shards.testing import build_tiny

        a.shards = build_tiny(Path(tempfile.mkdtemp()))[2]
        a.person = "000"
    rows = [{"preset": "tiny", "device": f"this CPU (measured, {a.steps} steps)", "resolution": 64,
             **tiny_run(a.shards, a.person, a.steps, a.base_model, mib)} for mib in (TrainOptions.latent_cache_mib, 0)]

    from bench_model import full_config_flops

    flops = full_config_flops(expression_dim=100)["train_step_flops_per_sample"]
    for gpu, peak in GPUS.items():
        sps = peak * 1e12 * ASSUMED_MFU / flops
        rows.append({"preset": "paper", "device": f"{gpu}, {ASSUMED_MFU:.0%} of peak (expected)", "batch": 8,
                     "resolution": 512, "samples/s": sps, "step ms": 8000 / sps,
                     "100k steps (h)": 100_000 * 8 / sps / 3600})
    rows.append({"preset": "paper", "device": "RTX A6000, as reported by the paper", "batch": 8, "resolution": 512,
                 "samples/s": PAPER_SAMPLES_PER_S, "step ms": 8000 / PAPER_SAMPLES_PER_S, "100k steps (h)": 48.0})
    report("train", rows, {"paper_train_GFLOP_per_sample": flops / 1e9, "assumed_mfu": ASSUMED_MFU})


if __name__ == "__main__":
    main()
