"""`runner report OUTPUT --html FILE`: one self-contained HTML file with the charts and numbers of a run.

The charts are drawn by matplotlib (the `report` extra) off-screen with its Agg renderer, to PNG, and
embedded as base64 data: URIs: the file needs no network, no script and no other file, opens in any
browser or mail client, and its size does not grow with the rows (a PNG's size depends on the picture,
an SVG's on the number of points). The data comes from `report_data.collect_report`: one streamed pass.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import MissingExtra, SinkError, SpecError
from .files import os_reason, remove_quietly
from .report_data import FAILED, OK, REQUESTS, RETRIES, THROTTLED, LogHistogram, ReportData, collect_report

# Every chart the report holds, in page order: id -> title. Each is drawn even when it has nothing to show.
CHARTS = {
    "throughput": "Throughput over time",
    "throttling": "429s and retries over time",
    "latency": "Latency (ok rows, last attempt)",
    "duration": "Row duration (first send to end, retries and waits included)",
    "models": "Tokens and cost by model",
    "errors": "Errors by class and code",
}
_DPI = 96
_SIZE = (9.0, 3.2)   # inches: 864 x 307 pixels, about 20-40 KB a chart
_OK_COLOR, _FAILED_COLOR, _ACCENT = "#4c78a8", "#e45756", "#f58518"


def require_plotting() -> None:
    """Fail early, before reading anything, when the plotting library is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingExtra("runner report --html draws its charts with matplotlib, which is not installed",
                           hint="pip install 'dashscope-batch-runner[report]'") from exc


def write_html_report(output: str | Path, destination: str | Path) -> ReportData:
    """Read `output` (or an unfinished run's parts) and write the report to `destination`, whole or not at all."""
    require_plotting()
    destination = Path(destination)
    _check_destination(destination)  # before the read, which can take a while
    data = collect_report(output)
    page = render_html(data)
    temporary = destination.with_name("." + destination.name + ".tmp")
    try:
        temporary.write_text(page, encoding="utf-8")
        os.replace(temporary, destination)
    except OSError as exc:
        remove_quietly(temporary)
        raise SinkError(f"{destination}: cannot write the report ({os_reason(exc)})",
                        hint="free disk space or choose another --html path, then run the same command again") from exc
    return data


def _check_destination(destination: Path) -> None:
    folder = destination.parent
    if destination.is_dir():
        raise SpecError(f"--html {destination}: is a folder", hint="give a file name, e.g. --html report.html")
    if not folder.is_dir():
        raise SpecError(f"--html {destination}: no folder {folder}", hint="create it, or choose another --html path")
    if not os.access(folder, os.W_OK):
        raise SpecError(f"--html {destination}: the folder {folder} is not writable", hint="choose another --html path")


def render_html(data: ReportData) -> str:
    charts = {name: _png_data_uri(draw(data)) for name, draw in _DRAWERS.items()}
    summary = data.summary.to_dict()
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [f'<section id="chart-{name}"><h2>{html.escape(title)}</h2>'
                f'<img class="chart" alt="{html.escape(title)}" src="{charts[name]}" '
                f'width="{int(_SIZE[0] * _DPI)}" height="{int(_SIZE[1] * _DPI)}">'
                f'{_NOTES[name](data)}</section>' for name, title in CHARTS.items()]
    return _PAGE.format(
        title=html.escape(f"Run report: {Path(summary['output'] or 'output').name}"),
        output=html.escape(summary["output"] or ""),
        generated=generated,
        unfinished=_unfinished(data.summary.unfinished_parts),
        figures=_figures(summary),
        sections="\n".join(sections),
        models=_models_table(data, summary),
        errors=_errors_table(summary),
        text=html.escape(data.summary.render()),
        # Inert data for scripts that read the report; "</" escaped so it cannot close the element.
        summary_json=json.dumps(summary, sort_keys=True).replace("</", "<\\/"),
    )


def _unfinished(parts: int | None) -> str:
    if parts is None:
        return ""
    return (f'<p class="warn">Unfinished run: read from {parts:,} committed part{"" if parts == 1 else "s"}; rows '
            f'still in flight or only in a journal are not counted.</p>')


