"""``launch_all --dry-run``: what the run would do, per stage and person, and why, without doing or writing anything.

Each stage is decided by the stage's own functions, called in their read-only form: the synthetic persons'
completion markers (``shards.synthetic``), the ingest's capture fingerprint (``shards.ingest.ingest_decision``: the
capture's files are statted), the shards' checks (``shards.writer.plan_shards`` with ``write_index=False``: a shard
whose mtime changed is hashed and one due a member index has its tar headers walked, and nothing is written), the
tiny base's key (``avatars.training.base_pretraining.finished_base``), the training's checks (launch_all's
``base_mismatches``, ``_check_resumable`` and ``trained_on``, and the newest complete checkpoint the trainer
resumes from) and the evaluation's key (``cluster.eval_driver.uptodate``; ``find_reusables`` with ``index=False``).
No Ray, no SLURM, no lock, no probe file: a work directory that does not exist stays so.

A stage after one that rewrites data is planned on what the rewrite is known to give. A shard rebuilt from the spec
its manifest entry records comes out with the bytes that entry lists (same inputs, same bytes), so its person's data
does not change; a shard that is new or of another spec changes the person's manifest, and with it the tiny base's
key (every avatar then retrains on the new base) and the person's evaluation key. A store ingested again keys its
shards by its content identity (``shards.ingest.CONTENT``: the sha256 of every file the ingest reads, not their
mtimes or root): a store that records one and is ingested again because its capture was touched, copied without
mtimes or moved may come out with the same identity, and then with the same shard specs, which only the ingest's
hashing can tell. Such a person's shards are planned on its present store as they would be after an ingest that
finds the same bytes, and said to be decided after the data stage, as is what depends on them (the tiny base, the
avatars, the evaluations); unless its manifest changes anyway (a shard setting changed): then it changes. A person
whose shards are listed but whose store is missing or does not read is decided after the data stage too (what its
shards' specs were made of is unknown). A store written before stores recorded a content identity, or ingested with
other split settings, changes every shard's spec. What only the new bytes can decide (an avatar on a given
--train.base-model whose shards are rewritten) is said to be decided after the data stage too.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from common.io import DataError, read_marker
from common.locks import lock_holder
from jobs.ingest import resolve_persons
from jobs.launch_all import (
    LOCK_FILE,
    LaunchAllArgs,
    _check_resumable,
    _needs_tiny_base,
    base_mismatches,
    eval_config,
    no_capture,
    preflight,
    refused_base,
    requested_persons,
    tiny_base_config,
    trained_on,
)
from shards.contract import list_persons
from shards.ingest import CONTENT, HASHED, NO_STORE, STORES_LOCK_FILE, IngestDecision, ingest_decision, split_change
from shards.writer import LOCK_FILE as SHARDS_LOCK_FILE
from shards.writer import NEW_INPUTS, plan_shards

#: Stands for the fingerprint of a base this run pretrains: no avatar was trained on it (12 characters, which
#: ``base_record.mismatch`` prints whole).
NEW_BASE = "not made yet"
#: The stages in the order they run, with the names their counts are printed under.
STAGES = {"synthetic": "synthetic data", "ingest": "ingest", "shards": "shards", "base": "base model",
          "train": "training", "evaluate": "evaluation"}
#: How many shard names (and reasons) a person's shard line names before "and N more".
SHOWN = 3
#: The verdict of a step that only the data stage's outcome decides.
LATER = "decided after the data stage"


@dataclass
class Step:
    stage: str
    person: str | None
    verdict: str
    """What is done, as counted per stage ("up to date", "ingest", "rebuild", ...)."""
    why: str = ""


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    #: persons whose shard manifest changes this run (what their data digests and the tiny base's key read)
    changed: set[str] = field(default_factory=set)
    #: persons ingested again whose manifest changes only if their capture's bytes changed (their store's content
    #: identity then changes): decided by the ingest
    undecided: set[str] = field(default_factory=set)
    #: the tiny base is reused only if the data of ``undecided`` persons does not change, else pretrained again
    base_undecided: bool = False
    #: persons whose data stage is known to fail, with why
    failed: dict[str, str] = field(default_factory=dict)
    #: persons that get their first store this run
    new_stores: set[str] = field(default_factory=set)

    def add(self, stage: str, person: str | None, verdict: str, why: str = "") -> None:
        self.steps.append(Step(stage, person, verdict, why))

    def lines(self) -> list[str]:
        """The steps under launch_all's four stage headers, stage by stage and person by person."""
        headers = {"synthetic": "[1/4] data", "ingest": "[1/4] data", "shards": "[1/4] data",
                   "base": "[2/4] base model", "train": "[3/4] training", "evaluate": "[4/4] evaluation"}
        out, order = [], list(STAGES)
        for step in sorted(self.steps, key=lambda s: (order.index(s.stage), s.person or "")):
            if headers[step.stage] not in out:
                out.append(headers[step.stage])
            who = f"{step.stage} {step.person}" if step.person else step.stage
            out.append(f"  {who}: {step.verdict}" + (f" ({step.why})" if step.why else ""))
        return out

    def counts(self) -> list[str]:
        """One line per stage: how many steps of each verdict."""
        out = []
        for stage, name in STAGES.items():
            counted = Counter(s.verdict.split(":")[0] for s in self.steps if s.stage == stage)
            if counted:
                out.append(f"{name}: " + ", ".join(f"{n} {verdict}" for verdict, n in counted.items()))
        return out


