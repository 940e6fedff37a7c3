"""Where requests go: regions -> hosts, dialect paths, headers, and the API key (kept secret)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from .errors import SpecError

if TYPE_CHECKING:  # spec imports this module to check regions, so only for types here
    from .spec import EndpointSpec

# Shared hosts per region (API facts 1.1). Frankfurt and Tokyo have only workspace-dedicated hosts.
REGION_HOSTS = {
    "singapore": "https://dashscope-intl.aliyuncs.com",
    "beijing": "https://dashscope.aliyuncs.com",
    "virginia": "https://dashscope-us.aliyuncs.com",
    "hongkong": "https://cn-hongkong.dashscope.aliyuncs.com",
}
# Region ids used in workspace-dedicated hosts {workspace}.{region-id}.maas.aliyuncs.com (facts 1.2).
REGION_IDS = {
    "singapore": "ap-southeast-1",
    "beijing": "cn-beijing",
    "virginia": "us-east-1",
    "hongkong": "cn-hongkong",
    "frankfurt": "eu-central-1",
    "tokyo": "ap-northeast-1",
}
REGION_ALIASES = {
    "intl": "singapore", "international": "singapore", "ap-southeast-1": "singapore",
    "cn-beijing": "beijing", "china": "beijing", "us-east-1": "virginia", "us": "virginia",
    "cn-hongkong": "hongkong", "hong-kong": "hongkong", "eu-central-1": "frankfurt",
    "germany": "frankfurt", "ap-northeast-1": "tokyo", "japan": "tokyo",
}

DIALECT_ROOTS = {"openai": "/compatible-mode/v1", "dashscope": "/api/v1"}
CHAT_PATHS = {"openai": "/chat/completions", "dashscope": "/services/aigc/text-generation/generation"}

USER_AGENT = "dashscope-batch-runner/0.1"


def resolve_host(region: str, workspace: str | None) -> str:
    """The https host for a region; raises ValueError naming the known regions."""
    name = REGION_ALIASES.get(region.lower(), region.lower())
    if name in REGION_HOSTS:
        return REGION_HOSTS[name]
    if name in REGION_IDS:
        if not workspace:
            raise ValueError(f"region {region!r} has no shared host; set [endpoint] workspace to use "
                             f"its workspace host, or set base_url")
        return f"https://{workspace}.{REGION_IDS[name]}.maas.aliyuncs.com"
    raise ValueError(f"unknown region {region!r}; expected one of {', '.join(REGION_IDS)} or set base_url")


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


def resolve_api_key(endpoint: "EndpointSpec", environ: Mapping[str, str] | None = None) -> ApiKey:
    """The key from the named env var, else from [endpoint] api_key_file. SpecError when neither has one."""
    environ = os.environ if environ is None else environ
    value = environ.get(endpoint.api_key_env, "").strip()
    if value:
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
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SpecError(f"[endpoint] api_key_file: cannot read {path} ({exc.strerror})") from None
    if not value:
        raise SpecError(f"[endpoint] api_key_file: {path} is empty")
    return value


def request_headers(endpoint: "EndpointSpec", api_key: ApiKey) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {api_key.reveal()}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
    }
    if endpoint.workspace:
        headers["X-DashScope-WorkSpace"] = endpoint.workspace
    return headers
