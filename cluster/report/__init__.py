"""The nightly report: results.json contract (schema), averages, plots and the HTML page."""

from cluster.report.build import ReportConfig, build_report
from cluster.report.schema import SCHEMA_VERSION, RunResults, TaskResult, list_runs, run_dir

__all__ = ["SCHEMA_VERSION", "ReportConfig", "RunResults", "TaskResult", "build_report", "list_runs", "run_dir"]
