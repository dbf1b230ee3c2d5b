"""What one training step dispatches, ours against the stock-diffusers peer, op by op (CPU).

    python benchmarks/bench_step_ops.py [--preset tiny] [--batch 2] [--baseline OLD.json]

Counts the aten operations of one warmed-up training step (forward, backward, update) of this
project's trainer step and of the peer's train_controlnet-style step (``train_steps.py``, the
same layout), both in bf16 mixed precision (CPU autocast) and each in its GPU memory format
(ours channels_last, the stock peer NCHW). Each operation is classified:

* ``cast``: ``_to_copy`` that changes the dtype (``weight`` when its source is a parameter,
  ``activation`` otherwise), with the elements converted;
* ``layout``: copies that change no dtype (``copy_``, ``clone``/``contiguous``, a same-dtype
  ``_to_copy``), with the elements copied;
* ``grid_sample`` forward/backward, by dtype, and the backward's elements;
* ``norm_under_autocast``: group/layer norms run on bf16 inputs inside autocast. CPU autocast
  leaves them in bf16, **CUDA autocast runs them in fp32** (``group_norm``/``layer_norm`` are on
  its fp32 list): on a GPU each is a cast of its input to fp32 and an fp32 norm (and the
  element-wise ops after it in fp32) that this CPU count cannot see, so they are listed apart;
* ``conv layout mismatch``: a convolution (or its backward) whose activation and weight differ in
  memory format (NCHW vs NHWC): cuDNN converts the activation inside the call, a copy this
  count cannot see otherwise;
* ``optimizer``: the fused / foreach AdamW and clipping operations;
* ``other``: everything else (convolutions, matmuls, element-wise, ...).

Each operation is at least one kernel launch on a GPU, and casts/copies are pure memory traffic,
so the counts and elements say where ours does work the peer does not. ``--baseline`` embeds an
earlier run's result (e.g. from the commit before a change) as "before". The CPU cannot time GPU
kernels: the GPU profile (``bench_gpu.py --only profile``) confirms or refutes these on a device.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import RESULTS, report  # noqa: E402

from avatars.training.rendezvous import environment_without_group  # noqa: E402

PHASES = ("forward", "backward", "update")
_NORMS = {"group_norm", "layer_norm"}
_LAYOUT = {"copy_", "clone", "contiguous", "_to_copy"}


def _name(func) -> str:
    return func._schema.name.split("::")[-1]


class OpCounter(TorchDispatchMode):
    """Classifies every aten operation dispatched while active (module docstring)."""

    def __init__(self, parameters: set[int]):
        super().__init__()
        self.parameters = parameters  # data_ptr()s of the models' parameters
        self.ops: collections.Counter = collections.Counter()
        self.classes: collections.Counter = collections.Counter()
        self.elements: collections.Counter = collections.Counter()
        self.casts: collections.Counter = collections.Counter()  # "src->dst kind shape" -> count
        self.mismatches: collections.Counter = collections.Counter()  # "op input-layout shape" -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        self.ops[name] += 1
        cls, elements = self._classify(name, args, kwargs)
        self.classes[cls] += 1
        self.elements[cls] += elements
        return func(*args, **kwargs)

    def _classify(self, name: str, args, kwargs) -> tuple[str, int]:
        first = args[0] if args and torch.is_tensor(args[0]) else None
        if name == "_to_copy" and first is not None and kwargs.get("dtype") not in (None, first.dtype):
            kind = "weight" if first.data_ptr() in self.parameters else "activation"
            self.casts[f"{kind} {str(first.dtype)[6:]}->{str(kwargs['dtype'])[6:]} {tuple(first.shape)}"] += 1
            return f"cast ({kind})", first.numel()
        if name in _LAYOUT:
            src = args[1] if name == "copy_" else first
            return "layout", src.numel() if torch.is_tensor(src) else 0
        if name.startswith("grid_sampler_2d"):
            which = "backward" if name.endswith("backward") else "forward"
            return f"grid_sample {which} {str(first.dtype)[6:]}", first.numel()
        if name in ("convolution", "convolution_backward"):
            # an NCHW activation meeting an NHWC weight (or the reverse): converted inside the kernel
            data, weight = args[0], args[2 if name == "convolution_backward" else 1]
            if _channels_last(data) != _channels_last(weight):
                self.mismatches[f"{name} {'NHWC' if _channels_last(data) else 'NCHW'} {tuple(data.shape)}"] += 1
                return "conv layout mismatch", data.numel()
        if name.startswith(("_fused_adam", "_foreach_")) or name in ("_fused_adamw_",):
            return "optimizer", 0
        return "other", 0

    def summary(self, norms: "AutocastNorms") -> dict:
        classes, elements = dict(self.classes), dict(self.elements)
        if norms.calls:
            classes["norm_under_autocast"], elements["norm_under_autocast"] = norms.calls, norms.elements
        return {"ops": sum(self.ops.values()), "classes": dict(sorted(classes.items())),
                "elements": {k: v for k, v in sorted(elements.items()) if v},
                "top_ops": dict(self.ops.most_common(15)),
                "activation_casts": {k: n for k, n in self.casts.most_common() if k.startswith("activation")},
                "conv_layout_mismatches": dict(self.mismatches.most_common())}


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class AutocastNorms(TorchFunctionMode):
    """Group / layer norms called while autocast is on (seen above the dispatcher, where autocast's
    state is visible): CUDA autocast runs each in fp32 (module docstring)."""

    def __init__(self):
        super().__init__()
        self.calls = self.elements = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _NORMS and args and torch.is_tensor(args[0]):
            if torch.is_autocast_enabled(args[0].device.type):
                self.calls += 1
                self.elements += args[0].numel()
        return func(*args, **(kwargs or {}))


def measure(who: str, preset: str, batch: int) -> dict:
    """One warmed-up step of ``who`` ("ours" or "peer"), counted phase by phase."""
    from train_steps import our_step, peer_step

    from avatars.training import train_preset

    torch.manual_seed(0)
    device = torch.device("cpu")
    if who == "ours":
        step = our_step(preset, device, batch, precision="bf16", memory_format="channels_last", expression_dim=16)
        modules = [step.info["model"]]
    else:
        config = train_preset(preset, random_base=preset != "tiny").model_config(16)
        step = peer_step(config, device, batch, bf16=True)  # stock: NCHW
        modules = list(step.info["models"])
    params = {p.data_ptr() for m in modules for p in m.parameters()}
    for _ in range(2):  # warm-up: optimizer state, lazily built buffers
        step()
    phases = {}
    for phase in PHASES:
        counter, norms = OpCounter(params), AutocastNorms()
        with norms, counter:
            getattr(step, phase)()
        phases[phase] = counter.summary(norms)
    return {"who": who, "preset": preset, "batch": batch,
            **{k: v for k, v in step.info.items() if k not in ("model", "models")}, "phases": phases}


def rows_of(results: list[dict], label: str = "") -> list[dict]:
    """One table row per (who, phase) with the class counts."""
    rows = []
    for r in results:
        for phase, s in r["phases"].items():
            row = {"run": label, "who": r["who"], "phase": phase, "ops": s["ops"]}
            row.update({c: n for c, n in s["classes"].items() if c != "other"})
            row["cast elements"] = sum(v for k, v in s["elements"].items() if k.startswith("cast"))
            row["layout elements"] = s["elements"].get("layout", 0)
            row["autocast-norm elements"] = s["elements"].get("norm_under_autocast", 0)
            rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="an earlier result of this benchmark, embedded as 'before'")
    parser.add_argument("--out", type=Path, default=RESULTS / "step_ops.json")
    parser.add_argument("--who", choices=["ours", "peer"], help=argparse.SUPPRESS)  # one side per process
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.who:
        print("ROW" + json.dumps(measure(args.who, args.preset, args.batch)))
        return
    results = []
    env = environment_without_group()
    for who in ("ours", "peer"):  # separate processes: DeepSpeed's process group and global state
        proc = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch),
                               "--who", who], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{who}: {proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.split("ROW", 1)[1]))
    rows = rows_of(results, "now")
    extra = {"preset": args.preset, "batch": args.batch, "device": "cpu (CPU autocast bf16, channels_last)",
             "commit": _commit(), "details": results}
    if args.baseline:
        before = json.loads(args.baseline.read_text())
        extra["before"] = {"commit": before.get("commit"), "details": before["details"]}
        rows = rows_of(before["details"], f"before {before.get('commit', '')[:8]}") + rows
    report("step_ops", rows, extra, out=args.out)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
