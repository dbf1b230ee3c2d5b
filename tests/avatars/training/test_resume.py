"""Exact resume: a run SIGKILLed between checkpoints and resumed equals an uninterrupted run.

Checkpoints every 6 steps, loss lines every 4 (not a divisor of 6): the window of the line at step
8 (steps 5-8) is open at the checkpoint of step 6, and the run is killed after writing that line, so
the resumed run must drop it, continue the saved window and log the same mean.

The waits end as soon as what they wait for happens; they give up only when the trainer has used a
budget of CPU time (not wall time: a 2-core machine shared with other jobs slows it several-fold).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from train_cli import single_thread_env, train_person_args

from avatars.models.diffusion_avatars import load_trainable_weights
from avatars.training.base_record import BaseMismatch
from avatars.training.config import ResumeMismatch

STEPS, EVERY, LOG_EVERY = 14, 6, 4
KILL_AFTER = 8  # the loss line written between the checkpoints of steps 6 and 12
CPU_BUDGET_S = 900  # CPU seconds one training run may use (about 10x what it needs)
STALL_S, STALL_CPU_S = 300, 1.0  # a run that used less CPU than this in that many wall seconds is blocked


def _cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, *train_person_args(shards, out, "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
                                               "--log-every", str(LOG_EVERY), "--num-workers", "2",
                                               "--batch-size", "4", *extra)]


def _losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every loss line, in file order (a line written twice shows twice)."""
    lines = [json.loads(line) for line in (run / "000" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def _cpu_s(proc: subprocess.Popen) -> float:
    """CPU seconds used so far by `proc` and its descendants (data-loader workers)."""
    total = 0.0
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return total
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def _wait(proc: subprocess.Popen, until=lambda: False) -> None:
    """Waits until `until()` holds or `proc` exits; fails if it used more than the CPU budget first, or
    next to no CPU for STALL_S (blocked, say on a lock or a full pipe: no budget would end that wait)."""
    used, since = 0.0, time.monotonic()
    while proc.poll() is None and not until():
        cpu = _cpu_s(proc)
        if cpu > CPU_BUDGET_S:
            proc.kill()
            pytest.fail(f"the training run used {cpu:.0f} CPU seconds without getting there")
        if cpu >= used + STALL_CPU_S:
            used, since = cpu, time.monotonic()
        elif time.monotonic() - since > STALL_S:
            stacks = _stacks(proc)
            proc.kill()
            pytest.fail(f"the training run used {cpu - used:.2f} CPU seconds in the last {STALL_S} s: blocked, "
                        f"after {cpu:.0f} CPU seconds. Its threads:\n{stacks}")
        time.sleep(0.05)


def _stacks(proc: subprocess.Popen) -> str:
    """Where each thread of `proc` is (py-spy, which Ray installs), for the failure message."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return "(py-spy not found)"
    dump = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=60)
    return (dump.stdout + dump.stderr)[-6000:]


def _start(cmd: list[str], err: Path) -> subprocess.Popen:
    """Starts a run whose stderr goes to `err`. Not to a pipe: nobody reads one while the test waits,
    and once it holds 64 KiB the trainer blocks on its next write, forever."""
    with err.open("a") as f:
        return subprocess.Popen(cmd, env=single_thread_env(), stdout=subprocess.DEVNULL, stderr=f)


def _run(cmd: list[str], err: Path) -> None:
    proc = _start(cmd, err)
    _wait(proc)
    assert proc.wait() == 0, err.read_text()[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(train_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(_cmd(train_shards, out), out / "train.err")
    return out


def _refused(shards: Path, out: Path, *extra: str) -> None:
    """The command line of `_cmd`, in this process: a refused resume raises before the trainer joins a
    process group or builds anything (and without the ~10 s a new interpreter's imports cost). Whether it joined
    is asked of the trainer's call, not of torch.distributed: an in-process training of an earlier test of this
    worker keeps its group for the process' lifetime, as the product does."""
    from avatars.training import trainer
    from jobs import train_person

    joined = []
    real = trainer.init_distributed
    trainer.init_distributed = lambda: joined.append(True) or real()
    try:
        train_person.main(_cmd(shards, out, *extra)[2:])
    finally:
        trainer.init_distributed = real
        assert not joined, "refused only after joining a process group"
    pytest.fail("the run was not refused")


def _logged(jsonl: Path, step: int) -> bool:
    """Whether the loss line of `step` is in `jsonl` (complete: a line being written does not parse)."""
    if not jsonl.is_file():
        return False
    for line in jsonl.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step") == step and "loss" in record:
            return True
    return False


@pytest.mark.timeout(3600)  # the CPU budget decides; the wall time of a loaded machine does not
def test_sigkill_between_checkpoints_then_resume_matches(train_shards, uninterrupted, tmp_path):
    err = tmp_path / "train.err"
    proc = _start(_cmd(train_shards, tmp_path), err)
    jsonl = tmp_path / "000" / "metrics.jsonl"
    _wait(proc, until=lambda: _logged(jsonl, KILL_AFTER))
    assert proc.poll() is None, err.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted(p.name for p in (tmp_path / "000" / "checkpoints").glob("step_*"))
    assert ckpts[-1] == f"step_{EVERY:07d}", f"killed after step {KILL_AFTER} but checkpoints are {ckpts}"
    assert not (tmp_path / "000" / "model").exists()
    assert [s for s, _ in _losses(tmp_path)] == [LOG_EVERY, KILL_AFTER]

    _run(_cmd(train_shards, tmp_path, "--resume", "auto"), tmp_path / "train.err")
    result = json.loads((tmp_path / "000" / "result.json").read_text())
    assert result["resumed_from"] == EVERY and result["steps"] == STEPS
    a, b = _losses(uninterrupted), _losses(tmp_path)
    assert [s for s, _ in b] == [4, 8, 12, 14]  # the killed run's line of step 8 was dropped, not repeated
    assert b == a  # the whole loss curve, bit for bit (the window of step 8 spans the kill)
    wa = load_trainable_weights(uninterrupted / "000" / "model")
    wb = load_trainable_weights(tmp_path / "000" / "model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], torch.zeros_like(wa[k])) for k in wa)


#: jobs/train_person.py's command line, the run stopped by a callback once it is set up (as if killed then)
STOPPED_AFTER_SET_UP = """
import sys
import avatars.training as training
from jobs import train_person

class Stop(training.TrainerCallback):
    def on_train_start(self, trainer):
        raise RuntimeError("stopped after set-up")

run = training.train_person
training.train_person = lambda config, callbacks=None: run(config, [Stop()])
train_person.main(sys.argv[1:])
"""


def test_resume_never_starts_over_and_keep_last(train_shards, uninterrupted, tmp_path):
    """--resume never starts from scratch and removes the earlier run's checkpoints, avatar (model/), result.json
    and validation images when it starts: a run that stops before its end leaves no earlier avatar that the main
    job would take for a trained one (its result.json, with the steps asked for) or the evaluation would score."""
    ckpts = sorted(p.name for p in (uninterrupted / "000" / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{2 * EVERY:07d}", f"step_{STEPS:07d}"]  # keep_last=2 deleted step 6
    shutil.copytree(uninterrupted / "000", tmp_path / "000")
    assert {"result.json", "model", "val", "checkpoints"} <= {p.name for p in (tmp_path / "000").iterdir()}
    stopped = subprocess.run([sys.executable, "-c", STOPPED_AFTER_SET_UP,
                              *_cmd(train_shards, tmp_path, "--resume", "never")[2:]],
                             capture_output=True, text=True, timeout=300, env=single_thread_env())
    assert stopped.returncode != 0 and "stopped after set-up" in stopped.stderr, stopped.stderr[-3000:]
    assert not {"result.json", "model", "val", "checkpoints"} & {p.name for p in (tmp_path / "000").iterdir()}
    _run(_cmd(train_shards, tmp_path, "--resume", "never", "--steps", "3", "--checkpoint-every", "3"),
         tmp_path / "train.err")
    assert json.loads((tmp_path / "000" / "result.json").read_text())["resumed_from"] == 0
    assert [s for s, _ in _losses(tmp_path)] == [3]


def test_resuming_on_another_base_is_refused(train_shards, uninterrupted, tmp_path):
    """Checkpoints trained on one base never continue on another (here: a random base, then a
    pretrained one): a clear error before any step, and --resume never is the way out."""
    shutil.copytree(uninterrupted / "000", tmp_path / "000")
    assert json.loads((tmp_path / "000" / "base.json").read_text()) == {"path": None, "fingerprint": None}
    other = tmp_path / "other-base" / "unet"
    for part in ("unet", "vae"):  # a diffusers layout (train_person checks it before the model's import)
        (other.parent / part).mkdir(parents=True)
        (other.parent / part / "config.json").write_text("{}")
    with pytest.raises(BaseMismatch, match="was trained on the base None") as refused:
        _refused(train_shards, tmp_path, "--base-model", str(other.parent))
    assert "--resume never" in str(refused.value)


def test_resuming_on_other_training_data_is_refused(train_shards, uninterrupted, tmp_path):
    """Checkpoints trained on one set of training shards never continue on another (another held-out split moves
    frames between training and evaluation): each checkpoint and result.json record the digest of the 'train'
    shards, and a resume on others is refused before any step, with --resume never as the way out."""
    from shards.writer import split_digest

    run = uninterrupted / "000"
    assert json.loads((run / "result.json").read_text())["train_data"] == split_digest(train_shards, "000", "train")
    shutil.copytree(run, tmp_path / "000")
    fewer = tmp_path / "shards"
    shutil.copytree(train_shards, fewer)
    manifest = json.loads((fewer / "000" / "manifest.json").read_text())
    dropped = next(name for name, e in manifest["shards"].items() if e["split"] == "train")
    del manifest["shards"][dropped]
    (fewer / "000" / dropped).unlink()
    (fewer / "000" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ResumeMismatch, match="train_data: ") as refused:
        _refused(fewer, tmp_path)
    assert "--resume never" in str(refused.value)


def _records(run: Path) -> list[tuple[int, list[str]]]:
    """(step, keys) of every metrics.jsonl line but a process's start-up cost, in file order."""
    lines = [json.loads(line) for line in (run / "000" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], sorted(r)) for r in lines if "first_step_s" not in r]


def test_resumed_after_its_last_checkpoint_the_log_reads_as_one_run(train_shards, uninterrupted, tmp_path):
    """A run that died after its final checkpoint (no model/ yet), while appending a line: the resume
    drops the cut-off line and the end-of-run lines (validation, latent cache), and logs them once."""
    shutil.copytree(uninterrupted / "000", tmp_path / "000")
    shutil.rmtree(tmp_path / "000" / "model")
    (tmp_path / "000" / "result.json").unlink()
    with (tmp_path / "000" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 14, "val_psn')
    _run(_cmd(train_shards, tmp_path, "--resume", "auto"), tmp_path / "train.err")
    assert json.loads((tmp_path / "000" / "result.json").read_text())["resumed_from"] == STEPS
    records = _records(tmp_path)
    assert records == _records(uninterrupted)
    assert [step for step, keys in records if "val_psnr" in keys or "latent_cache" in keys] == [STEPS, STEPS]


@pytest.mark.parametrize("changed, named", [(("--lr-networks", "0.01"), "lr_networks: 0.003 -> 0.01"),
                                            (("--seed", "1"), "seed: 0 -> 1")])
def test_resuming_with_options_that_define_the_state_is_refused(train_shards, uninterrupted, tmp_path, changed, named):
    """DeepSpeed would restore the checkpoint's learning rates whatever --lr-networks says, and --seed would
    rebuild another random base under the checkpoint: refused before set-up, naming the option."""
    shutil.copytree(uninterrupted / "000", tmp_path / "000")
    with pytest.raises(ResumeMismatch) as refused:
        _refused(train_shards, tmp_path, "--steps", str(STEPS + 2), *changed)
    assert named in str(refused.value) and "--resume never" in str(refused.value)
    assert json.loads((tmp_path / "000" / "result.json").read_text())["steps"] == STEPS  # nothing trained


def test_resuming_on_another_number_of_processes_is_refused(train_shards, uninterrupted, tmp_path, monkeypatch):
    """Each process's data position and noise generator are saved by rank, and the global batch is the micro-batch
    times the processes: on fewer processes a resume trained samples again (and lost generators), on more it
    found no state for the new ranks and told the user to delete a good checkpoint. Refused, naming the count."""
    shutil.copytree(uninterrupted / "000", tmp_path / "000")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ResumeMismatch) as refused:
        _refused(train_shards, tmp_path, "--steps", str(STEPS + 2))
    assert "world_size: 1 -> 2" in str(refused.value) and "as many processes" in str(refused.value)


def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused(train_shards, uninterrupted, tmp_path):
    """--steps below the newest checkpoint's step: the loop did not run and result.json said the checkpoint's
    steps, so launch_all never took the person as trained and ran its trainer again on every launch."""
    shutil.copytree(uninterrupted / "000", tmp_path / "000")
    with pytest.raises(ResumeMismatch) as refused:
        _refused(train_shards, tmp_path, "--steps", str(STEPS - 1))
    assert f"are at step {STEPS}, past --steps {STEPS - 1}" in str(refused.value)


def test_a_resume_extends_the_run_with_other_cadences(train_shards, uninterrupted, tmp_path):
    shutil.copytree(uninterrupted / "000", tmp_path / "000")
    _run(_cmd(train_shards, tmp_path, "--steps", str(STEPS + 2), "--log-every", "1", "--checkpoint-every", "1",
              "--num-workers", "0"), tmp_path / "train.err")
    result = json.loads((tmp_path / "000" / "result.json").read_text())
    assert (result["resumed_from"], result["steps"]) == (STEPS, STEPS + 2)
    # the old end's validation and latent-cache lines stay (the weights of step STEPS are not validated again)
    ended = [step for step, keys in _records(tmp_path) if "val_psnr" in keys or "latent_cache" in keys]
    assert ended == [STEPS, STEPS, STEPS + 2, STEPS + 2]
    assert _records(tmp_path)[:len(_records(uninterrupted))] == _records(uninterrupted)
