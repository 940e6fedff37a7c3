"""The `runner` command: parses flags, applies them to the job, calls the library, owns progress and exit codes.

Heavy modules (pyarrow, httpx, the job and its executors) are imported inside the commands so `runner --help` is fast.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Callable

import click

from .errors import RunnerError

# The one table of exit codes.
EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_TOO_MANY_FAILED = 3
EXIT_INTERRUPTED = 130

EMULATOR_KEY = "sk-emulator-local"


def _funnel(command: Callable[..., int | None]) -> Callable[..., None]:
    """Turn RunnerErrors into a message, a hint and an exit code; bugs keep their traceback with --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> None:
        try:
            code = command(*args, **kwargs)
        except RunnerError as error:
            if debug:
                raise
            click.echo(f"error: {error.message}", err=True)
            if error.hint:
                click.echo(f"hint: {error.hint}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; committed rows are kept, run the same command again to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code or EXIT_OK)

    return click.option("--debug", is_flag=True, help="Show tracebacks for errors.")(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dashscope-batch-runner", prog_name="runner")
def main() -> None:
    """Push a file of prompts through DashScope (or any OpenAI-compatible endpoint) into a Parquet table."""


def _job_overrides(func: Callable) -> Callable:
    options = [
        click.option("--output", type=click.Path(dir_okay=False), help="Output Parquet path (overrides [output] path)."),
        click.option("--concurrency", type=int, help="Requests in flight at once (overrides [run] concurrency)."),
        click.option("--limit", type=int, help="Only the first N input rows."),
        click.option("--model", help="Model name (overrides [model] name; per-row model columns still win)."),
        click.option("--base-url", help="Endpoint base URL, e.g. http://127.0.0.1:8000/compatible-mode/v1."),
        click.option("--max-error-rate", type=float,
                     help="Exit 3 when more than this fraction of a model's rows failed (each model on its own; default [run] "
                          "max_error_rate, 0)."),
        click.option("--executor", type=click.Choice(["online", "batch", "ray"]),
                     help="How rows are sent: one request each (online), through the Batch API at batch prices "
                          "(batch), or by actors on a Ray cluster (ray; needs the runner[ray] extra). Overrides "
                          "[run] executor."),
        click.option("--mode", type=click.Choice(["online", "batch"]), help="The older name of --executor."),
        click.option("--ray-address", metavar="ADDRESS",
                     help="--executor ray: the cluster to join (auto, or the head's HOST:6379); default: a local "
                          "Ray started for the run (overrides [run] ray_address)."),
        click.option("--max-attempts", type=int, help="Attempts per row before it is recorded as failed."),
        click.option("--max-cost", type=float,
                     help="Hard budget in the price table's currency (overrides [run] max_cost)."),
        click.option("--rpm", type=float, help="Requests per minute allowed per model (overrides [run] rpm)."),
        click.option("--tpm", type=float, help="Tokens per minute allowed per model (overrides [run] tpm)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


_fail_on_empty_option = click.option(
    "--fail-on-empty", is_flag=True, help="Exit 2 when the input has no rows (else a warning), e.g. for cron.")


def _check_not_empty(spec, fail: bool) -> None:
    from .sources import check_not_empty

    warning = check_not_empty(spec.input, spec.model, fail=fail or spec.input.fail_on_empty)
    if warning:
        click.echo(f"warning: {warning}", err=True)


def _load(job: str, **overrides: Any):
    from .spec import load_job

    return load_job(job).override(**overrides)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_job_overrides
@click.option("--dry-run", is_flag=True, help="Render every request into <output>.requests.jsonl (no key) and send nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an output file left by a finished run.")
@click.option("--restart", is_flag=True, help="Discard an unfinished run's committed rows and start over.")
@click.option("--retry-failed", type=click.Choice(["transient", "all", "none"]),
              help="Which failed rows of an earlier, unfinished run a rerun sends again: throttled and transient "
                   "ones (the default online), all, or none (the default in batch mode).")
@click.option("--emulator", "use_emulator", is_flag=True,
              help="Rehearse against the built-in DashScope emulator on loopback (no key, no network).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no log lines and no summary.")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "bar", "log", "off"]), default="auto",
              show_default=True, help="How progress is shown on stderr: a bar, log lines (cron, CI), or not at all; "
                                      "auto: a bar on a terminal, log lines otherwise.")
@click.option("--log-every", type=click.FloatRange(min=0.1), default=30.0, show_default=True, metavar="SECONDS",
              help="Seconds between progress log lines (there is always one at the start and one at the end).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Progress log lines as text or as one JSON object a line.")
@_fail_on_empty_option
@_funnel
def run(job: str, overwrite: bool, restart: bool, retry_failed: str | None, use_emulator: bool, quiet: bool,
        dry_run: bool, progress_mode: str, log_every: float, log_format: str, fail_on_empty: bool,
        **overrides: Any) -> int:
    """Send every row of JOB and write the results to Parquet (resumes an unfinished run)."""
    import gc

    import anyio

    from .job import run_job
    from .progress import Progress, resolve_mode, run_with_progress

    spec = _load(job, **overrides)
    _check_not_empty(spec, fail_on_empty)
    if dry_run:
        from .validate import validate_job, write_dry_run

        path, count = write_dry_run(spec)
        if not quiet:
            click.echo(validate_job(spec, show=5).render(), err=True)
        click.echo(f"dry run: {count:,} request bodies written to {path}; nothing was sent", err=True)
        return EXIT_OK
    emulator = None
    api_key = None
    if use_emulator:
        from .emulator import Emulator, EmulatorConfig
        from .endpoints import ApiKey

        # Batches take a second a phase instead of minutes to hours, and are checked every half second.
        emulator = Emulator(EmulatorConfig(batch_time_scale=60.0, batch_phase_seconds=60.0)).start()
        base = emulator.openai_base_url if spec.endpoint.dialect == "openai" else emulator.dashscope_base_url
        spec = spec.override(base_url=base)
        spec = dataclasses.replace(spec, endpoint=dataclasses.replace(spec.endpoint, emulator=True))
        if spec.run.mode == "batch":
            spec = spec.override(batch_poll_seconds=0.5)
        api_key = ApiKey(EMULATOR_KEY)
        if not quiet:
            click.echo(f"rehearsing against the built-in emulator at {base}", err=True)
    from .cost import PriceBook

    currency = PriceBook(spec.endpoint.region, job_model=spec.model.name, overrides=spec.model.prices).currency
    progress = Progress(resolve_mode(progress_mode, quiet=quiet, stream=sys.stderr), log_every=log_every,
                        log_format=log_format, currency=currency)
    # The requests in flight hold a few hundred objects each, and a run leaves almost no cyclic garbage
    # (about one object a row), so the default threshold (700 new objects) only had the GC walk the same
    # live objects over and over: 2,400 collections and a third of the CPU for 20,000 rows at 1,024 in flight.
    gc.set_threshold(50_000)
    try:
        summary = anyio.run(run_with_progress, progress, functools.partial(
            run_job, spec, api_key=api_key, on_start=progress.start, on_result=progress.update,
            on_notice=None if quiet else progress.notice, overwrite=overwrite, restart=restart,
            retry_failed=retry_failed, handle_signals=True))
    finally:
        progress.close()
        if emulator is not None:
            emulator.stop()
    if not quiet:
        click.echo(summary.render(), err=True)
        click.echo(f"summary    {spec.output.summary_path}", err=True)
    crossed = summary.error_rate_breaches(spec.run.max_error_rate)  # each model on its own
    for model, share in crossed:
        which = f"model {model}: " if model and len(summary.models) > 1 else ""
        click.echo(f"error: {which}{share.failed:,} of {share.rows:,} rows failed ({share.error_rate:.2%}), more than "
                   f"--max-error-rate {spec.run.max_error_rate:g} allows", err=True)
    if crossed:
        return EXIT_TOO_MANY_FAILED
    return EXIT_OK


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_job_overrides
@click.option("--problems", "show", type=int, default=10, show_default=True, help="How many problem rows to list.")
@_fail_on_empty_option
@_funnel
def validate(job: str, show: int, fail_on_empty: bool, **overrides: Any) -> int:
    """Read JOB and its whole input, render every request, report problems. Sends nothing."""
    from .validate import validate_job

    spec = _load(job, **overrides)
    _check_not_empty(spec, fail_on_empty)
    report = validate_job(spec, show=show)
    click.echo(report.render())
    if report.output_unwritable:  # the code `runner run` would stop with
        click.echo(f"error: {spec.output.path.parent}: output folder is not writable ({report.output_unwritable})",
                   err=True)
        click.echo("hint: choose another --output, or make the folder writable", err=True)
        return EXIT_FATAL
    if report.rows and report.invalid / report.rows > spec.run.max_error_rate:
        return EXIT_TOO_MANY_FAILED
    return EXIT_OK


def _batch_api_call(spec, call, *, attempts: int | None = None):
    """Run `call(api)` against the job's Batch API; the key as `runner run` finds it. `attempts`: per call
    (default: the Batch API's own, five over about 15 s)."""
    import anyio

    from .batch.api import BatchApi
    from .endpoints import resolve_api_key

    api_key = resolve_api_key(spec.endpoint)

    async def main_():
        async with BatchApi(spec.endpoint, api_key, **({} if attempts is None else {"attempts": attempts})) as api:
            return await call(api)

    return anyio.run(main_)


def _batch_job(job: str, output: str | None, base_url: str | None):
    """The job and its batch state, pointed at the endpoint the run that created the batches recorded
    (a --base-url given here wins): the batches live there, not on the job file's default host."""
    from .batch.pending import load_state

    spec = _load(job, output=output, base_url=base_url)
    state = load_state(spec)
    recorded = state.endpoint or {}
    if recorded.get("emulator") and base_url is None:
        spec = dataclasses.replace(spec, endpoint=dataclasses.replace(spec.endpoint, emulator=True))
    elif base_url is None and recorded.get("base_url") and recorded.get("dialect", spec.endpoint.dialect) \
            == spec.endpoint.dialect:
        spec = spec.override(base_url=recorded["base_url"])
    return spec, state


EMULATOR_GONE = ("these batches ran in the built-in emulator of a `runner run --emulator` rehearsal, which "
                 "stopped with it")


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--output", type=click.Path(dir_okay=False), help="Output Parquet path (overrides [output] path).")
@click.option("--base-url", help="Endpoint base URL (default: the one the run that created the batches used).")
@click.option("--offline", is_flag=True, help="Show what the last run recorded; ask the server nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the output's state and its batches as JSON (always).")
@_funnel
def status(job: str, output: str | None, base_url: str | None, offline: bool, as_json: bool) -> int:
    """Show each batch of JOB (batch mode): its state and request counts, fresh from the server. Never waits."""
    import json

    from .batch.pending import describe_batches, job_command
    from .endpoints import base_url as endpoint_url

    spec, state = _batch_job(job, output, base_url)
    live = state.live
    if live and not offline and spec.endpoint.emulator:
        offline = True
        click.echo(f"{EMULATOR_GONE}: showing what the run recorded", err=True)
    if live and not offline:
        from .endpoints import resolve_api_key
        from .errors import SpecError

        try:
            resolve_api_key(spec.endpoint)
        except SpecError as error:  # its message names the variable or file, never the key
            offline = True
            click.echo(f"{error.message}: showing what the last run recorded", err=True)
    asked = bool(live) and not offline
    server_error = None
    if asked:
        async def refresh(api):
            for record in live:
                record.update(await api.retrieve(record.batch_id))
        try:
            # Shown, not saved: the state belongs to the run. Two attempts: status answers in seconds, never waits.
            _batch_api_call(spec, refresh, attempts=2)
        except RunnerError as error:
            if not as_json:
                raise
            # A script reading --json gets JSON even now: what the run recorded, and why the server was not asked.
            asked, server_error = False, error.message
    finished = spec.output.path.exists()
    if as_json:
        shown = {"output": str(spec.output.path), "finished": finished,
                 "endpoint": "emulator" if spec.endpoint.emulator else endpoint_url(spec.endpoint),
                 "from_server": asked, "running": len(state.live), "batches": describe_batches(state)}
        if server_error is not None:
            shown["server_error"] = server_error
        click.echo(json.dumps(shown, indent=2))
        return EXIT_OK if server_error is None else EXIT_FATAL
    if not state.records:
        where = "finished: " if finished else "no batches recorded for "
        click.echo(f"{where}{spec.output.path}")
        return EXIT_OK
    rerun = job_command(spec, "run")
    for record in state.records:
        step = "joined into the output" if record.joined else "downloaded, not joined yet" if record.downloaded \
            else f"waiting for `{rerun}` to pick it up" if record.terminal or record.status in (None, "rejected") \
            else "running"
        click.echo(f"{record.describe()}  ({step})")
    click.echo(f"{len(state.records)} batch(es), {len(state.live)} running; "
               f"output {spec.output.path}")
    return EXIT_OK


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--output", type=click.Path(dir_okay=False), help="Output Parquet path (overrides [output] path).")
@click.option("--base-url", help="Endpoint base URL (default: the one the run that created the batches used).")
@_funnel
def cancel(job: str, output: str | None, base_url: str | None) -> int:
    """Cancel the running batches of JOB. The next `runner run JOB` joins what they finished."""
    from .batch.pending import job_command

    spec, state = _batch_job(job, output, base_url)
    live = state.live
    if not live:
        click.echo(f"no running batches for {spec.output.path}")
        return EXIT_OK
    if spec.endpoint.emulator:
        raise RunnerError(f"{spec.output.path}: {EMULATOR_GONE}; nothing can be cancelled",
                          hint=f"`{job_command(spec, 'status', '--offline')}` shows what the run recorded")
    cancelled: list[str] = []
    failed: list[str] = []

    async def cancel_all(api):
        for record in live:
            try:
                record.update(await api.cancel(record.batch_id))
            except RunnerError as error:  # one batch's failure must not hide the others' outcome
                failed.append(record.name)
                click.echo(f"{record.name}: {record.batch_id} not cancelled ({error.message})")
            else:
                cancelled.append(record.name)
                click.echo(f"{record.name}: {record.batch_id} {record.status}")

    _batch_api_call(spec, cancel_all)
    if cancelled:
        click.echo(f"run `{job_command(spec, 'run')}` to join what {', '.join(cancelled)} finished; their other "
                   "rows are recorded as cancelled", err=True)
    if failed:
        click.echo(f"error: {len(failed)} of {len(live)} batch(es) not cancelled ({', '.join(failed)}); "
                   + (f"cancelled: {', '.join(cancelled)}" if cancelled else "none was cancelled"), err=True)
        click.echo(f"hint: they keep running; `{job_command(spec, 'cancel')}` tries again, "
                   f"`{job_command(spec, 'status')}` shows them", err=True)
        return EXIT_FATAL
    return EXIT_OK


@main.command()
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_funnel
def summary(output: str, as_json: bool) -> int:
    """Counts by status and error class, tokens, latency percentiles and throughput of an OUTPUT file."""
    import json

    from .report import summarize_file

    result = summarize_file(output)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.render())
    return EXIT_OK


