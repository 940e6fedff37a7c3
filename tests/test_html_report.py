"""`runner report --html`: the report of a run with faults is one self-contained file under 2 MB, every chart
present and drawn in a real headless Chromium, its numbers the summary's; without the extra, one-line error."""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import struct
import subprocess
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.emulator import Emulator, EmulatorConfig
from runner.html_report import CHARTS, write_html_report
from runner.records import RESULT_SCHEMA
from runner.report_data import TIMELINE_COLUMNS, LogHistogram, Timeline
from tests.helpers import make_job, run_cli

MODELS = ["qwen-plus", "qwen-flash", "qwen-max"]
FAULTS = {"429": 0.06, "500": 0.03, "400": 0.01, "moderation": 0.01, "502": 0.01, "slow": 0.01}
CHART_SIZE = (864, 307)   # pixels: html_report's _SIZE at its _DPI
MAX_BYTES = 2 * 1024 * 1024
# The tests that read the faulty run share one worker under pytest-xdist (--dist loadgroup), so the
# module's run is made once, not once per worker.
ONE_WORKER = pytest.mark.xdist_group("html_report_faulty_run")


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory) -> Path:
    """The output of a 2,000-row run over three models against an emulator with 429s, 5xx and 4xx faults."""
    folder = tmp_path_factory.mktemp("faulty")
    rows = [{"id": f"row-{i:05d}", "prompt": f"Question {i}: what is {i} squared?", "model": MODELS[i % 3]}
            for i in range(2000)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with Emulator(EmulatorConfig(faults=FAULTS, latency_ms=2, latency_jitter_ms=10, slow_ms=200)) as emu:
        job = make_job(folder, emu, input={"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt",
                                           "model_column": "model"}, run={"max_attempts": 3, "max_error_rate": 1.0})
        result = run_cli("run", str(job), "--progress", "off", timeout=300)
    assert result.code == 0, result.stderr
    return folder / "out" / "result.parquet"


@pytest.fixture(scope="module")
def report(faulty_run) -> Path:
    """The HTML report of the faulty run, made by the real CLI."""
    destination = faulty_run.with_name("report.html")
    result = run_cli("report", str(faulty_run), "--html", str(destination))
    assert result.code == 0, result.stderr
    assert result.stdout.startswith(f"report     {destination} (") and "2,000 rows" in result.stdout
    return destination


class _Page(HTMLParser):
    """The tags and attributes of a page, and the text of the cells with a data-key."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cells: dict[str, str] = {}
        self.scripts: dict[str, str] = {}
        self._open: tuple[str, str] | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "td" and attributes.get("data-key"):
            self._open = ("cell", attributes["data-key"])
        elif tag == "script" and attributes.get("id"):
            self._open = ("script", attributes["id"])

    def handle_data(self, data):
        if self._open:
            kind, key = self._open
            target = self.cells if kind == "cell" else self.scripts
            target[key] = target.get(key, "") + data

    def handle_endtag(self, tag):
        if tag in ("td", "script"):
            self._open = None


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@ONE_WORKER
def test_the_report_is_one_self_contained_file_with_every_chart(report):
    """No http(s) or protocol-relative src/href, no external script or stylesheet, and each chart is a PNG data: URI."""
    assert report.stat().st_size < MAX_BYTES
    page = _parse(report)
    for tag, attributes in page.tags:
        for name in ("src", "href"):
            value = (attributes.get(name) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//", "file:")), f"<{tag} {name}={value[:60]}>"
        assert tag != "link", "a <link> loads another file"
        assert not (tag == "script" and attributes.get("src")), "a <script src> loads another file"
    sections = {a.get("id") for tag, a in page.tags if tag == "section"}
    images = [a for tag, a in page.tags if tag == "img"]
    assert {f"chart-{name}" for name in CHARTS} <= sections
    assert len(images) == len(CHARTS)
    for image in images:
        assert image["src"].startswith("data:image/png;base64,")
        assert _png_size(base64.b64decode(image["src"].split(",", 1)[1])) == CHART_SIZE


@ONE_WORKER
def test_the_reports_numbers_are_the_summarys(faulty_run, report):
    """Every figure shown, the by-model and error tables' totals and the embedded JSON equal `runner summary --json`."""
    result = run_cli("summary", str(faulty_run), "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["failed"] > 0 and len(summary["errors"]) >= 3 and summary["requests_sent"] > summary["rows"]
    page = _parse(report)
    assert json.loads(page.scripts["summary-data"]) == summary

    def value(key: str):
        node = summary
        for part in key.split("."):
            node = node[part]
        return node

    shown = {key: text.replace(",", "") for key, text in page.cells.items()}
    assert {"rows", "ok", "failed", "requests_sent", "tokens.total", "cost.spent", "latency_ms.p99",
            "duration_ms.p99"} <= shown.keys()
    for key, text in shown.items():
        expected = value(key)
        if key == "error_rate":
            assert float(text.rstrip("%")) == pytest.approx(expected * 100, abs=0.005)
        elif isinstance(expected, int):
            assert int(text) == expected, key
        else:
            assert float(text) == pytest.approx(expected, abs=0.06), key
    html_text = report.read_text(encoding="utf-8")
    for model, numbers in summary["models"].items():
        assert f"<td>{model}</td><td>{numbers['rows']:,}</td><td>{numbers['ok']:,}</td>" in html_text
    for error in summary["errors"]:
        assert (f"<td>{error['error_type']}</td><td class=\"text\">{error['error_code'] or ''}</td>"
                f"<td>{error['http_status'] or ''}</td><td>{error['rows']:,}</td>") in html_text


@ONE_WORKER
def test_report_without_html_prints_the_summary_text(faulty_run):
    """`runner report OUT` with no --html prints what `runner summary OUT` prints."""
    report_text, summary_text = run_cli("report", str(faulty_run)), run_cli("summary", str(faulty_run))
    assert report_text.code == summary_text.code == 0
    assert report_text.stdout == summary_text.stdout and "failed" in report_text.stdout


def test_without_matplotlib_the_html_report_is_a_one_line_error(tmp_path):
    """With matplotlib unimportable: `error:` and `hint: pip install ...[report]`, exit 2, no traceback, no file;
    checked before the output is read (it is not even there)."""
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named matplotlib (blocked by the test)')\n")
    destination = tmp_path / "report.html"
    result = run_cli("report", str(tmp_path / "not-read.parquet"), "--html", str(destination),
                     env={"PYTHONPATH": str(blocker.parent)})
    assert result.code == 2
    assert result.stderr.splitlines() == [
        "error: runner report --html draws its charts with matplotlib, which is not installed",
        "hint: pip install 'dashscope-batch-runner[report]'"]
    assert not destination.exists()


def test_a_missing_output_is_a_source_error(tmp_path):
    """A report of an output that is not there says so (exit 2), as `runner summary` does."""
    result = run_cli("report", str(tmp_path / "nothing.parquet"), "--html", str(tmp_path / "r.html"))
    assert result.code == 2 and result.stderr.startswith("error: ") and "file not found" in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_an_html_path_in_a_missing_folder_is_refused_before_reading(tmp_path):
    """--html into a folder that does not exist: a usage error naming it (exit 2), before the output is read."""
    result = run_cli("report", str(tmp_path / "not-read.parquet"), "--html", str(tmp_path / "no" / "r.html"))
    assert result.code == 2
    assert result.stderr.splitlines() == [f"error: --html {tmp_path / 'no' / 'r.html'}: no folder {tmp_path / 'no'}",
                                          "hint: create it, or choose another --html path"]


def _synthetic_output(path: Path, rows: int, *, span: timedelta, models: int, codes: int) -> None:
    """An output table of `rows` rows over `span`, `models` models and `codes` error codes: the worst case
    for the report's size (long time axis, many bars), written directly in the runner's schema."""
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    columns: dict[str, list] = {field.name: [] for field in RESULT_SCHEMA}
    for i in range(rows):
        failed = i % 11 == 0
        throttled = (i // 11) % 7 < 3
        finished = start + span * (i / rows)
        duration = 20.0 + (i * 7919) % 5000
        values = {
            "row_id": i, "key": f"k{i}", "model": f"model-{i % models}", "response": None if failed else "ok",
            "finish_reason": None if failed else "stop", "input_tokens": 10 + i % 50, "output_tokens": 5 + i % 90,
            "total_tokens": 15 + i % 50 + i % 90, "cost": 1e-5 * (1 + i % 7), "status": "error" if failed else "ok",
            "mode": "online", "error_type": ("Throttled" if throttled else "TransientCallError") if failed else None,
            "error_code": f"code_{i % codes}" if failed else None, "http_status": (429 if throttled else 500)
            if failed else None, "attempts": 1 + i % 4, "latency_ms": duration / 2, "duration_ms": duration,
            "started_at": finished - timedelta(milliseconds=duration), "finished_at": finished,
        }
        for name, column in columns.items():
            column.append(values.get(name))
    pq.write_table(pa.Table.from_pydict(columns, schema=RESULT_SCHEMA), path)


def test_a_20000_row_report_of_a_long_varied_run_stays_under_2_mb(tmp_path):
    """20,000 rows over 30 hours, 40 models and 60 error codes: every chart drawn, the file under 2 MB."""
    output = tmp_path / "big.parquet"
    _synthetic_output(output, 20_000, span=timedelta(hours=30), models=40, codes=60)
    data = write_html_report(output, tmp_path / "big.html")
    size = (tmp_path / "big.html").stat().st_size
    assert data.summary.rows == 20_000 and len(data.summary.models) == 40 and len(data.summary.errors) == 120
    assert data.throttled_rows == sum(1 for i in range(0, 20_000, 11) if (i // 11) % 7 < 3)
    assert size < MAX_BYTES, f"{size:,} bytes"
    assert (tmp_path / "big.html").read_text().count('src="data:image/png;base64,') == len(CHARTS)


def test_an_empty_output_still_gets_every_chart(tmp_path):
    """An output with no rows (an empty input) renders every chart, each saying it has nothing to show."""
    output = tmp_path / "empty.parquet"
    pq.write_table(RESULT_SCHEMA.empty_table(), output)
    write_html_report(output, tmp_path / "empty.html")
    text = (tmp_path / "empty.html").read_text(encoding="utf-8")
    assert text.count('src="data:image/png;base64,') == len(CHARTS)
    assert '<td data-key="rows">0</td>' in text and "No failed rows." in text


def test_an_unfinished_runs_parts_are_reported_and_said_to_be(tmp_path):
    """With no output file yet, the report reads the committed parts, as `runner summary` does, and says so."""
    output = tmp_path / "run.parquet"
    parts = tmp_path / "run.parquet.parts"
    parts.mkdir()
    _synthetic_output(parts / "part-00000.parquet", 300, span=timedelta(minutes=2), models=2, codes=3)
    data = write_html_report(output, tmp_path / "run.html")
    text = (tmp_path / "run.html").read_text(encoding="utf-8")
    assert data.summary.rows == 300 and not output.exists()
    assert "Unfinished run: read from 1 committed part;" in text and '<td data-key="rows">300</td>' in text


def test_the_timeline_stays_bounded_and_keeps_every_count():
    """Rows spread over ten days in a 64-bucket timeline: at most 64 buckets, every count kept, dense() bounded."""
    timeline = Timeline(max_buckets=64)
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    for i in range(10_000):
        timeline.add(start + timedelta(seconds=i * 86.4), (1, i % 2, 2, 1, int(i % 5 == 0)))
        assert len(timeline.buckets) <= 64
    totals = [sum(counts[c] for counts in timeline.buckets.values()) for c in range(len(TIMELINE_COLUMNS))]
    assert totals == [10_000, 5_000, 20_000, 10_000, 2_000]
    times, columns, width = timeline.dense(max_points=20)
    assert len(times) <= 21 and [sum(column[:-1]) for column in columns] == totals
    assert times[0] <= start and times[-1] >= start + timedelta(seconds=9_999 * 86.4)
    assert (times[1] - times[0]).total_seconds() == width


@pytest.mark.parametrize("ms, index", [(0.0, 0), (0.1, 0), (0.99, 9), (1.0, 10), (999.0, 39), (1000.0, 40),
                                       (45_000.0, 56)])
def test_histogram_bins_are_tenths_of_a_decade(ms, index):
    """A value lands in the log bin whose edges hold it: edge(i) <= ms < edge(i + 1) (0 and 0.1 ms in bin 0)."""
    histogram = LogHistogram()
    histogram.add(ms)
    assert dict(histogram.counts) == {index: 1}
    if ms > histogram.low:
        assert histogram.edge(index) <= ms * (1 + 1e-12) and ms < histogram.edge(index + 1)


# --- in a real browser -----------------------------------------------------------------------------------

# Appended to a copy of the report: after load, each image's decoded size, its laid-out size and the share
# of its pixels that are not white (drawn onto a canvas; data: URIs do not taint it), written into the DOM.
_CHECK = """<script>
window.addEventListener("load", () => {
  const found = [];
  for (const img of document.images) {
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth || 1; canvas.height = img.naturalHeight || 1;
    const context = canvas.getContext("2d");
    let inked = 0;
    if (img.complete && img.naturalWidth > 0) {
      context.drawImage(img, 0, 0);
      const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 0; i < pixels.length; i += 4) {
        if (pixels[i + 3] > 0 && (pixels[i] < 235 || pixels[i + 1] < 235 || pixels[i + 2] < 235)) inked++;
      }
    }
    const box = img.getBoundingClientRect();
    found.push({section: img.closest("section") ? img.closest("section").id : null, complete: img.complete,
                naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight, shownWidth: box.width,
                inked: inked / (canvas.width * canvas.height)});
  }
  const marker = document.createElement("pre");
  marker.id = "chart-check";
  marker.textContent = JSON.stringify(found);
  document.body.appendChild(marker);
});
</script>
"""
# An image whose data is broken: the check must report it as not drawn, or it could not fail.
_BROKEN = '<section id="broken"><img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAf"></section>'


def charts_as_drawn(chromium: str, report: Path, folder: Path) -> dict[str, dict]:
    """Load a copy of `report` (plus a broken image) in headless Chromium: section id -> what the check script saw."""
    page = folder / "checked.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", _BROKEN + _CHECK + "</body>"),
                    encoding="utf-8")
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            "--hide-scrollbars", f"--user-data-dir={folder / 'chromium-profile'}", "--virtual-time-budget=10000",
            "--dump-dom", page.as_uri()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(folder)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    marker = proc.stdout.split('<pre id="chart-check">', 1)
    assert len(marker) == 2, "the check script did not run: " + proc.stdout[:500]
    return {entry["section"]: entry for entry in json.loads(html.unescape(marker[1].split("</pre>", 1)[0]))}


def assert_every_chart_drawn(found: dict[str, dict]) -> None:
    """Every chart decoded at full size, laid out, with ink on it; the broken image not drawn."""
    found = dict(found)
    assert found.pop("broken")["naturalWidth"] == 0
    assert set(found) == {f"chart-{name}" for name in CHARTS}
    for section, entry in found.items():
        assert entry["complete"] and (entry["naturalWidth"], entry["naturalHeight"]) == CHART_SIZE, section
        assert entry["shownWidth"] > 400, section
        assert entry["inked"] > 0.03, f"{section}: {entry['inked']:.1%} of its pixels are not white"


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@ONE_WORKER
def test_every_chart_is_drawn_in_headless_chromium(report, tmp_path):
    """Chromium loads the report from disk (no network needed) and decodes every chart at full size with ink on it."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not installed (Debian/Ubuntu: apt-get install -y chromium)")
    assert_every_chart_drawn(charts_as_drawn(chromium, report, tmp_path))
