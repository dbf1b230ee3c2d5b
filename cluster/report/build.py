"""Build the nightly report folder: index.html + report.json + videos/ + thumbnails/.

Self-contained means the folder works when copied anywhere: CSS and plots are inlined (base64), and the mp4s and the
thumbnails are copied next to the HTML (named by their content) and linked relatively (the thumbnails load lazily).
Neither is inlined as data URIs: a night's videos for many persons are hundreds of MB, and its thumbnails were
243 MB of base64 for 10 persons x 5 tasks (300 persons: gigabytes), a page no browser opens.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from cluster.report.aggregate import RunSummary, summarize
from cluster.report.metric_labels import metric_label
from cluster.report.plots import trend_plot
from cluster.report.schema import EVAL_FORMAT_KEY, RunResults, TaskResult, list_runs, parse_run_date, run_dir
from cluster.report.summary import results_stamp, summary_night, write_if_unchanged, write_summary
from cluster.report.template import PAGE
from common.io import DataError, atomic_file, atomic_write_bytes, atomic_write_json
from common.locks import exclusive

log = logging.getLogger(__name__)
REPORT_VERSION = 1
SITE_DIR = "site"
_DIGITS = {"psnr": 2, "psnr_frame": 2, "psnr_face": 2, "ssim": 4, "lpips": 4, "lpips_face": 4, "jod": 2, "cvvdp": 2,
           "colour_error": 1, "akd": 2, "csim": 3}
#: The suffixes a published thumbnail keeps; any other is published as ``.png`` (a browser sniffs an image's type).
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class ReportConfig:
    """Inputs and options of one report build.

    reports_root: folder holding `runs/<YYYY-MM-DD>/results.json` (see cluster.report.schema).
    run_date: the run to report; None = the newest run.
    out_dir: output folder; None = `<reports_root>/site/<run_date>`.
    max_history: how many runs (up to and including run_date) the trend plots show (at least 1); only they are read.
    copy_videos: copy the run's mp4s next to index.html (False = leave the page without videos).
    """

    reports_root: Path
    run_date: str | None = None
    out_dir: Path | None = None
    max_history: int = 60
    copy_videos: bool = True


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "\u2014"
    return f"{value:.{_DIGITS.get(metric.removesuffix('_masked'), 3)}f}"


#: File mode of everything published: the site must be readable by the web server.
PUBLISHED = 0o644


VIDEOS_DIR = "videos"
THUMBNAILS_DIR = "thumbnails"
#: The folders of the published media, each pruned to what the page links (:func:`_prune_media`).
MEDIA_DIRS = (VIDEOS_DIR, THUMBNAILS_DIR)


def _published_name(kind: str, person: str, task: str, digest: str, suffix: str) -> Path:
    return Path(kind) / person / f"{task}-{digest[:16]}{suffix}"


def _publish_video(src: Path, out: Path, person: str, task: str) -> str:
    """Copy ``src`` to ``<out>/videos/<person>/<task>-<sha256 prefix><suffix>`` (unless that file is there: the
    same content) and return that path relative to ``out``. Named by content, a page published again (a
    re-evaluated night) never plays its new videos under an old page's names: a publish killed before its
    ``index.html`` left the old page playing another model's videos. :func:`_prune_media` removes the old ones
    once the new page is written."""
    digest = hashlib.sha256()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    rel = _published_name(VIDEOS_DIR, person, task, digest.hexdigest(), src.suffix)
    if not (out / rel).is_file():
        with atomic_file(out / rel, mode=PUBLISHED) as tmp:
            shutil.copyfile(src, tmp)
    return rel.as_posix()


def _publish_thumbnail(data: bytes, suffix: str, out: Path, person: str, task: str) -> str:
    """Write the image ``data`` to ``<out>/thumbnails/<person>/<task>-<sha256 prefix><suffix>`` (unless that file is
    there: the same content) and return that path relative to ``out``: named by content, as the videos are
    (:func:`_publish_video`), so a page published again never shows an old page's thumbnails under its numbers."""
    suffix = suffix.lower() if suffix.lower() in _IMAGE_SUFFIXES else ".png"
    rel = _published_name(THUMBNAILS_DIR, person, task, hashlib.sha256(data).hexdigest(), suffix)
    if not (out / rel).is_file():
        atomic_write_bytes(out / rel, data, mode=PUBLISHED)
    return rel.as_posix()