@main.command()
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--html", "html_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write a self-contained HTML report (charts and numbers) to FILE; needs the report extra.")
@_funnel
def report(output: str, html_path: str | None) -> int:
    """The report of an OUTPUT file: with --html, one HTML file of charts and numbers; without, the summary text."""
    if html_path is None:
        from .report import summarize_file

        click.echo(summarize_file(output).render())
        return EXIT_OK
    from pathlib import Path

    from .html_report import write_html_report

    data = write_html_report(output, html_path)
    click.echo(f"report     {html_path} ({Path(html_path).stat().st_size / 1024:,.0f} KB, {data.summary.rows:,} rows)")
    return EXIT_OK


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on (0 picks a free one).")
@click.option("--latency-ms", default=0.0, show_default=True, type=float, help="Delay before every answer.")
@click.option("--jitter-ms", default=0.0, show_default=True, type=float, help="Extra random delay, 0 to this.")
@click.option("--fault", "faults", multiple=True, metavar="NAME=RATE",
              help="Inject a fault into this fraction of attempts, e.g. --fault 429=0.1 --fault 500=0.05.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the deterministic fault draw.")
@click.option("--retry-after", type=float, help="Send Retry-After with 429s (the real API sends none).")
@click.option("--retry-after-503", type=float, metavar="S", help="Send Retry-After with 503s (the real API sends none).")
@click.option("--fail-first", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="Answer the first N requests that pass the rate limits with --fail-first-fault.")
@click.option("--fail-first-fault", default="429", show_default=True, metavar="NAME",
              help="The fault --fail-first sends (a --fault name).")
