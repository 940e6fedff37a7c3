"""The emulator as a real account under load: background throttling with Retry-After, a
deterministic first-N fault, each client's share by API key, per-second series and the request
log (an injected clock, no sleeps)."""

from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.emulator import Emulator, EmulatorConfig

COMPAT = "/compatible-mode/v1/chat/completions"
NATIVE = "/api/v1/services/aigc/text-generation/generation"


class FakeClock:
    """Monotonic seconds the test sets by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def body(n: int) -> dict:
    return {"model": "qwen-plus", "messages": [{"role": "user", "content": f"row {n}"}]}


def post(http: httpx.Client, n: int, key: str = "sk-test-client-0000") -> httpx.Response:
    return http.post(COMPAT, json=body(n), headers={"Authorization": f"Bearer {key}"})


def test_retry_after_is_sent_on_429s_and_503s_as_configured() -> None:
    """retry_after goes on every 429 (throttling faults too), retry_after_503 on every 503
    (ModelUnavailable and capacity), neither on a 500."""
    faults = {"429": 0.2, "429concurrency": 0.2, "503": 0.2, "503capacity": 0.2, "500capacity": 0.2}
    config = EmulatorConfig(faults=faults, retry_after=1, retry_after_503=2.5)
    seen: dict[int, set[str | None]] = {}
    with Emulator(config) as emu, httpx.Client(base_url=emu.url, timeout=10) as http:
        for n in range(60):
            r = post(http, n)
            seen.setdefault(r.status_code, set()).add(r.headers.get("retry-after"))
        by_fault = emu.stats(keys=False)["by_fault"]
    assert seen == {429: {"1"}, 503: {"2.5"}, 500: {None}}
    assert set(by_fault) == set(faults)
    with Emulator(EmulatorConfig(faults={"503capacity": 1.0}, retry_after=1)) as emu, \
            httpx.Client(base_url=emu.url, timeout=10) as http:
        r = post(http, 0)
        assert r.status_code == 503 and "retry-after" not in r.headers
        assert r.json()["error"]["message"].endswith("due to system capacity limits. Please try again later.")


def test_fail_first_answers_the_first_admitted_requests_with_its_fault() -> None:
    """fail_first=2 with 503: the first two requests that pass the limiter get 503 (a limiter 429
    does not use one up), every later one the usual answer; counted as faults."""
    clock = FakeClock()
    config = EmulatorConfig(rpm=60, fail_first=2, fail_first_fault="503", retry_after_503=2)
    with Emulator(config, clock=clock) as emu, httpx.Client(base_url=emu.url, timeout=10) as http:
        codes = []
        for n in range(3):
            clock.now = float(n)
            codes.append(post(http, n).status_code)
            codes.append(post(http, 100 + n).status_code)  # same second: the limiter's 429
        stats = emu.stats(keys=False)
    assert codes == [503, 429, 503, 429, 200, 429]
    assert stats["by_fault"] == {"503": 2}
    assert stats["rejected"]["rpm"] == 3


def test_fail_first_config_and_flag_validation() -> None:
    """fail_first must be a count >= 0 and its fault a non-stream fault name; the CLI says which flag."""
    for bad in ({"fail_first": -1}, {"fail_first": 1.5}, {"fail_first_fault": "nope"},
                {"fail_first_fault": "stream_drop"}):
        with pytest.raises(ValueError):
            EmulatorConfig(**bad)
    result = CliRunner().invoke(main, ["emulator", "--fail-first", "1", "--fail-first-fault", "teapot"])
    assert result.exit_code == 2 and "fail_first_fault" in result.output


def test_each_client_is_counted_by_the_end_of_its_key() -> None:
    """Two keys sharing one limit: stats["clients"] gives each one's arrivals, admissions,
    rejections, faults and answers under "..." plus the key's last 4 characters, never the key."""
    clock = FakeClock()
    config = EmulatorConfig(rpm=120, fail_first=1)  # 2 per second, shared
    with Emulator(config, clock=clock) as emu, httpx.Client(base_url=emu.url, timeout=10) as http:
        codes = [post(http, 0, "sk-bench-a-1111").status_code,
                 post(http, 1, "sk-bench-b-2222").status_code,
                 post(http, 2, "sk-bench-b-2222").status_code,
                 post(http, 3, "sk-bench-a-1111").status_code]
        clock.now = 1.0
        codes += [post(http, 4, "sk-bench-b-2222").status_code, post(http, 5, "sk-a").status_code]
        stats = emu.stats()
    assert codes == [429, 200, 429, 429, 200, 200]
    a, b, short = (stats["clients"][label] for label in ("...1111", "...2222", "..."))
    assert {k: a[k] for k in ("arrived", "admitted", "rejected", "faulted", "ok")} == {
        "arrived": 2, "admitted": 1, "rejected": 1, "faulted": 1, "ok": 0}
    assert {k: b[k] for k in ("arrived", "admitted", "rejected", "faulted", "ok")} == {
        "arrived": 3, "admitted": 2, "rejected": 1, "faulted": 0, "ok": 2}
    assert b["series"]["admitted"] == [1, 1] and b["series"]["rejected"] == [1, 0]
    assert short["ok"] == 1
    text = json.dumps(stats)
    assert "sk-bench" not in text and "sk-a" not in text


