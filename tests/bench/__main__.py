"""Comparative benchmark: `runner run` against hand-written clients, on the project's emulator over loopback.

    python -m tests.bench [--quick] [--json bench-results.json] [--requests 20000]
                          [--latency-ms 0 500] [--concurrency 64 1024] [--contenders runner floor openai httpx]
                          [--memory-rows 1000000 100000] [--max-seconds 300] [--skip-memory] [--skip-startup]

Needs the `bench` extra (`pip install -e '.[bench]'`: the openai SDK and aiohttp). Run from the
repository root. What it measures, in one invocation:

- Throughput, for every emulator latency x concurrency (default 0/500 ms x 64/1,024, 20,000
  requests each; --quick: 2,000), of four contenders side by side, each in its own process:
    runner  `runner run JOB --quiet --overwrite` end to end: reads the JSONL input, full retry
            machinery, writes Parquet. The job sets `adaptive_rate = false`, so the runner does not
            pace itself (slow start from 10 req/s) against an emulator that has no limit.
    floor   the simplest asyncio + aiohttp loop (tests/bench/compare.py): what the machine allows.
    openai  `AsyncOpenAI` with default settings, `asyncio.Semaphore` over `gather`: the hand-written pattern.
    httpx   the same pattern over plain `httpx.AsyncClient` (pool sized to the concurrency).
  For each: requests/s (the runner's from its summary, `this_run.rows_per_second`; the others'
  over their request loop), the ratio to the ideal (concurrency / latency; none at 0 ms), the
  ratio to the floor of the same scenario, CPU ms per request of the whole client process and its
  peak RSS (both from os.wait4 on that child, imports and Parquet writing included).
- Memory: `runner run` over a 1,000,000-row and a 100,000-row JSONL input (--memory-rows; --quick:
  100,000 and 10,000) against the 0 ms emulator: the runner's peak RSS for each.
- Startup: wall time of `runner --help` and `runner validate jobs/quickstart.toml`, median of 5.

Prints a table and each target from the issue with whether it was met (it asserts nothing), and
writes everything to --json (rewritten after every measurement, so an interrupted run keeps what
it measured). Bounded: a fixed number of requests, no contender request starts after
--max-seconds, every child has a timeout, and the emulator is always stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.bench.harness import ROOT, start_emulator, stop_emulator, write_job

ENV = {**os.environ, "DASHSCOPE_API_KEY": "sk-bench"}
CONTENDERS = ("runner", "floor", "openai", "httpx")


def run_child(cmd: list[str], timeout: float) -> dict:
    """Run one child to the end (killed after `timeout` s); its exit code, wall time, stdout and its own rusage."""
    killed = threading.Event()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=err)

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            # wait4, not wait: it gives this child's own CPU and peak RSS (RUSAGE_CHILDREN's ru_maxrss
            # is the maximum over every child ever reaped, so it cannot be taken per child).
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return {"rc": proc.returncode, "timed_out": killed.is_set(), "wall_s": round(wall, 3),
                "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_mb": round(usage.ru_maxrss / 1024, 1),
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


def runner_command() -> list[str]:
    """The `runner` console script of this interpreter's environment, else `python -m runner`."""
    script = Path(sys.executable).with_name("runner")
    return [str(script)] if script.exists() else [sys.executable, "-m", "runner"]


