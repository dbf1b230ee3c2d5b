"""Re-runs and subsets of the main job (issue 14): full run, subset run, full run again.

In process, on the local backend, with a tiny base pretrained in a few steps: the base is
pretrained once on every person whatever --persons is and never replaced, a subset run keeps
the night's other results and re-renders nothing up to date, and when the base does change
every avatar is retrained on it before it is evaluated: no avatar is ever evaluated on a base
it was not trained on. The first run renders on the Ray Serve renderer; the last one's renderer
is a stand-in that records what it was asked to render."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import tyro
from pipeline_helpers import TINY_DATA, TINY_TRAIN

from avatars.training import base_pretraining
from cluster.eval_driver import driver
from cluster.report import RunResults
from common.fingerprint import tree_fingerprint
from jobs import launch_all


def _fast_base(monkeypatch, vae_steps: int) -> None:
    monkeypatch.setattr(base_pretraining, "BasePretrainConfig", functools.partial(
        base_pretraining.BasePretrainConfig, vae_steps=vae_steps, unet_steps=3, vae_batch_size=4, unet_batch_size=4,
        scale_batches=1, eval_images=2, log_every=3))


def _run(work: Path, persons: str, capsys) -> tuple[int, str]:
    args = tyro.cli(launch_all.LaunchAllArgs, args=[
        "--workdir", str(work), "--persons", persons, "--synthetic.persons", "2", *TINY_DATA, *TINY_TRAIN,
        "--backend", "local", "--max-retries", "0", "--min-free-gb", "0",
        "--eval-parallel-persons", "1"])  # one Serve replica renders both persons: a second one's start is ~15 CPU s
    code = launch_all.main(args)
    out = capsys.readouterr().out
    with (work.parent / "launch_all-output.txt").open("a") as f:  # kept for a look after the test
        f.write(f"$ launch_all --persons {persons}\n{out}\n")
    return code, out


def _trained_on(work: Path, person: str) -> tuple[str, str]:
    meta = json.loads((work / "runs" / person / "model" / "config.json").read_text())
    return meta["base_model"], meta["base_fingerprint"]


def _night(work: Path) -> RunResults:
    (path,) = (work / "reports" / "runs").glob("*/results.json")
    return RunResults.load(path)


def _assert_evaluated_on_own_base(work: Path) -> None:
    night = _night(work)
    for person in night.persons:
        base, fingerprint = _trained_on(work, person)
        assert tree_fingerprint(base) == fingerprint, person


@pytest.fixture
def own_process_group_env(monkeypatch):
    """Training in this process sets RANK / WORLD_SIZE / MASTER_PORT...; undone afterwards, so
    that processes later tests start (a `ray start` head, its workers) pick their own port."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_full_subset_full_keeps_one_base_and_every_result(tmp_path, monkeypatch, capsys, own_process_group_env):
    work = tmp_path / "work"
    _fast_base(monkeypatch, vae_steps=3)
    code, out = _run(work, "all", capsys)
    assert code == 0, out
    (base,) = (work / "base").glob("tiny-*")
    assert all(_trained_on(work, p) == (str(base.resolve()), tree_fingerprint(base)) for p in ("000", "001"))
    first = _night(work)
    assert sorted(first.persons) == ["000", "001"]
    _assert_evaluated_on_own_base(work)

    # A subset: the same base (made of every person, not of the subset), nothing retrained or
    # re-rendered, and the night still holds both persons.
    code, out = _run(work, "000", capsys)
    assert code == 0, out
    assert list((work / "base").glob("tiny-*")) == [base]
    assert "1 persons already trained to their steps on this base, not run again (000" in out
    assert "[3/4]" not in out  # no training stage at all
    assert json.loads((work / "runs" / "000" / "result.json").read_text())["resumed_from"] == 0  # run 1's
    assert "1 up to date, not rendered again" in out and "0 frames" in out
    night = _night(work)
    assert sorted(night.persons) == ["000", "001"] and night.persons == first.persons
    _assert_evaluated_on_own_base(work)

    # The base's settings change: a new base beside the old one, and every avatar is retrained on
    # it (said per person) before it is evaluated, not resumed or rendered on a base it never saw.
    # The renderer stands in for this run (the first run rendered on Serve; a second Ray and its
    # replicas would cost ~30 s): it notes the base each avatar was trained on when it is rendered.
    rendered = {}

    def render_all(config, folder, todo, drivers, results, failed, person_seconds, app, media_tags=None,
                   on_done=None):
        rendered.update({p: _trained_on(work, p) for p in todo})
        results.update({p: first.persons[p] for p in todo})
        return sum(r.frames for p in todo for r in first.persons[p].values())

    monkeypatch.setattr(driver, "_render_all", render_all)
    _fast_base(monkeypatch, vae_steps=4)
    code, out = _run(work, "all", capsys)
    assert code == 0, out
    bases = sorted((work / "base").glob("tiny-*"))
    assert len(bases) == 2 and base in bases
    (new,) = [b for b in bases if b != base]
    assert base_pretraining.newest_base(work / "base") == new  # what bench_learning uses by default
    for p in ("000", "001"):
        assert f"{p}: retraining from scratch on this run's base" in out
        assert json.loads((work / "runs" / p / "result.json").read_text())["resumed_from"] == 0
        assert _trained_on(work, p) == rendered[p] == (str(new.resolve()), tree_fingerprint(new))
    night = _night(work)
    assert all(night.evaluations[p]["run_id"] != first.evaluations[p]["run_id"] for p in ("000", "001"))
    _assert_evaluated_on_own_base(work)
