"""What [endpoint] values mean before there is a job: region names -> hosts, and what api_key_env may be.

A leaf below `spec` (which checks these while loading a job) and `endpoints` (which builds URLs and reads
the key from them), so neither has to import the other to check a name.
"""

from __future__ import annotations

import re

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


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
KEY_ENV_LOOKS_LIKE_KEY = ("looks like an API key, not the name of an environment variable; put the key in an "
                          "environment variable and name it here")


def looks_like_key(text: str) -> bool:
    """A value that is probably a secret rather than a variable name or a path: it starts with sk- (DashScope
    and OpenAI-style keys), or it is a long token that no one would name a variable."""
    text = text.strip()
    if text[:3].lower() == "sk-":
        return True
    if _ENV_NAME.match(text):  # a valid name, unless it is a long mixed-case token with digits and no _
        return (len(text) >= 24 and "_" not in text and not text.isupper()
                and any(c.isdigit() for c in text) and any(c.isalpha() for c in text))
    return len(text) >= 16


def key_env_problem(name: str) -> str | None:
    """What is wrong with a value of [endpoint] api_key_env, in words that never repeat it."""
    if looks_like_key(name):
        return KEY_ENV_LOOKS_LIKE_KEY
    if not _ENV_NAME.match(name):
        return ("not a valid environment variable name (letters, digits and _, not starting with a digit); "
                "name the variable that holds the key, e.g. DASHSCOPE_API_KEY")
    return None
