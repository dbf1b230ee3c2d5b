"""Nightly report CLI: `python -m jobs.nightly_report --reports-root /data/nightly [--run-date YYYY-MM-DD]`.

Reads `<reports_root>/runs/<YYYY-MM-DD>/results.json` (written by the renderer, jobs/render_eval.py, whose
`--run-date` names the night the same way) and writes `<reports_root>/site/<run-date>/index.html`, `report.json`,
`thumbnails/` and `videos/` (see cluster.report).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cluster.report import ReportConfig, build_report
from cluster.report.schema import parse_run_date
from common.io import DataError


def parse_args(argv: list[str] | None = None) -> ReportConfig:
    p = argparse.ArgumentParser(description="Build the DiffusionAvatars nightly HTML report.")
    p.add_argument("--reports-root", type=Path, required=True, help="folder with runs/<YYYY-MM-DD>/results.json")
    p.add_argument("--run-date", default=None,
                   help="night to report (YYYY-MM-DD, as render_eval's --run-date); default: the newest run")
    p.add_argument("--out", type=Path, default=None, help="output folder; default <reports-root>/site/<run-date>")
    p.add_argument("--max-history", type=int, default=60, help="runs shown in the trend plots")
    p.add_argument("--no-videos", action="store_true",
                   help="do not copy the mp4s next to the page (the thumbnails still are)")
    a = p.parse_args(argv)
    if a.max_history < 1:  # the report's run is always in the trends; 0 or less would slice the history oddly
        p.error(f"--max-history must be at least 1, got {a.max_history}")
    if a.run_date is not None:
        try:
            parse_run_date(a.run_date, "--run-date")
        except DataError as e:
            p.error(str(e))
    return ReportConfig(a.reports_root, a.run_date, a.out, a.max_history, copy_videos=not a.no_videos)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = parse_args(argv)
    try:
        index = build_report(config)
    except DataError as e:
        print(f"nightly_report: {e}", file=sys.stderr)
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