def write_input(folder: Path, rows: int) -> None:
    """`rows` prompts, the same text tests/bench/compare.py sends for each request number."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "prompts.jsonl", "w") as fh:
        for i in range(rows):
            prompt = f"Benchmark prompt number {i}, please answer briefly."
            fh.write(json.dumps({"id": f"r{i}", "prompt": prompt}) + "\n")


def measure_runner(folder: Path, url: str, name: str, concurrency: int, rows: int, timeout: float) -> dict:
    job = write_job(folder, url, name, concurrency=concurrency, adaptive_rate=False)
    child = run_child([*runner_command(), "run", str(job), "--quiet", "--overwrite"], timeout)
    row = {"contender": "runner", "requests": rows, "wall_s": child["wall_s"], "maxrss_mb": child["maxrss_mb"]}
    summary_path = folder / f"{name}.summary.json"
    if child["rc"] != 0 or not summary_path.exists():
        why = "timed out" if child["timed_out"] else f"exit {child['rc']}: {child['stderr'][-300:].strip()}"
        return {**row, "ok": 0, "errors": rows, "complete": False, "req_per_s": 0.0, "note": why,
                "cpu_ms_per_req": None}
    summary = json.loads(summary_path.read_text())
    ok = summary["ok"]
    (folder / f"{name}.parquet").unlink(missing_ok=True)  # 1M-row outputs add up; only the figures matter
    return {**row, "ok": ok, "errors": rows - ok, "complete": ok == rows,
            "req_per_s": summary["this_run"]["rows_per_second"], "run_s": summary["this_run"]["wall_seconds"],
            "cpu_ms_per_req": round(child["cpu_s"] * 1000 / max(ok, 1), 3)}


def measure_contender(contender: str, url: str, requests: int, concurrency: int, max_seconds: float) -> dict:
    cmd = [sys.executable, "-m", "tests.bench.compare", "--contender", contender, "--url", url,
           "--requests", str(requests), "--concurrency", str(concurrency), "--max-seconds", str(max_seconds)]
    # The contender stops starting requests at max_seconds; the margin lets the last ones finish.
    child = run_child(cmd, max_seconds + 120)
    try:
        line = json.loads(child["stdout"].strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        why = "timed out" if child["timed_out"] else f"exit {child['rc']}: {child['stderr'][-300:].strip()}"
        return {"contender": contender, "requests": requests, "ok": 0, "errors": requests, "complete": False,
                "req_per_s": 0.0, "cpu_ms_per_req": None, "maxrss_mb": child["maxrss_mb"], "note": why}
    line.pop("maxrss_mb_self", None)
    return {**line, "wall_s": child["wall_s"], "maxrss_mb": child["maxrss_mb"],
            "cpu_ms_per_req": round(child["cpu_s"] * 1000 / max(line["ok"], 1), 3)}


def scenarios(args: argparse.Namespace, results: dict, save) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        folder = Path(tmp)
        write_input(folder, args.requests)
        for latency in args.latency_ms:
            emulator, url = start_emulator(latency)
            try:
                for concurrency in args.concurrency:
                    ideal = concurrency / (latency / 1000) if latency else None
                    rows = []
                    # The floor first: the others are compared with it.
                    for contender in sorted(args.contenders, key=lambda c: c != "floor"):
                        if contender == "runner":
                            row = measure_runner(folder, url, f"runner-{latency:g}-{concurrency}", concurrency,
                                                 args.requests, 2 * args.max_seconds + 60)
                        else:
                            row = measure_contender(contender, url, args.requests, concurrency, args.max_seconds)
                        row.update(latency_ms=latency, concurrency=concurrency,
                                   ideal_req_per_s=round(ideal, 1) if ideal else None,
                                   ratio_to_ideal=round(row["req_per_s"] / ideal, 3) if ideal else None)
                        rows.append(row)
                        floor = next((r["req_per_s"] for r in rows if r["contender"] == "floor"), None)
                        for r in rows:
                            r["ratio_to_floor"] = round(r["req_per_s"] / floor, 3) if floor else None
                        results["scenarios"].append(row)
                        save()
                        print(f"  latency {latency:g} ms, concurrency {concurrency}, {contender}: "
                              f"{row['req_per_s']:,.0f} req/s, {row['ok']}/{row['requests']} ok"
                              f"{', ' + row['note'] if row.get('note') else ''}", file=sys.stderr, flush=True)
            finally:
                stop_emulator(emulator)


def memory(args: argparse.Namespace, results: dict, save) -> None:
    emulator, url = start_emulator(0.0)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
            # The small input first: if the large one is interrupted, the small figure is still there.
            for rows in sorted(args.memory_rows):
                folder = Path(tmp) / str(rows)
                write_input(folder, rows)
                # About 500 rows/s would be a third of the slowest expected rate; past that, stop.
                row = measure_runner(folder, url, "memory", args.memory_concurrency, rows, 120 + rows / 500)
                row.update(rows=rows, concurrency=args.memory_concurrency)
                results["memory"].append(row)
                save()
                print(f"  memory, {rows:,} rows: peak RSS {row['maxrss_mb']} MB, {row['req_per_s']:,.0f} rows/s"
                      f"{', ' + row['note'] if row.get('note') else ''}", file=sys.stderr, flush=True)
                (folder / "prompts.jsonl").unlink()
    finally:
        stop_emulator(emulator)


def startup(results: dict, save) -> None:
    for name, extra in (("runner --help", ["--help"]), ("runner validate jobs/quickstart.toml",
                                                         ["validate", "jobs/quickstart.toml"])):
        walls = []
        for _ in range(5):
            child = run_child([*runner_command(), *extra], 60)
            walls.append(child["wall_s"])
        results["startup"][name] = {"median_s": round(statistics.median(walls), 3), "runs_s": walls,
                                    "last_exit": child["rc"]}
        save()
        print(f"  startup, {name}: median {statistics.median(walls):.3f} s", file=sys.stderr, flush=True)


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it was met (None: not measured)."""
    def pick(contender: str, latency: float, concurrency: int) -> dict | None:
        return next((r for r in results["scenarios"] if r["contender"] == contender
                     and r["latency_ms"] == latency and r["concurrency"] == concurrency), None)

    out = []
    runner, floor, sdk = pick("runner", 500, 1024), pick("floor", 500, 1024), pick("openai", 500, 1024)
    ratio = runner["req_per_s"] / floor["req_per_s"] if runner and floor and floor["req_per_s"] else None
    out.append({"target": "c1024/500ms: runner >= 60% of the bare floor", "value": ratio and f"{ratio:.0%}",
                "met": None if ratio is None else ratio >= 0.6})
    ratio = runner["req_per_s"] / sdk["req_per_s"] if runner and sdk and sdk["req_per_s"] else None
    out.append({"target": "c1024/500ms: runner >= 4x the openai SDK pattern", "value": ratio and f"{ratio:.2f}x",
                "met": None if ratio is None else ratio >= 4})
    cpu = {f"{r['latency_ms']:g}ms/c{r['concurrency']}": r["cpu_ms_per_req"] for r in results["scenarios"]
           if r["contender"] == "runner" and r["cpu_ms_per_req"] is not None}
    out.append({"target": "runner CPU per request all-in <= 1.5 ms (every scenario)",
                "value": ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()) or None,
                "met": all(v <= 1.5 for v in cpu.values()) if cpu else None})
    mem = {r["rows"]: r["maxrss_mb"] for r in results["memory"] if r["complete"]}
    big, small = (max(mem), min(mem)) if len(mem) == 2 else (None, None)
    out.append({"target": f"peak RSS for {format(big, ',') if big else 'the large input'} rows <= 300 MB",
                "value": big and f"{mem[big]} MB", "met": None if not big else mem[big] <= 300})
    growth = mem[big] / mem[small] - 1 if big else None
    out.append({"target": "large-input peak RSS within 20% of the small one",
                "value": big and f"{mem[big]} vs {mem[small]} MB ({growth:+.0%})",
                "met": None if growth is None else growth <= 0.2})
    help_s = results["startup"].get("runner --help", {}).get("median_s")
    out.append({"target": "runner --help < 0.5 s", "value": help_s and f"{help_s:.3f} s",
                "met": None if help_s is None else help_s < 0.5})
    return out