@click.option("--limit-schedule", metavar="S:F,...",
              help="Scale every rate limit by F from S seconds after the first request, e.g. 30:0.5,60:1 "
                   "halves the limits at 30 s and restores them at 60 s.")
@click.option("--request-log", is_flag=True,
              help="Keep a log of every request (arrival, answer, status, row key) at /_emulator/stats?log=1.")
@click.option("--stream-chunks", default=8, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Cut each streamed answer (reasoning, then content) into at most N frames.")
@click.option("--chunk-delay-ms", default=0.0, show_default=True, type=click.FloatRange(min=0), metavar="MS",
              help="Pause between stream frames.")
@click.option("--native-stream-errors", default="200", show_default=True, type=click.Choice(["200", "4xx"]),
              help="How a native stream reports an error before its first frame: HTTP 200 with an "
                   "event:error frame, or the real 4xx status with an SSE-framed body.")
@click.option("--rpm", type=click.FloatRange(min=0, min_open=True), metavar="N",
              help="Requests per minute per model, enforced per second (RPM/60 per second). Default: no limit.")
@click.option("--tpm", type=click.FloatRange(min=0, min_open=True), metavar="N",
              help="Tokens (input + output) per minute per model, enforced per second. Default: no limit.")
@click.option("--limit", "limits", multiple=True, metavar="MODEL=RPM:TPM",
              help="Per-model override of --rpm/--tpm, e.g. --limit qwen-max=120:100000; an empty side "
                   "keeps the global value, inf lifts it.")
@click.option("--burst-factor", type=click.FloatRange(min=1), metavar="F",
              help="Answer Throttling.BurstRate when a model's requests in the last second exceed F times "
                   "those of the second before (floor: RPS/10). Default: off.")
@click.option("--batch-time-scale", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              metavar="X", help="Batch API: emulated seconds per real second (3600 makes a 24h window pass in "
                                "24 s).")
@click.option("--batch-phase-seconds", default=60.0, show_default=True, type=click.FloatRange(min=0), metavar="S",
              help="Batch API: emulated seconds each phase (validating, in_progress, finalizing) lasts.")
@click.option("--batch-line-faults", default=0.0, show_default=True, type=click.FloatRange(0, 1), metavar="RATE",
              help="Batch API: share of lines sent to the error file as 500s (fixed by seed and custom_id).")
@click.option("--batch-fail-validation", is_flag=True, help="Batch API: every batch fails validation.")
@click.option("--batch-expire-after", type=click.FloatRange(0, 1), metavar="F",
              help="Batch API: every batch expires once this fraction of its lines is done (the rest go to "
                   "the error file as batch_expired). Default: batches complete.")
@_funnel
def emulator(host: str, port: int, latency_ms: float, jitter_ms: float, faults: tuple[str, ...], seed: int,
             retry_after: float | None, retry_after_503: float | None, fail_first: int, fail_first_fault: str,
             limit_schedule: str | None, request_log: bool, stream_chunks: int, chunk_delay_ms: float, native_stream_errors: str,
             rpm: float | None, tpm: float | None, limits: tuple[str, ...], burst_factor: float | None,
             batch_time_scale: float, batch_phase_seconds: float, batch_line_faults: float,
             batch_fail_validation: bool, batch_expire_after: float | None) -> int:
    """Serve a local stand-in for DashScope (both dialects, and the files and batches API) for rehearsals,
    tests and benchmarks."""
    from .emulator import (EmulatorConfig, FaultRates, parse_fault_spec, parse_limit_schedule, parse_limit_spec,
                           run_forever)

    try:
        parsed = FaultRates(dict(parse_fault_spec(text) for text in faults))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    try:
        per_model = dict(parse_limit_spec(text) for text in limits)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--limit") from None
    try:
        schedule = parse_limit_schedule(limit_schedule) if limit_schedule else ()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--limit-schedule") from None
    try:
        config = EmulatorConfig(latency_ms=latency_ms, latency_jitter_ms=jitter_ms, faults=parsed, seed=seed,
                                retry_after=retry_after, retry_after_503=retry_after_503, fail_first=fail_first,
                                fail_first_fault=fail_first_fault, limit_schedule=schedule, request_log=request_log,
                                stream_chunks=stream_chunks, chunk_delay_ms=chunk_delay_ms,
                                native_stream_error_status=native_stream_errors, rpm=rpm, tpm=tpm,
                                limits=per_model, burst_factor=burst_factor, batch_time_scale=batch_time_scale,
                                batch_phase_seconds=batch_phase_seconds, batch_line_fault_rate=batch_line_faults,
                                batch_fail_validation=batch_fail_validation,
                                batch_expire_after_fraction=batch_expire_after)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    run_forever(config, host, port)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    main()
