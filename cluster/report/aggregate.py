"""Averages over tasks and persons, as in the paper's Table 1 (mean over persons)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.report.metric_labels import metric_order
from cluster.report.schema import RunResults


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _mean_dicts(dicts: list[dict[str, float | None]], names: list[str]) -> dict[str, float | None]:
    return {m: _mean([d.get(m) for d in dicts]) for m in names}


@dataclass
class RunSummary:
    """The numbers the report shows for one run.

    metrics: ordered metric names present in the run.
    tasks: ordered task names over all persons.
    person_tasks: person -> task -> metric -> value.
    person_average: person -> metric -> mean over that person's tasks (those that rendered).
    task_average: task -> metric -> mean over the persons that have the task.
    overall: metric -> mean over persons of person_average (Table 1 style), over the persons none of whose
        tasks failed.
    overall_persons: metric -> how many persons that mean covers (a person with a failed task is not among
        them), so a mean over fewer persons than ``persons_total`` (a jump from leaving a weak person out, or
        from averaging one of its tasks alone) shows as such.
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
    person_average = {p: _mean_dicts(list(ts.values()), names) for p, ts in person_tasks.items()}
    task_average = {t: _mean_dicts([ts[t] for ts in person_tasks.values() if t in ts], names) for t in tasks}
    # A person with a failed task has an average over its other tasks only, which would shift the mean over
    # persons: it counts as without numbers there, like a person that failed altogether.
    complete = [a for p, a in person_average.items() if not any(r.failed for r in run.persons[p].values())]
    overall = _mean_dicts(complete, names)
    counts = {m: sum(a[m] is not None for a in complete) for m in names}
    return RunSummary(run.run_date, names, tasks, person_tasks, person_average, task_average, overall, counts,
                      len(person_average))