def runs_in_progress(workdir: Path) -> list[str]:
    """What holds a lock on ``workdir`` (`common.locks.lock_holder`, taking none): a main job, an ingest into its
    stores or a preprocess reading them (`jobs/ingest.py`, `jobs/preprocess.py` of a user), a preprocess of its
    shards. A holder named by an earlier lock (the main job, in its data stage) is named once."""
    found: list[str] = []
    named: set[str] = set()  # "pid N on host" of the holders named
    for kind, lock in (("a run is in progress", workdir / LOCK_FILE),
                       (f"an ingest into {workdir / 'zarr'}, or a preprocess reading its stores, is in progress",
                        workdir / "zarr" / STORES_LOCK_FILE),
                       (f"a shard preprocess on {workdir / 'shards'} is in progress", workdir / "shards" /
                        SHARDS_LOCK_FILE)):
        holder = lock_holder(lock)
        pids = set(re.findall(r"pid \d+ on [^,:;\s]+", holder or ""))
        if holder and not (pids and pids <= named):
            found.append(f"{kind}: {holder}")
            named |= pids
    return found


def dry_run(args: LaunchAllArgs) -> int:
    """Prints the plan of ``args``' run; the exit code: 0, or 2 where the run would refuse to start."""
    if not preflight(args, dry_run=True):
        return 2
    problem = _workdir_problem(args.workdir, args.min_free_gb)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"dry run of launch_all on {args.workdir}: nothing is done or written")
    for running in runs_in_progress(args.workdir):
        print(f"{running}; the plan may change")
    if not args.workdir.exists():
        print(f"{args.workdir} does not exist: the run creates it")
    plan = Plan()
    requested = requested_persons(args)
    subset_of_all = _needs_tiny_base(args) and args.persons != "all"  # the tiny base is made of every person
    prepared = _plan_data(args, plan, "all" if subset_of_all else args.persons)
    persons = [p for p in prepared if p in requested] if subset_of_all else prepared
    if subset_of_all:  # as the run fails them: a requested folder without a capture is no person of "all"
        for p in requested:
            if p not in prepared and p not in plan.failed:
                plan.failed[p] = f"ingest: {no_capture(p)}"
                plan.add("ingest", p, "fails", f"{no_capture(p)}: its folder has no calibration/camera_params.json")
    if persons:
        fingerprint = _plan_base(args, plan, prepared)
        trained, fresh = _plan_training(args, plan, persons, fingerprint)
        if not args.evaluate:
            plan.add("evaluate", None, "off", "--no-evaluate")
        elif trained:
            _plan_evaluation(args, plan, trained, fresh)
    print("\n".join(plan.lines()))
    print("counts:")
    print("\n".join(f"  {line}" for line in plan.counts()))
    return 0