def _prune_media(out: Path, keep: set[str]) -> None:
    """Remove what the page just written does not link under ``<out>/videos`` and ``<out>/thumbnails`` (earlier
    pages' files, the temporary files of a copy that was killed), with the folders left empty."""
    for kind in MEDIA_DIRS:
        folder = out / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
            try:
                if path.is_dir():
                    if not any(path.iterdir()):
                        path.rmdir()
                elif path.relative_to(out).as_posix() not in keep:
                    path.unlink()
            except OSError as e:  # the page is written; a file that stays is a warning
                log.warning("%s: could not remove an earlier page's file: %s", path, e)


def _first_frame_png(video: Path) -> bytes | None:
    """Thumbnail from the first video frame when the renderer wrote none (PNG bytes)."""
    try:
        import imageio.v2 as imageio

        reader = imageio.get_reader(str(video), format="FFMPEG")
        try:
            frame = reader.get_data(0)
        finally:
            reader.close()
        return imageio.imwrite("<bytes>", frame, format="png")
    except Exception as e:  # a broken video must not kill the whole nightly page
        log.warning("%s: cannot read a thumbnail frame: %s", video, e)
        return None


def _provenance(evaluation: dict[str, str]) -> str:
    """One line on where a person's numbers come from (the night's results merge several runs)."""
    if "evaluated_at" not in evaluation:
        return ""
    text = f"evaluated {evaluation['evaluated_at']}"
    if evaluation.get("run_id"):
        text += f" (run {evaluation['run_id']})"
    if evaluation.get("reused_from"):
        text += f"; up to date, numbers reused from the night of {evaluation['reused_from']}"
    return text


def load_history(reports_root: Path, until: str, max_history: int) -> tuple[list[RunResults], list[str]]:
    """The newest ``max_history`` valid runs up to `until` (oldest first) and the reasons runs among them were
    ignored.

    The nights are read newest first until ``max_history`` have read: older ones are not opened (every night ever
    written was read, a year of 300-person nights an hour and ~80 GB). Only the night `until` is read in full, with
    its per-frame values (``report.json`` has them); the others are read from their summaries
    (:meth:`RunResults.load_summary`: a night of 300 persons is 133 MB of JSON, its summary well under 1 MB), and
    in full (their per-frame values checked, not kept: :meth:`RunResults.load` ``per_frame``) when theirs is not
    usable (:func:`_past_night`): the same numbers, the same damaged entries.
    A night whose file does not read as a whole (not JSON, another schema version, a wrong date) is left out,
    and the night before it is read in its place (the night `until` is an error); one malformed person or task
    entry does not take its night's other persons down, in any night alike: the task counts as failed, the person
    as without numbers, and the run's ``damaged`` names the file, the person and the field (so a night shows the
    same numbers in the trends of later reports as on its own page)."""
    if max_history < 1:  # the night `until` is always in its own trend
        raise ValueError(f"max_history must be at least 1, got {max_history}")
    runs, ignored = [], []
    for path in reversed([p for p in list_runs(reports_root) if p.parent.name <= until]):
        if len(runs) == max_history:
            break
        try:
            run = RunResults.load(path, salvage=True) if path.parent.name == until else _past_night(path)
        except DataError as e:
            if path.parent.name == until:
                raise
            ignored.append(str(e))
            log.warning("ignoring run: %s", e)
            continue
        for d in run.damaged:
            log.warning("malformed entry: %s", d)
        runs.append(run)
    return runs[::-1], ignored[::-1]