def test_per_second_series_count_from_the_first_request() -> None:
    """series counts arrivals, admissions, rate rejections, background faults and answers per
    second since the first request; clock gives that origin and the last arrival."""
    clock = FakeClock(10.0)
    config = EmulatorConfig(rpm=60, fail_first=1)  # 1 per second
    with Emulator(config, clock=clock) as emu, httpx.Client(base_url=emu.url, timeout=10) as http:
        for t in (10.0, 10.5, 11.2, 13.9, 14.5):
            clock.now = t
            post(http, int(t * 10))
        stats = emu.stats(keys=False)
    assert stats["clock"] == {"origin": 10.0, "last_arrival": 14.5, "last_ok": 13.9}
    assert stats["series"] == {
        "arrived": [2, 1, 0, 1, 1],
        "admitted": [1, 1, 0, 1, 0],
        "rejected": [1, 0, 0, 0, 1],
        "faulted": [1, 0, 0, 0, 0],
        "ok": [0, 1, 0, 1, 0],
    }


def test_default_stats_do_not_grow_with_requests() -> None:
    """Without keys and log, a snapshot holds no per-request data: 300 requests in one second
    give the same series lengths and a snapshot of about the same size as 3 do."""
    clock = FakeClock()
    with Emulator(EmulatorConfig(request_log=True), clock=clock) as emu, \
            httpx.Client(base_url=emu.url, timeout=10) as http:
        for n in range(3):
            post(http, n)
        small = len(json.dumps(emu.stats(keys=False)))
        for n in range(3, 300):
            post(http, n)
        stats = emu.stats(keys=False)
        assert len(http.get("/_emulator/stats?keys=0&log=1").json()["log"]) == 300
    assert "log" not in stats and len(stats["series"]["arrived"]) == 1
    assert len(json.dumps(stats)) <= small + 40  # a few counters gained digits


def test_request_log_records_arrival_answer_and_fault() -> None:
    """With request_log, ?log=1 lists each request: arrival and answer times on the emulator's
    clock, status, client label, row key, attempt, and the fault drawn; off by default."""
    clock = FakeClock(5.0)
    config = EmulatorConfig(request_log=True, fail_first=1, retry_after=2)
    with Emulator(config, clock=clock) as emu, httpx.Client(base_url=emu.url, timeout=10) as http:
        headers = {"Authorization": "Bearer sk-test-client-0000", "X-Runner-Row-Key": "row-1"}
        assert http.post(COMPAT, json=body(1), headers=headers).status_code == 429
        clock.now = 7.5
        assert http.post(COMPAT, json=body(1), headers=headers).status_code == 200
        http.post(COMPAT, json=body(2))  # no key: 401, no client or row key
        log = emu.stats(log=True)["log"]
    assert log == [
        {"arrived": 5.0, "answered": 5.0, "status": 429, "client": "...0000", "key": "row-1",
         "attempt": 1, "fault": "429"},
        {"arrived": 7.5, "answered": 7.5, "status": 200, "client": "...0000", "key": "row-1",
         "attempt": 2, "fault": None},
        {"arrived": 7.5, "answered": 7.5, "status": 401, "client": None, "key": None,
         "attempt": None, "fault": None},
    ]
    with Emulator(EmulatorConfig()) as emu, httpx.Client(base_url=emu.url, timeout=10) as http:
        post(http, 0)
        assert "log" not in http.get("/_emulator/stats?log=1").json()