def _workdir_problem(workdir: Path, min_free_gb: float) -> str | None:
    """What `cluster.orchestrate.check_workdir` would refuse, found without writing: the work directory (or the
    folder it would be created in) is not writable, or has less free space than --min-free-gb."""
    folder = Path(workdir).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"work directory {workdir} is not writable ({folder})"
    free = shutil.disk_usage(folder).free
    if free < min_free_gb * 2**30:
        return (f"work directory {workdir} has {free / 2**30:.2f} GiB free, less than the {min_free_gb:g} GiB "
                "asked for (--min-free-gb)")
    return None


# ---- data --------------------------------------------------------------------------------------------------------
def _plan_data(args: LaunchAllArgs, plan: Plan, persons: str) -> list[str]:
    """The data stage of `persons` ('all' or a list); returns the persons it is expected to prepare."""
    regenerated: set[str] = set()
    captures = args.captures
    if captures is None:
        captures = args.workdir / "captures"
        regenerated = _plan_synthetic(args, plan, captures)
    if persons == "all" and args.captures is None:  # the capture root as the synthetic stage leaves it
        persons_list = sorted(set(args.synthetic.person_ids) | set(list_persons(captures) if captures.is_dir() else []))
    else:
        persons_list = resolve_persons(persons, captures)
    stores, shards = args.workdir / "zarr", args.workdir / "shards"

    def decide(person: str) -> IngestDecision | Exception | None:
        """None for a person generated now: its capture is new."""
        if person in regenerated:
            return None
        try:
            return ingest_decision(captures, person, stores, args.ingest)
        except (DataError, OSError) as e:
            return e

    up_to_date, same_bytes = [], []
    with ThreadPoolExecutor(args.workers) as pool:  # the ingest decides in --workers processes, each statting its
        decisions = list(pool.map(decide, persons_list))  # capture's files on --ingest.io-threads threads
    for p, decision in zip(persons_list, decisions):
        store = stores / f"{p}.zarr"
        if isinstance(decision, Exception):
            plan.failed[p] = f"ingest: {decision}"
            plan.add("ingest", p, "fails", str(decision))
            continue
        if decision is None:
            reason = NO_STORE if not store.exists() else "its capture is generated again"
        else:
            reason = decision.reason
            if decision.hashed:  # the real run hashes the files (the dry run does not): kept or ingested again
                reason = f"{reason}; {HASHED}"
            if reason is None:
                current = decision.current
                plan.add("ingest", p, "up to date", f"{current.frames} frames, {current.images} images")
                up_to_date.append(p)
                continue
        if not store.exists():
            plan.new_stores.add(p)
        plan.add("ingest", p, "ingest", reason)
        if not (shards / p / "manifest.json").is_file():
            plan.changed.add(p)
            plan.add("shards", p, "write", "every shard, after the ingest")
            continue
        present = _present_store(store, args.ingest)
        if present == SAME_SPLIT:
            same_bytes.append(p)  # the same bytes give the same content identity, and the same shard specs
        elif present in (NO_STORE, UNREADABLE):  # what the specs its manifest lists were made of is unknown
            plan.undecided.add(p)
            plan.add("shards", p, LATER, f"{present}: its shards are kept if the specs its manifest records are "
                                         "those of the content identity of the store the ingest writes, else rebuilt")
        else:
            plan.changed.add(p)
            plan.add("shards", p, "rebuild", f"every shard, after the ingest: {present}")
    _plan_shards(args, plan, up_to_date, same_bytes)
    return [p for p in persons_list if p not in plan.failed]


#: `_present_store`'s verdicts besides NO_STORE and a reason that every shard's spec changes.
SAME_SPLIT, UNREADABLE = "its store records a content identity of these split settings", "its store does not read"