def _past_night(path: Path) -> RunResults:
    """A past night of the trends (the results file ``path``) without its per-frame values: from its summary when it
    has one that matches, else read in full (a DataError when it does not read) and, when it read without a
    malformed entry, its summary written for the next reports (:func:`write_if_unchanged`)."""
    run = RunResults.load_summary(path)
    if run is not None:
        return run
    try:
        stamp = results_stamp(path)
    except OSError:  # the full read names it
        stamp = None
    run = RunResults.load(path, salvage=True, per_frame=False)
    if stamp is not None and not run.damaged:  # a damaged night's summary would not name its damage: read in full
        write_if_unchanged(path, stamp, lambda: write_summary(path, summary_night(run.to_json()), stamp), "summary")
    return run


#: In the output folder: builds of one folder take turns (:func:`build_report`).
REPORT_LOCK = ".report.lock"


def build_report(config: ReportConfig) -> Path:
    """Write index.html, report.json, videos/ and thumbnails/ for one nightly run; returns the index.html path.

    Builds into one folder take turns (a lock in it), each reading the night when its turn comes: two at once (the
    evaluation's own build beside the nightly report, two evaluations of one night finishing together) each pruned
    the media its page does not link, and the build that read the older results.json could publish last, showing
    the older numbers with the newer build's thumbnails and videos deleted."""
    root = Path(config.reports_root)
    all_runs = list_runs(root)
    if not all_runs:
        raise DataError(root / "runs", "no nightly runs found (expected runs/<YYYY-MM-DD>/results.json)")
    run_date = config.run_date or all_runs[-1].parent.name
    parse_run_date(run_date)
    current_path = run_dir(root, run_date) / "results.json"
    if not current_path.is_file():
        raise DataError(current_path, "results file of the requested run does not exist")
    out = Path(config.out_dir) if config.out_dir else root / SITE_DIR / run_date
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / REPORT_LOCK, f"building the report of {run_date}", wait=True, note_holder=False):
        return _build(config, root, run_date, out)


def _build(config: ReportConfig, root: Path, run_date: str, out: Path) -> Path:
    history, ignored = load_history(root, run_date, config.max_history)
    current = history[-1]
    damaged = [d for run in history for d in run.damaged]
    other_formats = other_format_nights(history)
    summaries = [summarize(r) for r in history]
    summary = summaries[-1]

    persons, skipped_all = [], {}
    src_dir = run_dir(root, run_date)
    for person, tasks in sorted(current.persons.items()):
        entries, skipped = [], sorted({f"{t}: {reason}" for t, r in tasks.items() for reason in r.skipped.values()})
        skipped_all[person] = {t: r.skipped for t, r in tasks.items()}
        for task, r in sorted(tasks.items()):
            entries.append(_media(r, person, task, src_dir, out, config.copy_videos, skipped))
        persons.append({"name": person, "tasks": entries, "skipped": skipped,
                        "evaluated": _provenance(current.evaluations.get(person, {}))})

    plot_metrics = [m for m in summary.metrics if any(s.overall.get(m) is not None for s in summaries)]
    plots = [(m, trend_plot(m, summaries), partial_nights(m, summaries)) for m in plot_metrics]
    generated_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()

    report = {
        "report_version": REPORT_VERSION,
        "run_date": run_date,
        "generated_at": generated_at,
        "meta": dict(current.meta),
        "current": summary.to_json(),
        "skipped": skipped_all,
        "evaluations": current.evaluations,
        "per_frame": {p: {t: r.per_frame for t, r in ts.items()} for p, ts in current.persons.items()},
        "history": [{"run_date": s.run_date, "overall": s.overall, "overall_persons": s.overall_persons,
                     "persons_total": s.persons_total, "persons": s.person_average} for s in summaries],
        "ignored_runs": ignored,
        "damaged_entries": damaged,
        "eval_format": sorted(eval_formats(current)),
        "other_eval_format_nights": other_formats,
    }
    atomic_write_json(out / "report.json", report, mode=PUBLISHED)
    html = _render(summary, summaries, persons, plots, ignored, damaged, other_formats, report["meta"], generated_at)
    atomic_write_bytes(out / "index.html", html.encode("utf-8"), mode=PUBLISHED)
    _prune_media(out, {t[kind] for p in persons for t in p["tasks"] for kind in ("video", "thumbnail") if t[kind]})
    return out / "index.html"


