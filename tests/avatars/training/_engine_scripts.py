"""Resume checks of the real DeepSpeed engine (init_distributed joins a process group for the process' lifetime, so
they run in a child process): test_optim.py's cosine schedule and test_weight_average.py's weight average. Each
builds two tiny engines, steps the first, checkpoints it and resumes the second from it. They run one after the
other in one child (conftest.py's `engine_resumes`, which both tests share through an xdist group): one interpreter's
start (~9 CPU s of torch, diffusers and DeepSpeed imports) instead of two."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from avatars.training.rendezvous import environment_without_group

#: test_optim.py: DeepSpeed steps the schedule and keeps its state in the checkpoint (argv[1]).
SCHEDULE_RESUME = textwrap.dedent("""
    import json, sys, torch
    from avatars.models import DiffusionAvatarsModel
    from avatars.testing import synthetic_batch
    from avatars.training import checkpoint, train_preset
    from avatars.training.engine import build_engine
    from avatars.training.trainer import init_distributed
    _, world = init_distributed()
    cfg = train_preset("tiny", batch_size=2, steps=10, lr_decay="cosine")
    noise = torch.Generator().manual_seed(0)
    batch = synthetic_batch(2, 64, 16)
    lrs = lambda trainer: [g["lr"] for g in trainer.engine.optimizer.param_groups]
    first = build_engine(cfg, DiffusionAvatarsModel(cfg.model_config(16)), world)
    for _ in range(3):
        first.micro_step(batch, noise)
    checkpoint.save(first.engine, sys.argv[1], checkpoint.TrainerState(step=3), noise, keep_last=1)
    second = build_engine(cfg, DiffusionAvatarsModel(cfg.model_config(16)), world)
    fresh = lrs(second)
    checkpoint.load_latest(second.engine, sys.argv[1], noise)
    saved, loaded = lrs(first), lrs(second)
    first.micro_step(batch, noise)  # the fourth step, uninterrupted and resumed
    second.micro_step(batch, noise)
    print("RESULT" + json.dumps({"saved": saved, "fresh": fresh, "loaded": loaded,
                                 "next": lrs(first), "next_resumed": lrs(second)}))
""")

#: test_weight_average.py: the average is in the checkpoint (argv[1]) and resumes exactly.
AVERAGE_RESUME = textwrap.dedent("""
    import json, sys, torch
    from avatars.models import DiffusionAvatarsModel
    from avatars.testing import synthetic_batch
    from avatars.training import checkpoint, train_preset
    from avatars.training.engine import build_engine
    from avatars.training.trainer import init_distributed
    from avatars.training.weight_average import WeightAverage
    _, world = init_distributed()
    cfg = train_preset("tiny", batch_size=2, steps=10, ema_decay=0.9)
    noise = torch.Generator().manual_seed(0)
    batch = synthetic_batch(2, 64, 16)
    def build():
        model = DiffusionAvatarsModel(cfg.model_config(16))
        trainer = build_engine(cfg, model, world)
        return trainer, WeightAverage(model.trainable_state_dict(), 0.9)
    (first, avg1), (second, avg2) = build(), build()
    for step in range(1, 4):
        first.micro_step(batch, noise)
        avg1.update(step)
    checkpoint.save(first.engine, sys.argv[1], checkpoint.TrainerState(step=3), noise, keep_last=1,
                    average=avg1.state_dict())
    state = checkpoint.load_latest(second.engine, sys.argv[1], noise)
    avg2.load_state_dict(checkpoint.load_average(sys.argv[1], state.step))
    for trainer, avg in ((first, avg1), (second, avg2)):
        trainer.micro_step(batch, torch.Generator().manual_seed(5))
        avg.update(4)
    same = all(torch.equal(avg1.average[n], avg2.average[n]) for n in avg1.average)
    moved = any(not torch.equal(avg1.average[n], p) for n, p in avg1.params.items())
    print("RESULT" + json.dumps({"same": same, "moved": moved}))
""")

SCRIPTS = {"schedule": SCHEDULE_RESUME, "average": AVERAGE_RESUME}
#: The xdist group of the tests that read them.
ENGINE_RESUMES = "training-engine-resumes"

#: Runs each script of argv[2] (JSON: {name: source}) with sys.argv[1] = <argv[1]>/<name>/ckpt, each in globals of
#: its own, and prints {name: what the script printed after "RESULT"}.
RUNNER = textwrap.dedent("""
    import contextlib, io, json, sys
    from pathlib import Path
    root, results = Path(sys.argv[1]), {}
    for name, source in json.loads(sys.argv[2]).items():
        sys.argv = ["-c", str(root / name / "ckpt")]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(source, f"<{name}>", "exec"), {"__name__": "__main__"})
        results[name] = json.loads(out.getvalue().split("RESULT", 1)[1])
    print("RESULT" + json.dumps(results))
""")


def run_resumes(root: Path) -> dict[str, dict]:
    """Every script of SCRIPTS in one child process, its checkpoint in ``root/<name>/ckpt``; returns {name: its
    result}."""
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(root), json.dumps(SCRIPTS)],
                          env=environment_without_group(), capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])