def _present_store(store: Path, config) -> str:
    """Whether the store a person's ingest replaces records a content identity (`shards.ingest.CONTENT`) of the
    split settings of ``config`` (an IngestConfig): SAME_SPLIT; else NO_STORE, UNREADABLE or why every shard's spec
    changes (the split settings are part of the identity; a store written by an earlier version records none, and
    its shards' specs were made of its stat fingerprint)."""
    from shards.store import PersonStore

    if not store.exists():
        return NO_STORE
    try:
        attrs = PersonStore(store).attrs
    except DataError:
        return UNREADABLE
    if not isinstance(attrs.get(CONTENT), str):
        return ("its store records no content identity (written by an earlier version), and its shards' specs are "
                "made of the stat fingerprint it records")
    change = split_change(attrs, config)
    if change is not None:
        return f"{change}: the split settings are part of the store's content identity, of which each shard's " \
               "spec is made"
    return SAME_SPLIT


def _plan_synthetic(args: LaunchAllArgs, plan: Plan, root: Path) -> set[str]:
    """The synthetic persons that are generated (again): those without the completion marker of these settings."""
    from shards.synthetic.generate import MARKER, marker_spec

    generated = set()
    for p in args.synthetic.person_ids:
        if read_marker(root / p / MARKER) == marker_spec(args.synthetic, p):
            plan.add("synthetic", p, "up to date")
            continue
        generated.add(p)
        plan.add("synthetic", p, "generate", "no capture yet" if not (root / p).exists() else
                 "its settings changed, or its generation did not finish")
    return generated


def _plan_shards(args: LaunchAllArgs, plan: Plan, persons: list[str], same_bytes: list[str] = ()) -> None:
    """The shards of persons whose store is up to date (`plan_shards`, writing nothing), and of those in
    ``same_bytes``, ingested again, as they are if the ingest finds the bytes their store's content identity
    records (the shard specs are then those of the present store): decided after the data stage, unless their
    manifest changes either way."""
    if not persons and not same_bytes:
        return
    shards = plan_shards([args.workdir / "zarr" / f"{p}.zarr" for p in [*persons, *same_bytes]],
                         args.workdir / "shards", args.shards, workers=args.workers, write_index=False)
    for p in same_bytes:
        if p in shards.failed:  # the present store: the one the ingest writes is planned after it
            plan.changed.add(p)
            plan.add("shards", p, "rebuild", f"every shard, after the ingest: its present store fails "
                                             f"({shards.failed[p]})")
        elif not shards.same_manifest(p):
            plan.changed.add(p)
            plan.add("shards", p, "rebuild", "after the ingest: its manifest changes whatever the ingest finds (a "
                                             "shard is new or of other settings); every shard if its capture's "
                                             "bytes changed")
        else:
            plan.undecided.add(p)
            total = len(shards.tasks[p])
            kept = sum(shards.stale[(p, t.name)].reason is None for t in shards.tasks[p])
            rebuilt = f", {total - kept} rebuilt from the specs its manifest records" if kept < total else ""
            plan.add("shards", p, LATER, "if the ingest finds the bytes its store's content identity records (a touch, "
                                         f"a copy without mtimes, a move): {kept} of {total} shards kept{rebuilt}; "
                                         "else every shard rebuilt")
    for p in persons:
        if p in shards.failed:
            plan.failed[p] = f"preprocess: {shards.failed[p]}"
            plan.add("shards", p, "fails", shards.failed[p])
            continue
        tasks = shards.tasks[p]
        verdicts = [(t.name, shards.stale[(p, t.name)]) for t in tasks]
        stale = [(name, v.reason) for name, v in verdicts if v.reason is not None]
        extra = [f"{n} to index" for n in [sum(v.indexed for _, v in verdicts)] if n]
        extra += [f"{n} left from an earlier plan removed" for n in [len(shards.leftovers(p))] if n]
        if not shards.same_manifest(p):
            plan.changed.add(p)
        if not stale:
            plan.add("shards", p, "up to date", ", ".join([f"{len(tasks)} shards"] + extra))
            continue
        by_reason: dict[str, list[str]] = {}
        for name, reason in stale:
            by_reason.setdefault(reason, []).append(name)
        told = [f"{_names(names)}: {reason}" for reason, names in list(by_reason.items())[:SHOWN]]
        if len(by_reason) > SHOWN:
            told.append(f"{len(by_reason) - SHOWN} other reasons")
        new = all(reason in NEW_INPUTS for _, reason in stale)
        same = "" if p in plan.changed else ("; rebuilt from the specs the manifest records: the same bytes, nothing "
                                             "after the data stage changes")
        plan.add("shards", p, f"{'write' if new else 'rebuild'}: {len(stale)} of {len(tasks)}",
                 "; ".join(told + extra) + same)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


