"""A wrong endpoint stops the run at its first answers instead of failing every row.

The rule, for a 404 (or the native "Model not exist." 400) from the chat endpoint:

- the provider says the model is unknown, for one of the job's own models ([model] name or --model, or
  any of [model] names), and no request for that model has succeeded in this run: the job is wrong,
  stop the run (EndpointNotFound);
- the same for a model a row names itself (model_column): only that row fails (error_type NotFound),
  so one misspelled model among good ones costs its own rows, not the run;
- a 404 that does not name the model (the path is unknown: a wrong base_url, a proxy without the
  route) before any request has succeeded in this run: stop the run;
- any 404 after that model (or, for a path 404, any request) has succeeded: a row error as before,
  since the URL and the model are proven right and the answer is about this row.

Stopping is a RunnerError raised from the client, which the online executor's workers already turn into a
stop: no new row is started, only the requests already in flight are spent (at most `concurrency`),
and the rows they carried are not written, so the rerun after the fix sends them.

The guard also takes the API key out of every error message the endpoint sends back (a proxy may
quote the Authorization header it refused), since those messages go to the output and the terminal.
"""

from __future__ import annotations

from typing import Protocol

from .clients.transport_errors import scrub
from .endpoints import CHAT_PATHS, DIALECT_ROOTS, ApiKey
from .errors import CallError, EndpointNotFound, NotFound, RunnerError
from .records import Completion, Request


class _Client(Protocol):
    url: str

    async def complete(self, request: Request) -> Completion: ...


class EndpointGuard:
    """Wraps a chat client (ChatClient) with the rule above; everything else passes through."""

    __slots__ = ("_client", "_dialect", "_job_models", "_path_works", "_models_work", "_secret")

    def __init__(self, client: _Client, *, dialect: str, job_models: tuple[str, ...],
                 api_key: ApiKey | None = None) -> None:
        self._client = client
        self._secret = api_key.reveal() if api_key is not None else ""
        self._dialect = dialect
        self._job_models = frozenset(job_models)
        self._path_works = False
        self._models_work: set[str] = set()

    def __repr__(self) -> str:
        return f"EndpointGuard({self._client!r})"

    @property
    def url(self) -> str:
        return self._client.url

    async def complete(self, request: Request) -> Completion:
        try:
            completion = await self._client.complete(request)
        except NotFound as error:
            self._scrub(error)
            stop = self.verdict(error, request.model)
            if stop is None:
                raise
            raise stop from error
        except (CallError, RunnerError) as error:
            self._scrub(error)
            raise
        if request.model not in self._models_work:
            self._models_work.add(request.model)
            self._path_works = True
        return completion

    def _scrub(self, error: CallError | RunnerError) -> None:
        """Replace the key wherever the endpoint's answer quoted it (message, hint, args), in every spelling
        the transports' own messages are scrubbed of (as is, escaped, percent-encoded): one mask, `***`."""
        secret = self._secret
        if not secret:
            return
        error.message = scrub(error.message, (secret,))
        error.args = tuple(scrub(a, (secret,)) if isinstance(a, str) else a for a in error.args)
        if isinstance(error, RunnerError) and error.hint:
            error.hint = scrub(error.hint, (secret,))

    def verdict(self, error: NotFound, model: str) -> EndpointNotFound | None:
        """The run-level error when this 404 means the job is wrong; None when it is only this row's."""
        said = f"HTTP {error.http_status}" + (f" {error.code}" if error.code else "") + \
            (f": {error.message}" if error.message else "")
        if error.what == "model":
            if model not in self._job_models or model in self._models_work:
                return None
            if len(self._job_models) > 1:
                # The other models' answers may be committed, and a changed model list is another job.
                again = "then run again with --restart (rows the other models already answered are sent again)"
            else:
                again = "then run the same command again"
            return EndpointNotFound(
                f"model {model!r} not found at {self.url} ({said})",
                hint="check the model name ([model] name, names or --model; names are case-sensitive) and that "
                     f"this region serves it, {again}")
        if self._path_works:
            return None
        dialect = self._dialect
        return EndpointNotFound(
            f"no such endpoint: POST {self.url} answered {said}",
            hint=f"base_url should end at {DIALECT_ROOTS['openai']} (openai dialect) or {DIALECT_ROOTS['dashscope']} "
                 f"(dashscope dialect); the runner appends {CHAT_PATHS[dialect]}. Fix [endpoint] base_url (or "
                 "--base-url), check it with `runner validate`, then run the same command again")
