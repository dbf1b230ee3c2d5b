"""Nightly evaluation driver: every person's evaluation set rendered on the Serve renderer,
metrics, comparison videos, results.json and the report (see `driver`, `person` and `tasks`)."""

from cluster.eval_driver.driver import EvalDriverConfig, EvalSummary, run_evaluation
from cluster.eval_driver.person import merge_evaluations
from cluster.eval_driver.tasks import TASKS

__all__ = ["TASKS", "EvalDriverConfig", "EvalSummary", "merge_evaluations", "run_evaluation"]
