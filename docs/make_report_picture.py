"""Make docs/report.png, the README's picture of `runner report --html`: a 20,000-row run over three models
against the emulator with faults (429s, 5xx, 4xx, slow answers), its HTML report, and headless Chromium's
screenshot of it, scaled down and reduced to a palette so the picture stays small.

    .venv/bin/pip install -e '.[report]' && apt-get install -y chromium
    .venv/bin/python docs/make_report_picture.py [--rows 20000] [--keep FOLDER]

It prints the run's exit code, the report's size and the time each step took.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.bench.bench_report import faulty_run  # noqa: E402

WIDTH, SHOWN_WIDTH, HEIGHT = 960, 720, 4000   # the browser window (cropped to the page); scaled to SHOWN_WIDTH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it (default: a temporary one).")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs" / "report.png")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("chromium is not installed (apt-get install -y chromium)")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="report-picture-"))
    folder.mkdir(parents=True, exist_ok=True)
    report = make_report(folder, args.rows)
    screenshot(chromium, report, folder, args.picture)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


def make_report(folder: Path, rows: int) -> Path:
    output = faulty_run(folder, rows, latency_ms=20, jitter_ms=60, slow_ms=800)
    report = folder / "out" / "run.report.html"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "runner", "report", str(output), "--html",
                    str(report)], check=True, cwd=ROOT)
    print(f"report: {report.stat().st_size:,} bytes, {time.monotonic() - started:.1f} s")
    return report


def screenshot(chromium: str, report: Path, folder: Path, picture: Path) -> None:
    from PIL import Image, ImageChops  # matplotlib's own dependency, so the report extra brings it

    raw = folder / "screenshot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={folder / 'chromium-profile'}", f"--window-size={WIDTH},{HEIGHT}",
                    f"--screenshot={raw}", report.as_uri()], check=True, capture_output=True, timeout=120)
    with Image.open(raw) as image:
        page = image.convert("RGB")
    # The window is taller than the page: cut the white below it (the page's own margin stays).
    bottom = ImageChops.difference(page, Image.new("RGB", page.size, "white")).getbbox()[3]
    page = page.crop((0, 0, page.width, min(page.height, bottom + 24)))
    shown = page.resize((SHOWN_WIDTH, round(page.height * SHOWN_WIDTH / page.width)), Image.Resampling.LANCZOS)
    # 256 colours keep the charts' red apart from their orange (64 merged them); a third of the RGB size.
    shown.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(picture, optimize=True)
    print(f"picture: {picture} ({picture.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
