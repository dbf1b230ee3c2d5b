"""Shared output for benchmark scripts: a printed table and a JSON file under benchmarks/results/."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from common.io import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results"


#: The vector extensions that decide a CPU's convolution and matmul kernels (oneDNN, MKL).
VECTOR_ISA = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def cpu(cpuinfo: Path = Path("/proc/cpuinfo"), boot_id: Path = Path("/proc/sys/kernel/random/boot_id")) -> dict:
    """Which CPU and which boot of it measured: sessions run on different machines (the same 2-core CPU 'size' was
    an AVX2-only AMD EPYC that trained the tiny preset at half the speed of an earlier one), so figures compare only
    where these agree."""
    try:
        first = cpuinfo.read_text().split("\n\n")[0]
    except OSError:
        return {"model": platform.processor() or None}
    fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in first.splitlines()))
    flags = set(fields.get("flags", "").split())
    try:
        boot = boot_id.read_text().strip()
    except OSError:
        boot = None
    return {"model": fields.get("model name"), "family": fields.get("cpu family"), "model_id": fields.get("model"),
            "vector_isa": [f for f in VECTOR_ISA if f in flags], "boot_id": boot}


def machine() -> dict:
    import os

    import torch

    return {"cpu_count": os.cpu_count(), "cpu": cpu(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def report(name: str, rows: list[dict], extra: dict | None = None, out: Path | None = None) -> Path:
    """Print `rows` as a table and write them (plus machine info) to `out` (default results/<name>.json)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    out = Path(out) if out is not None else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "rows": rows}
    payload.update(extra or {})
    atomic_write_bytes(out, (json.dumps(payload, indent=2) + "\n").encode())  # never a truncated file
    print(f"\nwrote {out}")
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
