"""The report page: one Jinja2 template with inline CSS (kept in Python so it ships with the package)."""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>DiffusionAvatars nightly report {{ run_date }}</title>
<style>
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
.meta { color: #666; font-size: 13px; }
table.metrics { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; background: #fff; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics thead th { background: #eef2f7; }
tr.average-row td { font-weight: bold; background: #f3f6ea; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
figure.plot { margin: 0; background: #fff; border: 1px solid #ddd; padding: 4px; }
.media { display: flex; flex-wrap: wrap; gap: 16px; }
.media figure { margin: 0; } .media figcaption { font-size: 12px; color: #555; }
img.thumb { max-height: 160px; border: 1px solid #ccc; }
video { max-width: 720px; display: block; }
ul.skipped, ul.warnings { font-size: 12px; color: #8a5a00; }
.count { font-size: 11px; font-weight: normal; color: #8a5a00; }
</style>
</head>
<body>
<h1>DiffusionAvatars nightly report {{ run_date }}</h1>
<p class="meta">Generated {{ generated_at }} from {{ n_runs }} nightly run(s){% for k, v in meta.items() %} &middot; {{ k }}: {{ v }}{% endfor %}</p>
{% if ignored %}<ul class="warnings">{% for w in ignored %}<li>ignored run: {{ w }}</li>{% endfor %}</ul>{% endif %}
{% if damaged %}<ul class="warnings damaged">{% for w in damaged %}<li>malformed entry: {{ w }}</li>{% endfor %}</ul>{% endif %}
{% if other_formats %}<ul class="warnings other-formats">{% for w in other_formats %}<li>computed by another version of the evaluation than this night's (not comparable in the trends): {{ w }}</li>{% endfor %}</ul>{% endif %}

{% macro metric_table(table_id, rows, average, first_col, coverage=none) -%}
<table class="metrics" id="{{ table_id }}">
<thead><tr><th>{{ first_col }}</th>{% for m in metrics %}<th>{{ labels[m] }}</th>{% endfor %}</tr></thead>
<tbody>
{% for name, values in rows %}<tr class="task-row" data-name="{{ name }}"><td>{{ name }}</td>{% for m in metrics %}<td>{{ fmt(m, values.get(m)) }}</td>{% endfor %}</tr>
{% endfor %}<tr class="average-row"><td>Average</td>{% for m in metrics %}<td>{{ fmt(m, average.get(m)) }}{% if coverage is not none and coverage.partial(m) %}<br><span class="count">{{ coverage.overall_persons[m] }} of {{ coverage.persons_total }} persons</span>{% endif %}</td>{% endfor %}</tr>
</tbody>
</table>
{%- endmacro %}

<section id="average">
<h2>Average over persons</h2>
{{ metric_table("table-average", summary.task_average.items(), summary.overall, "Task", summary) }}
</section>

<section id="trends">
<h2>Metrics over past nightly runs</h2>
<div class="plots">
{% for m, png, partial in plots %}<figure class="plot" data-metric="{{ m }}"><img class="plot" alt="{{ labels[m] }} over nightly runs" src="data:image/png;base64,{{ png }}">{% if partial %}<figcaption class="count">average over fewer persons: {{ partial | join("; ") }}</figcaption>{% endif %}</figure>
{% endfor %}</div>
</section>

{% for person in persons %}
<section class="person" id="person-{{ person.name }}">
<h2>{{ person.name }}</h2>
{% if person.evaluated %}<p class="meta evaluated">{{ person.evaluated }}</p>{% endif %}
{{ metric_table("table-person-" ~ person.name, summary.person_tasks[person.name].items(), summary.person_average[person.name], "Task") }}
{% if person.skipped %}<ul class="skipped">{% for s in person.skipped %}<li>{{ s }}</li>{% endfor %}</ul>{% endif %}
<div class="media">
{% for t in person.tasks %}<figure>
<figcaption>{{ t.name }}{% if t.frames %} ({{ t.frames }} frames){% endif %}</figcaption>
{% if t.thumbnail %}<img class="thumb" loading="lazy" alt="{{ person.name }} {{ t.name }} thumbnail" src="{{ t.thumbnail }}">{% endif %}
{% if t.video %}<video controls preload="metadata" src="{{ t.video }}"></video>{% endif %}
</figure>
{% endfor %}</div>
</section>
{% endfor %}
</body>
</html>
"""