# The run's numbers: (data-key, label, value from the summary dict, format).
def _figures(summary: dict[str, Any]) -> str:
    cost = summary["cost"]
    rows = [
        ("rows", "rows", summary["rows"], "{:,}"),
        ("ok", "ok", summary["ok"], "{:,}"),
        ("failed", "failed", summary["failed"], "{:,}"),
        ("error_rate", "error rate", summary["error_rate"], "{:.2%}"),
        ("requests_sent", "requests sent", summary["requests_sent"], "{:,}"),
        ("tokens.total", "tokens", summary["tokens"]["total"], "{:,}"),
        ("cost.spent", "cost" + (f" ({cost['currency']})" if cost["currency"] else ""), cost["spent"], "{:,.4f}"),
        ("rows_per_second", "rows/s", summary["rows_per_second"], "{:,}"),
        ("wall_seconds", "over seconds", summary["wall_seconds"], "{:,}"),
        *((f"latency_ms.{k}", f"latency {k} (ms)", v, "{:,.1f}") for k, v in summary["latency_ms"].items()),
        *((f"duration_ms.{k}", f"duration {k} (ms)", v, "{:,.1f}") for k, v in summary["duration_ms"].items()),
    ]
    cells = "".join(f'<tr><th>{html.escape(label)}</th><td data-key="{key}">'
                    f'{"-" if value is None else fmt.format(value)}</td></tr>' for key, label, value, fmt in rows)
    return f'<table class="figures">{cells}</table>'


def _models_table(data: ReportData, summary: dict[str, Any]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(model or '(none)')}</td><td>{m['rows']:,}</td><td>{m['ok']:,}</td>"
        f"<td>{m['failed']:,}</td><td>{data.model_tokens.get(model, _ZERO).input_tokens:,}</td>"
        f"<td>{data.model_tokens.get(model, _ZERO).output_tokens:,}</td><td>{m['total_tokens']:,}</td>"
        f"<td>{m['cost']:,.4f}</td></tr>" for model, m in summary["models"].items())
    return ('<table class="grid"><tr><th>model</th><th>rows</th><th>ok</th><th>failed</th><th>input tokens</th>'
            f'<th>output tokens</th><th>total tokens</th><th>cost</th></tr>{body}</table>')


def _errors_table(summary: dict[str, Any]) -> str:
    if not summary["errors"]:
        return "<p>No failed rows.</p>"
    body = "".join(f"<tr><td>{html.escape(e['error_type'])}</td><td class=\"text\">{html.escape(e['error_code'] or '')}</td>"
                   f"<td>{e['http_status'] or ''}</td><td>{e['rows']:,}</td></tr>" for e in summary["errors"])
    return ('<table class="grid"><tr><th>class</th><th>code</th><th>HTTP status (codeless errors)</th><th>rows</th>'
            f'</tr>{body}</table>')


# --- charts --------------------------------------------------------------------------------------------

def _figure(rows: int = 1, columns: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False).ravel()


def _png_data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _empty(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="#666666")
    axes.set_xticks([])
    axes.set_yticks([])


def _time_axis(axes) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(tz=timezone.utc)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=timezone.utc))
    axes.set_xlabel("finished at (UTC)")
    axes.grid(alpha=0.3)


def _draw_throughput(data: ReportData):
    figure, (axes,) = _figure()
    times, columns, width = data.timeline.dense()
    if not times:
        _empty(axes, "no row has a finish time")
        return figure
    ok = [n / width for n in columns[OK]]
    failed = [n / width for n in columns[FAILED]]
    axes.stackplot(times, ok, failed, step="post", colors=[_OK_COLOR, _FAILED_COLOR], labels=["ok rows/s", "failed rows/s"])
    axes.step(times, [n / width for n in columns[REQUESTS]], where="post", color="#333333", linewidth=1,
              label="requests/s (counted when their row finished)")
    axes.set_ylabel(f"per second ({width:g} s buckets)")
    figure.legend(loc="outside upper center", ncols=3, fontsize="small", frameon=False)
    _time_axis(axes)
    return figure