def _media(r: TaskResult, person: str, task: str, src_dir: Path, out: Path, copy_video: bool,
           notes: list[str]) -> dict:
    """The page's entry of one task: its thumbnail (copied to ``out``/thumbnails/, or the video's first frame when
    the renderer wrote none) and its video (copied to ``out``/videos/ with ``copy_video``), as paths relative to
    ``out`` (None: none). A file that is missing, or cannot be read or copied (an I/O error, no permission), is left
    out of the page with a note in ``notes`` (shown under the person) and a warning; the rest of the report is
    built."""
    entry = {"name": task, "frames": r.frames, "video": None, "thumbnail": None}

    def unusable(what: str, path: Path, e: OSError) -> None:
        notes.append(f"{task}: {what} {path} left out: {e.strerror or e}")
        log.warning("%s: %s left out of the report: %s", path, what, e)

    video_src = src_dir / r.video if r.video else None
    try:
        if video_src is not None and not video_src.is_file():
            notes.append(f"{task}: video {video_src} is missing")
            video_src = None
    except OSError as e:  # stat itself fails (EIO, EACCES on its folder): the video is as good as missing
        unusable("video", video_src, e)
        video_src = None
    thumb = src_dir / r.thumbnail if r.thumbnail else None
    try:
        if thumb is not None and thumb.is_file():
            entry["thumbnail"] = _publish_thumbnail(thumb.read_bytes(), thumb.suffix, out, person, task)
        elif video_src is not None and (frame := _first_frame_png(video_src)) is not None:
            entry["thumbnail"] = _publish_thumbnail(frame, ".png", out, person, task)
    except OSError as e:  # reading the thumbnail or writing it next to the page
        unusable("thumbnail", thumb if thumb is not None else video_src, e)
    if video_src is not None and copy_video:
        try:
            entry["video"] = _publish_video(video_src, out, person, task)
        except OSError as e:
            unusable("video", video_src, e)
    return entry


def eval_formats(run: RunResults) -> set[str]:
    """The versions of the evaluation (:data:`EVAL_FORMAT_KEY`) that computed the numbers of ``run``'s persons."""
    return {run.evaluations.get(p, {}).get(EVAL_FORMAT_KEY, "not recorded") for p in run.persons}


def other_format_nights(history: list[RunResults]) -> list[str]:
    """The nights of ``history`` whose numbers another version of the evaluation computed (other metrics, other
    videos) than the reported night's (the last), as "date: versions": a trend across them compares numbers that
    were computed differently."""
    current = eval_formats(history[-1])
    return [f"{run.run_date}: {', '.join(sorted(eval_formats(run)))}"
            for run in history if eval_formats(run) != current]


def partial_nights(metric: str, summaries: list[RunSummary]) -> list[str]:
    """The nights whose average of ``metric`` covers fewer persons than the night has, as "date: n of N persons"
    (shown under the trend plot: a jump there may be a person left out, not a better model)."""
    return [f"{s.run_date}: {s.overall_persons.get(metric, 0)} of {s.persons_total} persons"
            for s in summaries if s.overall.get(metric) is not None and s.partial(metric)]


def _render(summary: RunSummary, summaries: list[RunSummary], persons: list[dict],
            plots: list[tuple[str, str, list[str]]],
            ignored: list[str], damaged: list[str], other_formats: list[str], meta: dict[str, str],
            generated_at: str) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(PAGE).render(
        run_date=summary.run_date, generated_at=generated_at, n_runs=len(summaries), meta=meta, ignored=ignored,
        damaged=damaged, other_formats=other_formats,
        summary=summary, metrics=summary.metrics, labels={m: metric_label(m) for m in summary.metrics},
        fmt=_fmt, plots=plots, persons=persons,
    )