# ---- base and training -------------------------------------------------------------------------------------------
def _plan_base(args: LaunchAllArgs, plan: Plan, base_persons: list[str]) -> str | None:
    """The base stage; returns the fingerprint of the base the avatars train on (NEW_BASE: one pretrained now)."""
    from avatars.training.base_pretraining import finished_base, full_fingerprint
    from avatars.training.base_record import base_fingerprint

    if not _needs_tiny_base(args):
        plan.add("base", None, "given", f"{args.train.base_model}, --train.base-model")
        return base_fingerprint(args.train.base_model)
    changed = sorted(set(base_persons) & plan.changed)
    if changed:
        plan.add("base", None, "pretrain", f"a new tiny base on {len(base_persons)} persons: the shard manifests of "
                                           f"{_names(changed)} change this run, and its key covers every person's")
        return NEW_BASE
    undecided = sorted(set(base_persons) & plan.undecided)
    try:
        config = tiny_base_config(args, base_persons)
        info = finished_base(config.output, full_fingerprint(config))
    except FileNotFoundError as e:  # no shard manifest yet: the data stage writes them
        plan.add("base", None, "pretrain", f"a tiny base on {len(base_persons)} persons: {e}")
        return NEW_BASE
    except (OSError, ValueError) as e:  # an unreadable pretrain_info.json: the base stage stops the run on it
        plan.add("base", None, "fails", str(e))
        return NEW_BASE
    if info is None:
        plan.add("base", None, "pretrain", f"{config.output} on {len(base_persons)} persons: no finished base of "
                                           "these settings and data")
        return NEW_BASE
    if undecided:
        plan.base_undecided = True
        plan.add("base", None, LATER, f"{config.output}, pretrained on {len(base_persons)} persons, is reused if the "
                                      f"captures of {_names(undecided)} hold the bytes their stores record (their "
                                      "manifests are then unchanged), else a new tiny base is pretrained")
    else:
        plan.add("base", None, "reuse", f"{config.output}, pretrained on {len(base_persons)} persons")
    return base_fingerprint(config.output)


