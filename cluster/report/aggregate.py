"""Averages over tasks and persons, as in the paper's Table 1 (mean over persons)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.report.metric_labels import metric_order
from cluster.report.schema import RunResults, TaskResult


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _mean_dicts(dicts: list[dict[str, float | None]], names: list[str]) -> dict[str, float | None]:
    return {m: _mean([d.get(m) for d in dicts]) for m in names}


def _person_average(tasks: dict[str, TaskResult], names: list[str]) -> dict[str, float | None]:
    """Mean of each metric over the tasks that measured it (those with the metric in their numbers: not a failed or
    skipped task, nor one whose metric was skipped by design). None when one of them has no number in it (undefined
    in every frame, e.g. an empty face mask) while another has: the mean over the others alone would shift the mean
    over persons, so the person counts as without a number there, as with a failed task."""
    measured = {m: [r.metrics[m] for r in tasks.values() if m in r.metrics and not r.failed] for m in names}
    return {m: None if None in values else _mean(values) for m, values in measured.items()}


@dataclass
class RunSummary:
    """The numbers the report shows for one run.

    metrics: ordered metric names present in the run.
    tasks: ordered task names over all persons.
    person_tasks: person -> task -> metric -> value.
    person_average: person -> metric -> mean over that person's tasks (those that rendered); None where one of
        them has no number in the metric (undefined in every frame) while another has one.
    task_average: task -> metric -> mean over the persons that have the task.
    overall: metric -> mean over persons of person_average (Table 1 style), over the persons none of whose
        tasks failed.
    overall_persons: metric -> how many persons that mean covers (a person with a failed task, or with a task
        without a number in the metric, is not among them), so a mean over fewer persons than ``persons_total``
        (a jump from leaving a weak person out, or from averaging one of its tasks alone) shows as such.
    persons_total: persons in the run.
    """

    run_date: str
    metrics: list[str]
    tasks: list[str]
    person_tasks: dict[str, dict[str, dict[str, float | None]]]
    person_average: dict[str, dict[str, float | None]]
    task_average: dict[str, dict[str, float | None]]
    overall: dict[str, float | None]
    overall_persons: dict[str, int]
    persons_total: int

    def partial(self, metric: str) -> bool:
        """The average of ``metric`` leaves out persons without a number in it."""
        return self.overall_persons.get(metric, 0) < self.persons_total

    def to_json(self) -> dict:
        return {
            "run_date": self.run_date,
            "metrics": self.metrics,
            "tasks": self.tasks,
            "persons": {
                p: {"tasks": self.person_tasks[p], "average": self.person_average[p]} for p in self.person_tasks
            },
            "average": {"tasks": self.task_average, "overall": self.overall, "overall_persons": self.overall_persons,
                        "persons_total": self.persons_total},
        }


def summarize(run: RunResults) -> RunSummary:
    """Compute per-person, per-task and overall averages of one run."""
    names = metric_order({m for tasks in run.persons.values() for r in tasks.values() for m in r.metrics})
    tasks = sorted({t for ts in run.persons.values() for t in ts})
    person_tasks = {
        p: {t: {m: r.metrics.get(m) for m in names} for t, r in sorted(ts.items())}
        for p, ts in sorted(run.persons.items())
    }
    # a task whose metric is undefined (None) leaves the person without an average in it: the other tasks alone
    # would shift the mean over persons, unflagged
    person_average = {p: _person_average(run.persons[p], names) for p in person_tasks}
    task_average = {t: _mean_dicts([ts[t] for ts in person_tasks.values() if t in ts], names) for t in tasks}
    # A person with a failed task has an average over its other tasks only, which would shift the mean over
    # persons: it counts as without numbers there, like a person that failed altogether.
    complete = [a for p, a in person_average.items() if not any(r.failed for r in run.persons[p].values())]
    overall = _mean_dicts(complete, names)
    counts = {m: sum(a[m] is not None for a in complete) for m in names}
    return RunSummary(run.run_date, names, tasks, person_tasks, person_average, task_average, overall, counts,
                      len(person_average))
