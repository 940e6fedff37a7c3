"""Where requests go: regions -> hosts, dialect paths, headers, and the API key (kept secret)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from .endpoint_names import (KEY_ENV_LOOKS_LIKE_KEY, REGION_ALIASES, REGION_HOSTS, REGION_IDS,  # noqa: F401
                             key_env_problem, looks_like_key, resolve_host)
from .errors import SpecError

if TYPE_CHECKING:  # annotations only
    from .spec import EndpointSpec

DIALECT_ROOTS = {"openai": "/compatible-mode/v1", "dashscope": "/api/v1"}
CHAT_PATHS = {"openai": "/chat/completions", "dashscope": "/services/aigc/text-generation/generation"}
# Paths a user may copy from an API reference into base_url; the runner appends its own.
APPENDED_PATHS = (*CHAT_PATHS.values(), "/services/aigc/multimodal-generation/generation")

USER_AGENT = "dashscope-batch-runner/0.1"


def base_url(endpoint: "EndpointSpec") -> str:
    """The dialect's base URL, as the provider's own SDK takes it (up to /v1 or /api/v1)."""
    if endpoint.base_url:
        return endpoint.base_url.rstrip("/")
    return resolve_host(endpoint.region, endpoint.workspace) + DIALECT_ROOTS[endpoint.dialect]


def batch_base_url(endpoint: "EndpointSpec") -> str:
    """Where the files and batches API lives: compatible mode on the job's host, whatever its dialect
    (API facts 7.1), e.g. https://dashscope-intl.aliyuncs.com/compatible-mode/v1."""
    if endpoint.dialect == "openai":
        return base_url(endpoint)
    if endpoint.base_url:
        url = endpoint.base_url.rstrip("/")
        return url.removesuffix(DIALECT_ROOTS["dashscope"]) + DIALECT_ROOTS["openai"]
    return resolve_host(endpoint.region, endpoint.workspace) + DIALECT_ROOTS["openai"]


def chat_url(endpoint: "EndpointSpec") -> str:
    return base_url(endpoint) + CHAT_PATHS[endpoint.dialect]


@dataclass(frozen=True)
class BaseUrlProblem:
    """What is wrong with a base_url and the URL that fixes it. `certain`: the mistake is unambiguous
    (a path the runner appends, the other dialect's root), so `runner run` refuses it; otherwise
    `runner validate` only warns."""

    problem: str
    fixed: str
    certain: bool


def base_url_problem(endpoint: "EndpointSpec") -> BaseUrlProblem | None:
    """A base_url that would put the chat request on a path the API does not serve, with its fix."""
    if not endpoint.base_url:
        return None
    url = fixed = endpoint.base_url.rstrip("/")
    problems = []
    appended = next((path for path in APPENDED_PATHS if fixed.endswith(path)), None)
    if appended:
        fixed = fixed[: -len(appended)]
        problems.append(f"it ends in {appended}, which the runner appends itself")
    own = DIALECT_ROOTS[endpoint.dialect]
    other = next(name for name in DIALECT_ROOTS if name != endpoint.dialect)
    if fixed.endswith(DIALECT_ROOTS[other]):
        fixed = fixed[: -len(DIALECT_ROOTS[other])] + own
        problems.append(f"{DIALECT_ROOTS[other]} is the root of the {other} dialect, not of dialect "
                        f"{endpoint.dialect} (or set dialect = \"{other}\")")
    if problems:
        return BaseUrlProblem("; ".join(problems), fixed, certain=True)
    host, _, path = url.partition("//")[2].partition("/")
    if host.split(":")[0].endswith(".aliyuncs.com") and "/" + path != own:
        # A DashScope host answers only under the dialect roots; a proxy's own paths are its business.
        return BaseUrlProblem(f"DashScope serves dialect {endpoint.dialect} under {own}", f"{url.partition('//')[0]}//"
                              f"{host}{own}", certain=False)
    return None