def report(results: dict) -> None:
    print(f"\n{'latency':>7} {'conc':>5} {'contender':>9} {'ok/requests':>13} {'req/s':>8} {'ideal':>7} "
          f"{'x ideal':>7} {'x floor':>7} {'cpu ms/req':>10} {'rss MB':>7}")
    for r in results["scenarios"]:
        print(f"{r['latency_ms']:>5g}ms {r['concurrency']:>5} {r['contender']:>9} "
              f"{str(r['ok']) + '/' + str(r['requests']):>13} {r['req_per_s']:>8,.0f} "
              f"{(format(r['ideal_req_per_s'], ',.0f') if r['ideal_req_per_s'] else '-'):>7} "
              f"{(format(r['ratio_to_ideal'], '.2f') if r['ratio_to_ideal'] is not None else '-'):>7} "
              f"{(format(r['ratio_to_floor'], '.2f') if r.get('ratio_to_floor') is not None else '-'):>7} "
              f"{(format(r['cpu_ms_per_req'], '.3f') if r['cpu_ms_per_req'] is not None else '-'):>10} "
              f"{r['maxrss_mb']:>7}{'  ' + r['note'] if r.get('note') else ''}")
    for r in results["memory"]:
        print(f"memory: {r['rows']:>9,} rows, concurrency {r['concurrency']}: peak RSS {r['maxrss_mb']} MB, "
              f"{r['req_per_s']:,.0f} rows/s, {r['ok']:,} ok, {r['wall_s']:.0f} s"
              f"{'  ' + r['note'] if r.get('note') else ''}")
    for name, s in results["startup"].items():
        print(f"startup: {name}: median {s['median_s']:.3f} s of {len(s['runs_s'])} (exit {s['last_exit']})")
    print()
    for t in results["targets"]:
        verdict = {True: "MET   ", False: "MISSED", None: "n/a   "}[t["met"]]
        print(f"{verdict} {t['target']}: {t['value'] or 'not measured'}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 requests; memory 100,000/10,000 rows")
    parser.add_argument("--requests", type=int, help="per contender and scenario (default 20,000)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 500.0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="a contender starts no request after this long (the runner is killed after twice that)")
    parser.add_argument("--memory-rows", type=int, nargs=2, metavar=("LARGE", "SMALL"),
                        help="input sizes of the memory scenario (default 1,000,000 100,000)")
    parser.add_argument("--memory-concurrency", type=int, default=64)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    args = parser.parse_args()
    args.requests = args.requests or (2000 if args.quick else 20000)
    args.memory_rows = args.memory_rows or ([100_000, 10_000] if args.quick else [1_000_000, 100_000])

    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "notes": ["runner jobs set [run] adaptive_rate = false: no self-pacing against the unlimited emulator",
                         "cpu_ms_per_req and maxrss_mb: the whole client process (os.wait4), imports included"],
               "scenarios": [], "memory": [], "startup": {}, "targets": []}

    def save() -> None:
        results["targets"] = targets(results)
        args.json.write_text(json.dumps(results, indent=2) + "\n")

    try:
        if not args.skip_startup:
            startup(results, save)
        scenarios(args, results, save)
        if not args.skip_memory:
            memory(args, results, save)
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", file=sys.stderr)
    finally:
        save()
        report(results)
        print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