def _plan_training(args: LaunchAllArgs, plan: Plan, persons: list[str],
                   fingerprint: str | None) -> tuple[list[str], set[str]]:
    """The training stage, as launch_all's `_run` decides it; returns (the persons expected to have an avatar
    afterwards, those of them trained this run)."""
    from avatars.training.checkpoint import newest_step, past_steps

    steps = args.train.steps
    mismatched = base_mismatches(args, persons, fingerprint)
    later = [p for p in persons if p in plan.changed | plan.undecided and p not in mismatched
             and fingerprint != NEW_BASE]
    rest = [p for p in persons if p not in mismatched and p not in later]
    refused = _check_resumable(args, rest)
    trained = trained_on(args, [p for p in rest if p not in refused], fingerprint)
    ok, fresh = [], set()
    for p in persons:
        checkpoints = args.workdir / "runs" / p / "checkpoints"
        if p in mismatched and not _needs_tiny_base(args):
            verdict, why = "refused", refused_base(mismatched[p])
        elif p in refused:
            verdict, why = "refused", refused[p]
        elif p in trained:
            verdict, why = "up to date", f"trained to {trained[p]['steps']} steps on this base"
        elif p in later:
            verdict, why = LATER, (("its shards are rewritten" if p in plan.changed else
                                    "its shards are rewritten if its capture's bytes changed") +
                                   ": up to date or resumed only if its training data is unchanged")
        elif p in mismatched:
            verdict, why = "retrain", f"from scratch, {steps} steps: {mismatched[p]}"
        elif args.train.resume == "never":
            verdict, why = "retrain", f"from scratch, {steps} steps: --train.resume never"
        elif problem := past_steps(checkpoints, steps):  # the trainer refuses to resume it
            verdict, why = "fails", problem
        elif reached := newest_step(checkpoints):
            verdict, why = "resume", f"from step {reached} of {steps}"
        else:
            verdict, why = "train", f"from scratch, {steps} steps"
        if plan.base_undecided and verdict not in ("train", "retrain"):
            # a new tiny base clears the person's run and retrains it from scratch
            if verdict != LATER:
                why = f"{verdict} ({why}) if the tiny base is reused, else retrained from scratch on a new one"
            plan.add("train", p, LATER, why)
            ok.append(p)
            continue
        plan.add("train", p, verdict, why)
        if verdict in ("refused", "fails"):
            continue
        ok.append(p)
        if verdict in ("train", "retrain", "resume"):
            fresh.add(p)
    return ok, fresh


# ---- evaluation --------------------------------------------------------------------------------------------------
def _plan_evaluation(args: LaunchAllArgs, plan: Plan, persons: list[str], fresh: set[str]) -> None:
    """The evaluation stage: a person whose avatar, data or driver's data changes renders; the others as the driver
    decides (`cluster.eval_driver.driver.decide`: its checks and evaluation keys), looked up without indexing any
    night."""
    import dataclasses

    from cluster.eval_driver.driver import cross_drivers, decide

    config = eval_config(args, persons)
    drivers, cross = cross_drivers(persons, config.stores), "cross_reenactment" in config.tasks
    left = []
    for p in persons:
        driver = drivers[p]
        if args.force:
            plan.add("evaluate", p, "render", "--force")
        elif p in fresh:
            plan.add("evaluate", p, "render", "its avatar is trained this run")
        elif p in plan.changed:
            plan.add("evaluate", p, "render", "its data changes this run")
        elif cross and driver in plan.changed:
            plan.add("evaluate", p, "render", f"the data of {driver}, whose codes drive it, changes this run")
        elif p in plan.undecided:
            plan.add("evaluate", p, LATER, "its data changes only if its capture's bytes changed since its last ingest")
        elif plan.base_undecided:
            plan.add("evaluate", p, LATER, "its avatar is retrained if the tiny base is pretrained again")
        elif cross and driver in plan.undecided:
            plan.add("evaluate", p, LATER, f"the data of {driver}, whose codes drive it, changes only if its "
                                           "capture's bytes changed since its last ingest")
        elif cross and plan.new_stores:
            plan.add("evaluate", p, LATER,
                     f"{_names(sorted(plan.new_stores))} get their first store: the person whose codes drive it may "
                     "change")
        else:
            left.append(p)
    if not left:
        return
    decision = decide(dataclasses.replace(config, persons=tuple(left)), dt.date.today().isoformat(), index=False)
    for p in left:
        if p in decision.bad_names or p in decision.failed:
            plan.add("evaluate", p, "fails", decision.bad_names.get(p) or decision.failed[p])
        elif p in decision.unkeyed:
            plan.add("evaluate", p, "render", f"its evaluation key is unavailable: {decision.unkeyed[p]}")
        elif p in decision.reusable:
            plan.add("evaluate", p, "up to date, reused", f"evaluated {decision.reusable[p][0].run_date}")
        else:
            plan.add("evaluate", p, "render", "no stored evaluation has its key: its model, base, data or evaluation "
                                              "settings changed, or it was never evaluated")