def check_base_url(endpoint: "EndpointSpec") -> None:
    """Refuse a base_url that is certainly wrong, before anything is sent (SpecError naming the fix)."""
    found = base_url_problem(endpoint)
    if found is not None and found.certain:
        raise SpecError(f"[endpoint] base_url {endpoint.base_url}: {found.problem}",
                        hint=f'set base_url = "{found.fixed}" (or pass --base-url {found.fixed}); the runner '
                             f"appends {CHAT_PATHS[endpoint.dialect]}")


class ApiKey:
    """An API key that does not show itself: repr, str and format print a mask."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "ApiKey('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self):
        raise TypeError("ApiKey is not picklable; resolve it again where it is used")


# --- the key: where it comes from, and what is refused before anything is sent ------------------------
# Messages about a key or about api_key_env's value name the variable or the file and what is wrong,
# never the value: a key pasted in the wrong place must not end up in a terminal, a CI log or a file.

def key_problem(value: str) -> str | None:
    """Why a key cannot go into an Authorization header, without repeating it: a line break, a tab or
    another control character, a space inside it, or a non-ASCII character (often an invisible one
    copied from a web page, such as U+200B)."""
    for position, char in enumerate(value, 1):
        if char in "\r\n":
            return f"contains a line break at position {position}"
        if char == "\t":
            return f"contains a tab at position {position}"
        if ord(char) < 32 or ord(char) == 127:
            return f"contains a control character at position {position} (U+{ord(char):04X})"
        if char == " ":
            return f"contains a space at position {position}"
        if not char.isascii():
            return f"contains a non-ASCII character at position {position} (U+{ord(char):04X})"
    return None


def resolve_api_key(endpoint: "EndpointSpec", environ: Mapping[str, str] | None = None) -> ApiKey:
    """The key from the named env var, else from [endpoint] api_key_file. SpecError when neither has one,
    or when the one found cannot be sent as it is."""
    problem = key_env_problem(endpoint.api_key_env)
    if problem:  # a spec built without load_job; never echo the value
        raise SpecError(f"[endpoint] api_key_env: {problem}")
    environ = os.environ if environ is None else environ
    value = environ.get(endpoint.api_key_env, "").strip()
    if value:
        problem = key_problem(value)
        if problem:
            raise SpecError(f"[endpoint] api_key_env: the key in environment variable {endpoint.api_key_env} "
                            f"{problem}",
                            hint=f"set {endpoint.api_key_env} to the key alone (copying from a web page or a chat can "
                                 "add invisible characters)")
        return ApiKey(value)
    if endpoint.api_key_file is not None:
        return ApiKey(_read_key_file(endpoint.api_key_file))
    raise SpecError(
        f"[endpoint] api_key_env: environment variable {endpoint.api_key_env} is not set",
        hint=f"export {endpoint.api_key_env}=sk-... (or set [endpoint] api_key_file), "
             "or rehearse against the built-in emulator with --emulator",
    )


def _read_key_file(path: Path) -> str:
    try:
        value = path.read_text(encoding="utf-8-sig").strip()  # -sig: a byte order mark is not part of the key
    except OSError as exc:
        raise SpecError(f"[endpoint] api_key_file: cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise SpecError(f"[endpoint] api_key_file: {path} is not UTF-8 text",
                        hint="the file must hold the key alone, on one line") from None
    if not value:
        raise SpecError(f"[endpoint] api_key_file: {path} is empty")
    problem = key_problem(value)
    if problem:
        raise SpecError(f"[endpoint] api_key_file: the key in {path} {problem}",
                        hint="the file must hold the key alone, on one line (surrounding blank lines and spaces "
                             "are fine)")
    return value


def request_headers(endpoint: "EndpointSpec", api_key: ApiKey) -> dict[str, str]:
    """The headers of every request. A key that cannot be a header value is refused here too (a key
    handed to run_job directly), before an HTTP library can quote it in an error."""
    problem = key_problem(api_key.reveal())
    if problem:
        raise SpecError(f"the API key {problem}", hint="pass the key alone")
    headers = {
        "Authorization": f"Bearer {api_key.reveal()}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
    }
    if endpoint.workspace:
        headers["X-DashScope-WorkSpace"] = endpoint.workspace
    return headers