def _draw_throttling(data: ReportData):
    figure, (axes,) = _figure()
    times, columns, width = data.timeline.dense()
    if not times:
        _empty(axes, "no row has a finish time")
        return figure
    axes.step(times, columns[RETRIES], where="post", color=_ACCENT, label="retries (extra attempts, any cause)")
    axes.step(times, columns[THROTTLED], where="post", color=_FAILED_COLOR, linewidth=2,
              label="rows that gave up on a 429")
    axes.set_ylabel(f"rows per {width:g} s bucket")
    figure.legend(loc="outside upper center", ncols=2, fontsize="small", frameon=False)
    _time_axis(axes)
    return figure


def _histogram(axes, series: list[tuple[LogHistogram, str, str]], percentiles: dict[str, float | None]) -> None:
    indexes = [i for histogram, _, _ in series for i in histogram.counts]
    low, high = min(indexes), max(indexes) + 1
    edges = [series[0][0].edge(i) for i in range(low, high + 1)]
    bottom = [0] * (high - low)
    for histogram, label, color in series:
        heights = [histogram.counts.get(i, 0) for i in range(low, high)]
        axes.bar(edges[:-1], heights, width=[b - a for a, b in zip(edges, edges[1:])], bottom=bottom, align="edge",
                 color=color, label=label, edgecolor="white", linewidth=0.3)
        bottom = [a + b for a, b in zip(bottom, heights)]
    axes.set_xscale("log")
    axes.set_xlabel("milliseconds (log scale)")
    axes.set_ylabel("rows")
    for (name, value), style in zip(percentiles.items(), (":", "--", "-")):
        if value is not None and value > 0:
            axes.axvline(value, color="#333333", linestyle=style, linewidth=1, label=f"{name} {value:,.0f} ms")
    axes.figure.legend(loc="outside upper center", ncols=5, fontsize="small", frameon=False)
    axes.grid(alpha=0.3, axis="y")


def _draw_latency(data: ReportData):
    figure, (axes,) = _figure()
    if not data.latency_ok.counts:
        _empty(axes, "no ok row with a latency")
    else:
        _histogram(axes, [(data.latency_ok, "ok rows", _OK_COLOR)], data.summary.latency_percentiles())
    return figure


def _draw_duration(data: ReportData):
    figure, (axes,) = _figure()
    if not (data.duration_ok.counts or data.duration_failed.counts):
        _empty(axes, "no row with a duration" + ("" if data.has_duration else " (an output from before duration_ms)"))
    else:
        _histogram(axes, [(data.duration_ok, "ok rows", _OK_COLOR), (data.duration_failed, "failed rows", _FAILED_COLOR)],
                   data.summary.duration_percentiles())
    return figure


def _draw_models(data: ReportData):
    figure, (tokens, cost) = _figure(1, 2)
    models = sorted(data.summary.models.items(), key=lambda kv: -kv[1].rows)[:12]
    if not models:
        _empty(tokens, "no rows")
        _empty(cost, "no rows")
        return figure
    names = [name or "(none)" for name, _ in models][::-1]
    inputs = [data.model_tokens.get(name, _ZERO).input_tokens for name, _ in models][::-1]
    outputs = [data.model_tokens.get(name, _ZERO).output_tokens for name, _ in models][::-1]
    tokens.barh(names, inputs, color=_OK_COLOR, label="input")
    tokens.barh(names, outputs, left=inputs, color=_ACCENT, label="output")
    tokens.set_xlabel("tokens")
    figure.legend(loc="outside upper center", ncols=2, fontsize="small", frameon=False)
    cost.barh(names, [m.cost for _, m in models][::-1], color="#54a24b")
    cost.set_xlabel(f"cost ({data.summary.currency})" if data.summary.currency else "cost")
    for axes in (tokens, cost):
        axes.grid(alpha=0.3, axis="x")
    return figure


