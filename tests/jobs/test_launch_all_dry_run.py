"""launch_all --dry-run: what the run would do per stage and person, and why, without doing or writing anything.

On the shared tiny data set (its stores and shards copied with their mtimes, so they are up to date), a random tiny
base given with --train.base-model, person 000 trained for 3 steps on the local backend and evaluated with the
driver's rendering stood in (its keys, base check and reuse lookup are the real ones). Each test works on a copy of
that work directory. The plan is compared with what the real run then does."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
from pathlib import Path

import pytest
import tyro

from common.locks import exclusive
from jobs import launch_all
from shards.integrity import mark_corrupt

CLUSTER_TESTS = Path(__file__).resolve().parents[1] / "cluster"
#: What an in-process training's single-process group leaves in os.environ (avatars.training.rendezvous).
GROUP_ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK", "MASTER_ADDR", "GLOO_SOCKET_IFNAME",
                     "NCCL_SOCKET_IFNAME")
TRAIN = ["--train.steps", "3", "--train.batch-size", "4", "--train.checkpoint-every", "3", "--train.validate-every",
         "0", "--train.val-samples", "1", "--train.val-inference-steps", "1", "--train.num-workers", "0"]
#: The shared tiny data set's ingest and shard settings (shards.testing.TINY_INGEST, TINY_SHARDS).
TINY = ["--ingest.held-out-sequences", "1", "--shards.samples-per-shard", "4", "--shards.raster-backend", "cpu"]


def _pipeline_helpers():
    spec = importlib.util.spec_from_file_location("pipeline_helpers", CLUSTER_TESTS / "pipeline_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(work: Path, captures: Path, base: Path, *extra: str) -> launch_all.LaunchAllArgs:
    return tyro.cli(launch_all.LaunchAllArgs, args=[
        "--workdir", str(work), "--captures", str(captures), "--persons", "000", *TINY, "--workers", "1",
        "--train.base-model", str(base), *TRAIN, "--eval-inference-steps", "2", "--backend", "local",
        "--max-retries", "0", "--min-free-gb", "0", *extra])


def _stand_in_rendering(mp: pytest.MonkeyPatch) -> list[str]:
    """The evaluation driver's rendering stood in (each person a task with a PSNR); returns the persons it
    renders."""
    from cluster.eval_driver import driver
    from cluster.report import TaskResult

    rendered = []

    def render_all(config, folder, todo, drivers, results, failed, person_seconds, app, media_tags=None,
                   on_done=None):
        rendered.extend(todo)
        for p in todo:
            results[p] = {"self_reenactment": TaskResult(metrics={"psnr": 30.0}, frames=1)}
            if on_done is not None:
                on_done(p)
        return len(todo)

    mp.setattr(driver, "_render_all", render_all)
    for name in GROUP_ENVIRONMENT:  # put back as they were after the test
        mp.setenv(name, "")
        mp.delenv(name)
    return rendered


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime_ns, mode) of every path under ``root``, the root included."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return found


def dry_run(args: launch_all.LaunchAllArgs, capsys) -> str:
    """The plan of ``args``, checked to have changed nothing under the work directory."""
    before = snapshot(args.workdir)
    assert launch_all.main(launch_all.dataclasses.replace(args, dry_run=True)) == 0
    out = capsys.readouterr().out
    assert snapshot(args.workdir) == before, out
    return out


@pytest.fixture(scope="module")
def ran(tiny_dataset, tmp_path_factory):
    """(work directory after a full run, captures, base), shared read-only: tests use copies (`work`)."""
    captures, stores, shards = tiny_dataset
    root = tmp_path_factory.mktemp("dry-run")
    work = root / "work"
    work.mkdir()
    for source, name in ((stores, "zarr"), (shards, "shards")):  # copy2: the mtimes verified.json records
        shutil.copytree(source, work / name)
    base = _pipeline_helpers().random_tiny_base(root / "base")
    with pytest.MonkeyPatch.context() as mp:
        rendered = _stand_in_rendering(mp)
        assert launch_all.main(_args(work, captures, base)) == 0
    assert rendered == ["000"]
    return work, captures, base


@pytest.fixture
def work(ran, tmp_path, monkeypatch):
    """(a copy of the run's work directory, its args, the persons the evaluation renders from now on)."""
    source, captures, base = ran
    copy = tmp_path / "work"
    shutil.copytree(source, copy, symlinks=True)
    return copy, _args(copy, captures, base), _stand_in_rendering(monkeypatch)


def _line(out: str, who: str) -> str:
    (line,) = [line.strip() for line in out.splitlines() if line.strip().startswith(f"{who}:")]
    return line


def test_a_fresh_work_directory_is_planned_whole_and_stays_absent(tmp_path, capsys):
    args = tyro.cli(launch_all.LaunchAllArgs, args=[
        "--workdir", str(tmp_path / "fresh"), "--synthetic.persons", "2", "--backend", "local", "--dry-run"])
    assert launch_all.main(args) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing created, not the work directory either
    assert "does not exist: the run creates it" in out
    for p in ("000", "001"):
        assert _line(out, f"synthetic {p}") == f"synthetic {p}: generate (no capture yet)"
        assert _line(out, f"ingest {p}") == f"ingest {p}: ingest (no store yet)"
        assert _line(out, f"train {p}").startswith(f"train {p}: train (from scratch, {args.train.steps} steps")
        assert _line(out, f"evaluate {p}") == f"evaluate {p}: render (its avatar is trained this run)"
    assert _line(out, "base").startswith("base: pretrain")
    assert "synthetic data: 2 generate" in out and "training: 2 train" in out and "evaluation: 2 render" in out


def test_bad_options_are_refused_as_a_run_refuses_them(tmp_path, capsys):
    args = tyro.cli(launch_all.LaunchAllArgs, args=[
        "--workdir", str(tmp_path / "fresh"), "--eval-inference-steps", "0", "--dry-run"])
    assert launch_all.main(args) == 2
    assert "--eval-inference-steps must be at least 1, got 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_after_a_full_run_everything_is_up_to_date_and_nothing_is_touched(work, capsys):
    copy, args, _ = work
    out = dry_run(args, capsys)
    assert _line(out, "ingest 000") == "ingest 000: up to date (6 frames, 18 images)"
    assert _line(out, "shards 000").startswith("shards 000: up to date (")
    assert _line(out, "train 000") == f"train 000: up to date (trained to {args.train.steps} steps on this base)"
    assert _line(out, "evaluate 000").startswith("evaluate 000: up to date, reused (evaluated ")
    assert "a run is in progress" not in out


def test_a_running_launch_is_named_and_the_plan_still_made(work, capsys):
    copy, args, _ = work
    with exclusive(copy / launch_all.LOCK_FILE, "the main job (jobs/launch_all.py)"):
        out = dry_run(args, capsys)
        assert launch_all.main(args) == 2  # a real run is refused meanwhile
    assert f"a run is in progress: pid {os.getpid()} " in out and "the plan may change" in out
    assert _line(out, "train 000").startswith("train 000: up to date")


def test_a_shard_marked_corrupt_is_the_only_work_planned_and_done(work, capsys):
    copy, args, rendered = work
    shard = sorted((copy / "shards" / "000").glob("train-*.tar"))[1]
    mark_corrupt(shard, "a sample's checksum did not match")
    out = dry_run(args, capsys)
    line = _line(out, "shards 000")
    assert line.startswith("shards 000: rebuild: 1 of ") and f"{shard.name}: a reader found it corrupt" in line
    assert "the same bytes" in line  # rebuilt from its recorded spec: nothing after the data stage changes
    assert _line(out, "train 000").startswith("train 000: up to date")
    assert _line(out, "evaluate 000").startswith("evaluate 000: up to date, reused")

    tars = {p.name: p.stat().st_mtime_ns for p in (copy / "shards" / "000").glob("*.tar")}
    assert launch_all.main(args) == 0
    done = capsys.readouterr()
    assert {p.name for p in (copy / "shards" / "000").glob("*.tar")
            if p.stat().st_mtime_ns != tars[p.name]} == {shard.name}
    assert f"000/{shard.name}: rebuilt" in done.err
    assert "already trained to their steps on this base, not run again (000;" in done.out
    assert rendered == [] and "(1 up to date, not rendered again" in done.out
    assert "up to date, reused" in _line(dry_run(args, capsys), "evaluate 000")


def test_a_changed_evaluation_setting_renders_again_and_nothing_else(work, capsys):
    copy, args, rendered = work
    args = launch_all.dataclasses.replace(args, eval_inference_steps=3)
    out = dry_run(args, capsys)
    assert _line(out, "evaluate 000").startswith("evaluate 000: render (no stored evaluation has its key")
    assert [_line(out, w).split(": ")[1].split(" (")[0] for w in ("ingest 000", "shards 000", "train 000")] == \
        ["up to date"] * 3
    assert "evaluation: 1 render" in out

    runs = snapshot(copy / "runs" / "000")
    assert launch_all.main(args) == 0
    done = capsys.readouterr().out
    assert rendered == ["000"] and "not run again (000;" in done
    assert {k: v for k, v in snapshot(copy / "runs" / "000").items() if not stat.S_ISDIR(v[2])} == \
        {k: v for k, v in runs.items() if not stat.S_ISDIR(v[2])}
    assert _line(dry_run(args, capsys), "evaluate 000").startswith("evaluate 000: up to date, reused")


def _shard_files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.tar")}


def test_captures_copied_without_mtimes_cost_a_reingest_and_nothing_else(work, tmp_path, capsys):
    """Captures copied to another root without their mtimes (cp -r): the store is ingested again, and whether its
    shards, training and evaluation change is the ingest's content identity's to say (only its hashing can tell);
    the run finds the same bytes: no shard rewritten, the manifest byte-identical, nothing trained or rendered."""
    copy, args, rendered = work
    moved = tmp_path / "moved"
    shutil.copytree(args.captures, moved, copy_function=shutil.copyfile)
    args = launch_all.dataclasses.replace(args, captures=moved)
    out = dry_run(args, capsys)
    assert _line(out, "ingest 000").startswith("ingest 000: ingest (the capture changed since it was ingested")
    for who in ("shards 000", "train 000", "evaluate 000"):
        assert _line(out, who).startswith(f"{who}: decided after the data stage ("), out
    assert "5 of 5 shards kept" in _line(out, "shards 000")

    tars, manifest = _shard_files(copy / "shards" / "000"), (copy / "shards" / "000" / "manifest.json").read_bytes()
    assert launch_all.main(args) == 0
    done = capsys.readouterr().out
    assert _shard_files(copy / "shards" / "000") == tars
    assert (copy / "shards" / "000" / "manifest.json").read_bytes() == manifest
    assert "not run again (000;" in done and rendered == []
    again = dry_run(args, capsys)
    assert [_line(again, w).split(": ")[1].split(" (")[0] for w in ("ingest 000", "shards 000", "train 000")] == \
        ["up to date"] * 3
    assert _line(again, "evaluate 000").startswith("evaluate 000: up to date, reused")


def test_a_store_of_the_previous_version_ingested_again_rebuilds_every_shard(work, tmp_path, capsys):
    """A store written before stores recorded a content identity: its shards' specs were made of its stat
    fingerprint, so a re-ingest (here: the captures moved) changes every one."""
    import zarr

    copy, args, _ = work
    group = zarr.open_group(str(copy / "zarr" / "000.zarr"), mode="r+")
    attrs = {k: v for k, v in group.attrs.items() if k != "content_sha256"}
    group.attrs.clear()
    group.attrs.update(attrs)
    moved = tmp_path / "moved"
    shutil.copytree(args.captures, moved)
    out = dry_run(launch_all.dataclasses.replace(args, captures=moved), capsys)
    assert _line(out, "shards 000").startswith("shards 000: rebuild (every shard, after the ingest: its store records "
                                               "no content identity")
    assert _line(out, "train 000").startswith("train 000: decided after the data stage (its shards are rewritten:")
    assert _line(out, "evaluate 000") == "evaluate 000: render (its data changes this run)"


def test_a_tiny_base_whose_persons_may_keep_their_data_leaves_the_avatars_to_the_data_stage(work, monkeypatch):
    """With the tiny base, a person ingested again whose data may stay the same (``Plan.undecided``) leaves the
    base's reuse to the data stage, and with it every avatar: an avatar up to date on the present base is retrained
    from scratch if a new one is pretrained, and evaluated again then (the base stood in by the run's given one)."""
    from types import SimpleNamespace

    from avatars.training import base_pretraining
    from avatars.training.base_record import base_fingerprint
    from jobs import _plan

    copy, args, _ = work
    monkeypatch.setattr(_plan, "_needs_tiny_base", lambda _: True)
    monkeypatch.setattr(_plan, "tiny_base_config", lambda *_: SimpleNamespace(output=args.train.base_model))
    monkeypatch.setattr(base_pretraining, "full_fingerprint", lambda _: "key")
    monkeypatch.setattr(base_pretraining, "finished_base", lambda *_: {"steps": 1})
    plan = _plan.Plan(undecided={"001"})
    fingerprint = _plan._plan_base(args, plan, ["000", "001"])
    assert fingerprint == base_fingerprint(args.train.base_model) and plan.base_undecided
    ok, fresh = _plan._plan_training(args, plan, ["000"], fingerprint)
    assert ok == ["000"] and fresh == set()
    _plan._plan_evaluation(args, plan, ok, fresh)
    lines = plan.lines()
    assert f"  base: decided after the data stage ({args.train.base_model}, pretrained on 2 persons, is reused if " \
           "the captures of 001 hold the bytes their stores record" in "\n".join(lines)
    assert f"  train 000: decided after the data stage (up to date (trained to {args.train.steps} steps on this " \
           "base) if the tiny base is reused, else retrained from scratch on a new one)" in lines
    assert "  evaluate 000: decided after the data stage (its avatar is retrained if the tiny base is pretrained " \
           "again)" in lines
