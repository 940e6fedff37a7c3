"""The exception tree. A leaf module: imports nothing from runner.

Run failures are exceptions (a subclass of RunnerError reaches the CLI, which prints its
message and hint and maps it to an exit code). Row failures are data: a CallError never
reaches the CLI, the executor turns it into an error row of the output table.
"""

from __future__ import annotations


class RunnerError(Exception):
    """A problem the user can act on: shown as a message and a hint, never a traceback."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class SpecError(RunnerError):
    """The job file or a flag is invalid: unknown key, wrong type, missing key env var."""

    exit_code = 2


class SourceError(RunnerError):
    """The input file is missing or unreadable, or a named column is absent from it."""

    exit_code = 2


class SinkError(RunnerError):
    """The output cannot be written."""

    exit_code = 1


class OutputConflict(SinkError):
    """The output holds another run's work this command would not take: a finished output (without
    --overwrite or --retry-failed), an unfinished run of a different job, batches that --restart would lose
    or an online run would pay for twice. Nothing was run, so it is a usage problem (exit 2), not a stopped
    run."""

    exit_code = 2


class AuthError(RunnerError):
    """The endpoint rejects the key itself (wrong key, wrong region, workspace): no row can succeed."""

    exit_code = 1


class QuotaExhausted(RunnerError):
    """The account cannot pay for more calls (arrears, overdue bill, free quota gone)."""

    exit_code = 1


class EndpointNotFound(RunnerError):
    """The endpoint answers 404 before any request succeeded: the URL or the job's model is wrong, so
    every row would fail the same way. The run stops after the requests in flight."""

    exit_code = 1


class Interrupted(RunnerError):
    """SIGINT or SIGTERM stopped the run; what finished before it is committed and a rerun resumes."""

    exit_code = 130


class MissingExtra(RunnerError):
    """A command needs an optional extra that is not installed (the report's plotting library): nothing was
    read or written, the install is the fix."""

    exit_code = 2


class CallError(Exception):
    """One request failed. Carries what the output row records about the failure."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status
        self.request_id = request_id

    @property
    def error_type(self) -> str:
        return type(self).__name__


class TransientCallError(CallError):
    """5xx, timeouts, connection resets, truncated bodies: worth another attempt. `retry_after` is the
    server's hint in seconds (a 503 may send one), if any."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Throttled(TransientCallError):
    """429 rate, burst or token throttling."""


class BadResponse(TransientCallError):
    """A 2xx answer whose body parses but cannot be understood (no choices, no content). Retried: it is far
    more often an answer damaged on the way than a change of the API's shape, and a retry of a deterministic
    one costs at most `max_attempts` calls before the row is recorded with this type."""


class PermanentCallError(CallError):
    """The request itself is wrong (4xx): invalid parameter, moderation, unknown model."""


class NotFound(PermanentCallError):
    """404 (or "Model not exist."): `what` is "model" when the provider says the model is unknown, "path"
    when the URL itself is (a wrong base_url, a proxy without the route)."""

    def __init__(self, message: str, *, what: str = "path", **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.what = what


class InvalidRow(PermanentCallError):
    """The input row cannot be turned into a request (bad JSON, missing column, empty prompt)."""


class InvalidOutput(PermanentCallError):
    """[output] json_schema: no answer of the row was valid JSON matching the schema, after the first
    answer and every re-ask ([run] reask_attempts). Not sent again by a rerun's default
    --retry-failed transient (it had its tries; a deterministic mismatch would be paid again each
    rerun); --retry-failed all sends it again, re-asks included."""


__all__ = [
    "RunnerError",
    "SpecError",
    "SourceError",
    "SinkError",
    "OutputConflict",
    "AuthError",
    "QuotaExhausted",
    "EndpointNotFound",
    "Interrupted",
    "CallError",
    "TransientCallError",
    "Throttled",
    "PermanentCallError",
    "NotFound",
    "BadResponse",
    "InvalidRow",
    "InvalidOutput",
]
