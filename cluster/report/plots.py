"""Metric-over-nightly-runs plots as base64 PNG, so the HTML page needs no image files for them."""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from cluster.report.aggregate import RunSummary
from cluster.report.metric_labels import higher_is_better, metric_label

#: Up to this many persons a plot draws a line (and a legend entry) per person; above, the spread over the persons
#: as bands: 300 lines and legend entries took seconds a plot and made a plot of 367x1688 px, nearly all legend,
#: whose colours repeat every 10 persons.
PERSON_LINES_MAX = 10
#: At most this many nights are named under a plot (every k-th, the reported night always): 60 names overlap.
DATE_LABELS_MAX = 12


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _nan(values: list[float | None]) -> list[float]:
    return [float("nan") if y is None else y for y in values]


def _spread(ax, x: list[int], history: list[RunSummary], persons: list[str], metric: str) -> None:
    """The persons' averages of ``metric`` per night (the values their lines would show) as two bands: 10th to 90th
    percentile and min to max (a night without any person's number in it is a gap)."""
    bands = []
    for h in history:
        ys = [v for p in persons if (v := h.person_average.get(p, {}).get(metric)) is not None]
        bands.append(np.percentile(ys, [0, 10, 90, 100]) if ys else [math.nan] * 4)
    lo, p10, p90, hi = np.asarray(bands, dtype=float).T
    ax.fill_between(x, lo, hi, color="tab:blue", alpha=0.15, linewidth=0, label="persons: min to max")
    ax.fill_between(x, p10, p90, color="tab:blue", alpha=0.35, linewidth=0, label="persons: 10th to 90th percentile")


def date_ticks(n: int, most: int = DATE_LABELS_MAX) -> list[int]:
    """The nights (indices of ``n``, oldest first) named under a plot: every k-th counted back from the newest (the
    reported night), at most ``most``."""
    step = max(1, math.ceil(n / most))
    return list(range(n - 1, -1, -step))[::-1]


def trend_plot(metric: str, history: list[RunSummary], dpi: int = 80) -> str:
    """One metric over the runs: the person-average in bold, marked n/N where it leaves persons without a number
    out, and, up to :data:`PERSON_LINES_MAX` persons, a thin line per person (in the legend), above, the spread of
    the persons' averages as bands (legend: the bands). Returns base64 PNG. Names (the metric's, for one
    results.json has but the report does not know, and the persons') are drawn as given: no text is read as
    mathtext, where "$...$" is markup and a name like "$a^$" would stop the report."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    dates = [h.run_date for h in history]
    x = list(range(len(dates)))
    fig, ax = plt.subplots(figsize=(5.2, 3.0), dpi=dpi)
    try:
        persons = sorted({p for h in history for p in h.person_average})
        if len(persons) <= PERSON_LINES_MAX:
            for p in persons:
                ys = [h.person_average.get(p, {}).get(metric) for h in history]
                ax.plot(x, _nan(ys), marker="o", markersize=3, linewidth=1, alpha=0.7, label=p)
        else:
            _spread(ax, x, history, persons, metric)
        avg = [h.overall.get(metric) for h in history]
        ax.plot(x, _nan(avg), marker="s", color="black", linewidth=2.5, markersize=4 if len(x) > 20 else 6,
                label="average")
        for i, (h, y) in enumerate(zip(history, avg)):  # an average over fewer persons than the night has
            if y is not None and h.partial(metric):
                ax.annotate(f"{h.overall_persons.get(metric, 0)}/{h.persons_total}", (i, y), xytext=(3, 3),
                            textcoords="offset points", fontsize=6, color="#8a5a00")
        arrow = "higher is better" if higher_is_better(metric) else "lower is better"
        ax.set_title(f"{metric_label(metric)} ({arrow})", fontsize=10, parse_math=False)
        ticks = date_ticks(len(dates))
        ax.set_xticks(ticks, [dates[i] for i in ticks], rotation=30, ha="right", fontsize=7, parse_math=False)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
        if len(persons) <= PERSON_LINES_MAX:
            legend = ax.legend(fontsize=6, loc="best", ncol=2)
        else:  # placed, not searched ("best" weighs every line against every place): where an improving metric
            # leaves room, the upper left when higher is better (its old nights lie low), else the lower left
            legend = ax.legend(fontsize=6, loc="upper left" if higher_is_better(metric) else "lower left",
                               framealpha=0.7)
        for text in legend.get_texts():
            text.set_parse_math(False)
        return _png_base64(fig)
    finally:
        plt.close(fig)
