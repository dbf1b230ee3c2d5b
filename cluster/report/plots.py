"""Metric-over-nightly-runs plots as base64 PNG, so the HTML page needs no image files."""

from __future__ import annotations

import base64
import io

from cluster.report.aggregate import RunSummary
from cluster.report.metric_labels import higher_is_better, metric_label


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def trend_plot(metric: str, history: list[RunSummary], dpi: int = 80) -> str:
    """One metric over the runs: a thin line per person and the person-average in bold, marked n/N where it
    leaves persons without a number out. Returns base64 PNG. Names (the metric's, for one results.json has but
    the report does not know, and the persons') are drawn as given: no text is read as mathtext, where "$...$"
    is markup and a name like "$a^$" would stop the report."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    dates = [h.run_date for h in history]
    x = list(range(len(dates)))
    fig, ax = plt.subplots(figsize=(5.2, 3.0), dpi=dpi)
    try:
        persons = sorted({p for h in history for p in h.person_average})
        for p in persons:
            ys = [h.person_average.get(p, {}).get(metric) for h in history]
            ax.plot(x, [float("nan") if y is None else y for y in ys], marker="o", markersize=3, linewidth=1,
                    alpha=0.7, label=p)
        avg = [h.overall.get(metric) for h in history]
        ax.plot(x, [float("nan") if y is None else y for y in avg], marker="s", color="black", linewidth=2.5,
                label="average")
        for i, (h, y) in enumerate(zip(history, avg)):  # an average over fewer persons than the night has
            if y is not None and h.partial(metric):
                ax.annotate(f"{h.overall_persons.get(metric, 0)}/{h.persons_total}", (i, y), xytext=(3, 3),
                            textcoords="offset points", fontsize=6, color="#8a5a00")
        arrow = "higher is better" if higher_is_better(metric) else "lower is better"
        ax.set_title(f"{metric_label(metric)} ({arrow})", fontsize=10, parse_math=False)
        ax.set_xticks(x, dates, rotation=30, ha="right", fontsize=7, parse_math=False)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
        for text in ax.legend(fontsize=6, loc="best", ncol=2).get_texts():
            text.set_parse_math(False)
        return _png_base64(fig)
    finally:
        plt.close(fig)