def _draw_errors(data: ReportData):
    figure, (axes,) = _figure()
    errors = data.summary.errors.most_common(12)
    if not errors:
        _empty(axes, "no failed rows")
        return figure
    labels = [f"{kind} {code}".strip() + (f" (HTTP {status})" if status else "") for (kind, code, status), _ in errors]
    axes.barh(labels[::-1], [n for _, n in errors][::-1], color=_FAILED_COLOR)
    axes.set_xlabel("rows" + (f" (top 12 of {len(data.summary.errors)} classes)" if len(data.summary.errors) > 12 else ""))
    axes.tick_params(axis="y", labelsize="small")
    axes.grid(alpha=0.3, axis="x")
    return figure


_DRAWERS = {"throughput": _draw_throughput, "throttling": _draw_throttling, "latency": _draw_latency,
            "duration": _draw_duration, "models": _draw_models, "errors": _draw_errors}


class _Zero:
    input_tokens = output_tokens = 0


_ZERO = _Zero()


# --- what each chart can and cannot tell ------------------------------------------------------------

def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _throughput_note(data: ReportData) -> str:
    text = ("Rows are placed at the time they finished. A request is counted when its row finished, so a row "
            "retried over a long time adds its attempts at its end.")
    if data.rows_without_time:
        text += f" {data.rows_without_time:,} rows were never sent (invalid rows) and are not on the timeline."
    if data.summary.this_run is not None:
        text += " This output holds several runs: the gaps between them are on the time axis."
    return _note(text)


def _throttling_note(data: ReportData) -> str:
    answers = data.throttled_answers
    told = (f"The run's summary JSON counts {sum(answers.values()):,} 429 answers ("
            + ", ".join(f"{html.escape(code)} {n:,}" for code, n in sorted(answers.items(), key=lambda kv: -kv[1]))
            + "), for the last run only and not over time." if answers else
            "No 429 answers were recorded in the run's summary JSON." if answers == {} else
            "There is no summary JSON for this output's rows, so the number of 429 answers is unknown.")
    return _note(f"The table keeps each row's last attempt: {_rows(data.throttled_rows)} gave up on a 429, and "
                 f"{_rows(data.retried_rows)} needed more than one attempt, for a 429, a 5xx or a timeout alike "
                 f"(the table does not say which). {told}")


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")


def _latency_note(data: ReportData) -> str:
    return _note("The last attempt of each ok row: time spent in earlier attempts and in back-off is not in it "
                 "(see row duration).")


def _duration_note(data: ReportData) -> str:
    return _note("Every sent row, failed ones included, from its first send to its end: retries, back-off and "
                 "rate-limit waits included.")


def _models_note(data: ReportData) -> str:
    more = len(data.summary.models) - 12
    return (_note(f"The 12 models with most rows are drawn; {more:,} more are in the table.") if more > 0 else "")


def _errors_note(data: ReportData) -> str:
    return _note("Failed rows by the class the runner gave them and the provider's code; codeless errors by HTTP "
                 "status.")


_NOTES = {"throughput": _throughput_note, "throttling": _throttling_note, "latency": _latency_note,
          "duration": _duration_note, "models": _models_note, "errors": _errors_note}

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 900px;
       padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.4em; margin-bottom: 0.2em; }}
h2 {{ font-size: 1.1em; margin: 1.6em 0 0.4em; }}
.meta, .note {{ color: #555; font-size: 0.9em; }}
.warn {{ background: #fff4d6; padding: 0.4em 0.6em; }}
img.chart {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
table.figures th {{ text-align: left; font-weight: normal; color: #555; padding: 0.15em 1.2em 0.15em 0; }}
table.figures td {{ text-align: right; font-variant-numeric: tabular-nums; padding: 0.15em 0; }}
table.grid th, table.grid td {{ border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: right; }}
table.grid th:first-child, table.grid td:first-child, table.grid td.text {{ text-align: left; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="meta">{output}<br>report made {generated}</p>
{unfinished}
<section id="numbers"><h2>The run's numbers</h2>
{figures}
</section>
{sections}
<section id="models"><h2>By model</h2>
{models}
</section>
<section id="errors"><h2>Errors</h2>
{errors}
</section>
<section id="summary"><h2>Summary (as <code>runner summary</code> prints it)</h2>
<pre>{text}</pre>
</section>
<script type="application/json" id="summary-data">{summary_json}</script>
</body>
</html>
"""
