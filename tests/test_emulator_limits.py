"""Emulator rate limits: per-second RPM/TPM buckets per model, overrides, the burst rule, limits
that move (a schedule, set_limits, POST /_emulator/limits) (all driven by an injected clock), and
429 bodies over loopback."""

from __future__ import annotations

import httpx
import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.emulator import (
    Emulator,
    EmulatorConfig,
    LimitTable,
    RateLimits,
    parse_limit_schedule,
    parse_limit_spec,
)
from runner.emulator.limits import ModelGate

COMPAT = "/compatible-mode/v1/chat/completions"
NATIVE = "/api/v1/services/aigc/text-generation/generation"
AUTH = {"Authorization": "Bearer sk-test"}


class FakeClock:
    """Monotonic seconds the test sets by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: FakeClock, **kw: object) -> RateLimits:
    return RateLimits(clock=clock, **kw)


# -- requests and tokens buckets -------------------------------------------------------------


def test_rpm_is_enforced_per_second_with_continuous_refill() -> None:
    """RPM 120 = 2 per second: two pass at once, the third is "rpm"; 0.5 s refills one."""
    clock = FakeClock()
    limits = limiter(clock, rpm=120)
    assert [limits.check("m", 1) for _ in range(3)] == [None, None, "rpm"]
    clock.now = 0.49
    assert limits.check("m", 1) == "rpm"
    clock.now = 0.5
    assert limits.check("m", 1) is None
    assert limits.check("m", 1) == "rpm"


def test_buckets_hold_at_most_one_seconds_worth() -> None:
    """After a long idle spell a model still gets only RPS requests at once, not RPM."""
    clock = FakeClock()
    limits = limiter(clock, rpm=600)  # 10 per second
    clock.now = 3600.0
    results = [limits.check("m", 1) for _ in range(12)]
    assert results.count(None) == 10 and results[10:] == ["rpm", "rpm"]


def test_tpm_is_enforced_per_second_on_tokens() -> None:
    """TPM 600 = 10 tokens per second: 4+4 pass, the next 4 is "tpm" until 0.2 s refills 2."""
    clock = FakeClock()
    limits = limiter(clock, tpm=600)
    assert [limits.check("m", 4) for _ in range(3)] == [None, None, "tpm"]
    clock.now = 0.1
    assert limits.check("m", 4) == "tpm"
    clock.now = 0.2
    assert limits.check("m", 4) is None


def test_a_rejected_request_takes_nothing() -> None:
    """A request that passes RPM but fails TPM leaves the requests bucket untouched."""
    gate = ModelGate(rpm=120, tpm=600, burst_factor=None, burst_window=1.0, now=0.0)
    assert gate.check(0.0, 11) is None  # 11 > 10 tokens: admitted on a full bucket, into debt
    assert gate.requests is not None and gate.tokens is not None
    assert (gate.requests.level, gate.tokens.level) == (1.0, -1.0)
    assert gate.check(0.0, 5) == "tpm"
    assert gate.check(0.0, 5) == "tpm"
    assert (gate.requests.level, gate.tokens.level) == (1.0, -1.0)
    assert gate.check(0.6, 5) is None  # tokens -1 + 6 = 5; requests min(2, 1 + 1.2) - 1
    assert gate.requests.level == pytest.approx(1.0)


def test_oversized_requests_pass_only_on_a_full_bucket() -> None:
    """Below 60 RPM (RPS < 1) or above TPS tokens, a request needs a full bucket and leaves a
    debt: RPM 30 admits one request every 2 s."""
    clock = FakeClock()
    limits = limiter(clock, rpm=30)
    assert limits.check("m", 1) is None
    for t in (0.5, 1.0, 1.99):
        clock.now = t
        assert limits.check("m", 1) == "rpm"
    clock.now = 2.0
    assert limits.check("m", 1) is None


def test_models_have_independent_limits_and_overrides() -> None:
    """Each model has its own buckets; overrides replace one side, None inherits, inf lifts."""
    clock = FakeClock()
    limits = limiter(clock, rpm=60, tpm=6000,
                     limits={"qwen-max": (120, None), "qwen-flash": (float("inf"), None)})
    assert limits.limit_for("qwen-plus") == (60, 6000)
    assert limits.limit_for("qwen-max") == (120, 6000)
    assert [limits.check("qwen-plus", 1) for _ in range(2)] == [None, "rpm"]
    assert limits.check("qwen-turbo", 1) is None  # another model, its own bucket
    assert [limits.check("qwen-max", 1) for _ in range(3)] == [None, None, "rpm"]
    assert all(limits.check("qwen-flash", 1) is None for _ in range(50))
    assert limits.check("qwen-flash", 100) == "tpm"  # TPS 100 inherited; 50 used


def test_no_limits_admit_everything_without_reading_the_clock() -> None:
    """With no rpm, tpm, override or burst factor, the limiter is off."""
    def clock() -> float:
        raise AssertionError("clock read")

    limits = RateLimits(clock=clock)
    assert not limits.active
    assert all(limits.check("m", 10**9) is None for _ in range(100))


def test_limit_specs_and_config_validation() -> None:
    """MODEL=RPM:TPM parses with either side empty; bad values are ValueErrors; tables hash."""
    assert parse_limit_spec("qwen-plus=600:1000000") == ("qwen-plus", (600.0, 1000000.0))
    assert parse_limit_spec("qwen-max=120:") == ("qwen-max", (120.0, None))
    assert parse_limit_spec("qwen-max=:5e4") == ("qwen-max", (None, 50000.0))
    for bad in ("qwen-plus", "qwen-plus=600", "=1:2", "m=x:1", "m=0:1", "m=1:-5"):
        with pytest.raises(ValueError):
            parse_limit_spec(bad)
    a = EmulatorConfig(rpm=600, limits={"qwen-max": (120, None)})
    b = EmulatorConfig(rpm=600, limits=["qwen-max=120:"])
    assert a == b and hash(a) == hash(b) and isinstance(a.limits, LimitTable)
    for kw in ({"rpm": 0}, {"tpm": -1}, {"burst_factor": 0.5}, {"burst_window_s": 0},
               {"stream_chunks": 0}, {"native_stream_error_status": "500"}):
        with pytest.raises(ValueError):
            EmulatorConfig(**kw)


def test_cli_rejects_a_bad_limit_flag() -> None:
    """`runner emulator --limit nonsense` is a usage error naming the flag."""
    result = CliRunner().invoke(main, ["emulator", "--limit", "nonsense"])
    assert result.exit_code == 2
    assert "--limit" in result.output and "MODEL=RPM:TPM" in result.output


# -- burst rule ------------------------------------------------------------------------------


def ramp(gate: ModelGate, per_second: list[int], start: float = 0.0) -> list[int]:
    """Send each second's requests evenly spaced; return the burst rejections per second."""
    rejected = []
    for second, count in enumerate(per_second):
        verdicts = [gate.check(start + second + j / count, 1) for j in range(count)]
        rejected.append(verdicts.count("burst"))
    return rejected


def test_smooth_ramp_passes_the_burst_rule() -> None:
    """Doubling per second from the floor (RPS/10) never trips BurstRate with factor 3."""
    gate = ModelGate(rpm=60_000, tpm=None, burst_factor=3, burst_window=1.0, now=0.0)
    assert ramp(gate, [100, 200, 400, 800, 1000, 1000]) == [0] * 6


def test_jump_from_idle_to_full_rate_trips_the_burst_rule() -> None:
    """Idle, then the full RPS at once: only factor x floor pass in the first window."""
    gate = ModelGate(rpm=60_000, tpm=None, burst_factor=3, burst_window=1.0, now=0.0)
    rejected = ramp(gate, [1000], start=5.0)
    assert rejected == [1000 - 300]  # floor = 1000 RPS / 10 = 100 per window, x3


def test_burst_rule_counts_sliding_windows_exactly() -> None:
    """cur + 1 > factor x max(prev, floor) is a burst: cur counts (now-w, now], prev
    (now-2w, now-w], only admitted requests count, and an idle spell resets prev."""
    gate = ModelGate(rpm=None, tpm=None, burst_factor=2, burst_window=1.0, now=0.0)

    def at(*times: float) -> list[str | None]:
        return [gate.check(t, 1) for t in times]

    # No RPM: floor 1 request per window, so 2 pass from cold.
    assert at(0.0, 0.1, 0.2) == [None, None, "burst"]
    # At 1.05 the window holds 0.1 and the previous one 0.0: 2 <= 2 x 1.
    assert at(1.05) == [None]
    # At 1.15 prev = {0.0, 0.1}: up to 4 in the window (1.05 and three more).
    assert at(1.15, 1.16, 1.17, 1.18) == [None, None, None, "burst"]
    # Two idle windows later prev is empty again: back to 2 x floor.
    assert at(5.0, 5.1, 5.2) == [None, None, "burst"]


# -- loopback --------------------------------------------------------------------------------


def body(n: int) -> dict:
    return {"model": "qwen-plus", "messages": [{"role": "user", "content": f"row {n}"}]}


def test_three_times_rps_in_one_second_gets_rate_quota_429s() -> None:
    """300 requests spread over one second at RPS 100: the bucket's 100 plus about 100 refilled
    pass, about 100 get 429 with the real RateQuota bodies (no Retry-After)."""
    clock = FakeClock()
    with Emulator(EmulatorConfig(rpm=6000), clock=clock) as emu, httpx.Client(
        base_url=emu.url, headers=AUTH, timeout=10
    ) as http:
        codes = []
        for n in range(300):
            clock.now = n / 300
            if n % 2:
                r = http.post(NATIVE, json={"model": "qwen-plus",
                                            "input": {"messages": body(n)["messages"]}})
            else:
                r = http.post(COMPAT, json=body(n))
            codes.append(r.status_code)
            if r.status_code == 429:
                assert "retry-after" not in r.headers
                data = r.json()
                if n % 2:
                    assert data["code"] == "Throttling.RateQuota"
                    assert data["message"] == (
                        "Requests rate limit exceeded, please try again later.")
                else:
                    assert data["error"]["code"] == data["error"]["type"] == "limit_requests"
                    assert data["error"]["message"] == "You exceeded your current requests list."
        stats = emu.stats(keys=False)
    assert set(codes) == {200, 429}
    assert 95 <= codes.count(429) <= 105
    assert stats["rejected"] == {"rpm": codes.count(429), "tpm": 0, "burst": 0}
    assert stats["admitted"] == {"qwen-plus": codes.count(200)}
    assert stats["by_model_status"] == {"qwen-plus": {"200": codes.count(200),
                                                      "429": codes.count(429)}}
    assert stats["tokens_admitted"]["qwen-plus"] > codes.count(200)


def test_tpm_and_burst_rejections_send_their_real_bodies() -> None:
    """TPM: 429 insufficient_quota / Throttling.AllocationQuota; burst: limit_burst_rate; with
    retry_after configured the 429s carry Retry-After."""
    clock = FakeClock()
    config = EmulatorConfig(tpm=600, limits={"qwen-max": (60_000, float("inf"))},
                            burst_factor=2,
                            retry_after=1.5)
    with Emulator(config, clock=clock) as emu, httpx.Client(
        base_url=emu.url, headers=AUTH, timeout=10
    ) as http:
        # qwen-plus: TPS 10; "row 0" costs more than 10 tokens, so one passes on the full bucket.
        assert http.post(COMPAT, json=body(0)).status_code == 200
        r = http.post(COMPAT, json=body(1))
        assert r.status_code == 429 and r.headers["retry-after"] == "1.5"
        assert r.json()["error"]["code"] == "insufficient_quota"
        native = {"model": "qwen-plus", "input": {"messages": body(2)["messages"]}}
        assert http.post(NATIVE, json=native).json()["code"] == "Throttling.AllocationQuota"
        # qwen-max: RPS 1000, floor 100, factor 2: the 201st request in one window is a burst.
        statuses = []
        for n in range(201):
            clock.now = 10 + n / 1000
            statuses.append(http.post(COMPAT, json={**body(n), "model": "qwen-max"}))
        assert [r.status_code for r in statuses[:200]] == [200] * 200
        burst = statuses[200]
        assert burst.status_code == 429
        assert burst.json()["error"]["code"] == "limit_burst_rate"
        assert burst.json()["error"]["message"].startswith("Request rate increased too quickly.")
        stats = emu.stats(keys=False)
    assert stats["rejected"] == {"rpm": 0, "tpm": 2, "burst": 1}


# -- limits that move ------------------------------------------------------------------------


def test_schedule_scales_every_limit_from_the_first_request() -> None:
    """limit_schedule times count from the first request: RPM 120 (2/s) becomes 1/s at +10 s and
    2/s again at +20 s; each bucket keeps what it had (capped) and refills at the new rate."""
    clock = FakeClock()
    limits = limiter(clock, rpm=120, limits={"qwen-max": (600, None)},
                     schedule=((10.0, 0.5), (20.0, 1.0)))
    clock.now = 100.0  # the origin: the first request, not the limiter's creation
    assert [limits.check("m", 1) for _ in range(3)] == [None, None, "rpm"]
    clock.now = 109.9
    assert limits.limit_for("m") == (120, None)
    clock.now = 110.0
    assert [limits.check("m", 1) for _ in range(2)] == [None, "rpm"]  # capacity 1 now
    assert limits.limit_for("m") == (60, None) and limits.limit_for("qwen-max") == (300, None)
    clock.now = 110.5
    assert limits.check("m", 1) == "rpm"  # 0.5 refilled at the new 1/s
    clock.now = 111.0
    assert limits.check("m", 1) is None
    clock.now = 120.0  # refilled to 1 at 1/s before the change; the new capacity is 2
    assert [limits.check("m", 1) for _ in range(2)] == [None, "rpm"]
    clock.now = 120.5
    assert limits.check("m", 1) is None  # 0.5 s at the restored 2/s
    assert [(c["t"], c["source"], c["scale"], c["rpm"]) for c in limits.changes] == [
        (10.0, "schedule", 0.5, 60.0), (20.0, "schedule", 1.0, 120.0)]


def test_schedule_text_and_config_validation() -> None:
    """"30:0.5,60:1" parses to pairs; times must increase, factors be > 0; the config takes either."""
    assert parse_limit_schedule("30:0.5,60:1") == ((30.0, 0.5), (60.0, 1.0))
    for bad in ("30", "30:x", "60:1,30:0.5", "-1:0.5", "10:0", "10:inf", "10:1,10:2"):
        with pytest.raises(ValueError):
            parse_limit_schedule(bad)
    a = EmulatorConfig(rpm=600, limit_schedule="30:0.5,60:1")
    b = EmulatorConfig(rpm=600, limit_schedule=[(30, 0.5), (60, 1)])
    assert a == b and hash(a) == hash(b) and a.limit_schedule == ((30.0, 0.5), (60.0, 1.0))
    with pytest.raises(ValueError):
        EmulatorConfig(limit_schedule=((5, 1), (3, 1)))


def test_cli_rejects_a_bad_limit_schedule() -> None:
    """`runner emulator --limit-schedule 30` is a usage error naming the flag and the format."""
    result = CliRunner().invoke(main, ["emulator", "--limit-schedule", "30"])
    assert result.exit_code == 2
    assert "--limit-schedule" in result.output and "SECONDS:FACTOR" in result.output


def test_set_limits_moves_rate_and_capacity_at_once() -> None:
    """set_limits replaces the global rpm/tpm or scales them; buckets follow at once (level capped
    at the new capacity), None lifts a limit, and a model with no limit gets one."""
    clock = FakeClock()
    limits = limiter(clock, rpm=600)  # 10 per second
    assert all(limits.check("m", 1) is None for _ in range(10))
    limits.set_limits(rpm=60)
    assert limits.check("m", 1) == "rpm"
    clock.now = 1.0
    assert [limits.check("m", 1) for _ in range(2)] == [None, "rpm"]
    limits.set_limits(rpm=None)
    assert not limits.active and limits.check("m", 10**9) is None
    limits.set_limits(rpm=1200, scale=0.5)  # 10 per second, from a full bucket
    assert limits.limit_for("m") == (600, None)
    results = [limits.check("m", 1) for _ in range(11)]
    assert results.count(None) == 10 and results[-1] == "rpm"
    limits.set_limits(tpm=600)  # 10 tokens per second on top
    clock.now = 2.0
    assert limits.check("m", 20) is None  # a full (scaled) tokens bucket: 5 tokens of capacity
    assert limits.check("m", 1) == "tpm"
    assert [c["source"] for c in limits.changes] == ["set"] * 4
    for bad in ({"rpm": 0}, {"tpm": -1}, {"scale": 0}, {"scale": float("inf")}, {"rpm": True}):
        with pytest.raises(ValueError):
            limits.set_limits(**bad)


def test_limits_endpoint_changes_the_limit_at_a_precise_moment() -> None:
    """POST /_emulator/limits applies at once and answers the limits in force; GET shows them;
    bad bodies are 400s; the change is listed in the stats."""
    clock = FakeClock()
    with Emulator(EmulatorConfig(rpm=6000), clock=clock) as emu, httpx.Client(
        base_url=emu.url, headers=AUTH, timeout=10
    ) as http:
        assert http.post(COMPAT, json=body(0)).status_code == 200
        r = http.post("/_emulator/limits", json={"rpm": 120})
        assert r.status_code == 200 and r.json()["effective"] == {"rpm": 120.0, "tpm": None}
        codes = [http.post(COMPAT, json=body(n)).status_code for n in range(1, 4)]
        assert codes == [200, 200, 429]  # capacity 2 at once, nothing refilled yet
        r = http.post("/_emulator/limits", json={"scale": 0.5, "tpm": None})
        assert r.json()["effective"]["rpm"] == 60.0
        assert http.get("/_emulator/limits").json()["scale"] == 0.5
        for bad in (b"nope", b"[1]", b'{"rpm": 0}', b'{"burst": 2}', b'{"scale": null}',
                    b'{"rpm": "fast"}'):
            r = http.post("/_emulator/limits", content=bad)
            assert r.status_code == 400 and r.json()["error"], bad
        assert http.post("/_emulator/limits", json={"rpm": None}).json()["effective"]["rpm"] is None
        assert all(http.post(COMPAT, json=body(n)).status_code == 200 for n in range(10))
        changes = emu.stats(keys=False)["limits"]["changes"]
    assert [(c["source"], c["rpm"]) for c in changes] == [("set", 120.0), ("set", 60.0),
                                                           ("set", None)]
    assert emu.set_limits(rpm=60)["effective"]["rpm"] == 30.0  # scale 0.5 still applies


def test_reset_restarts_the_schedule() -> None:
    """After POST /_emulator/reset the schedule counts again from the next first request."""
    clock = FakeClock()
    with Emulator(EmulatorConfig(rpm=600, limit_schedule=((5.0, 0.5),)), clock=clock) as emu, \
            httpx.Client(base_url=emu.url, headers=AUTH, timeout=10) as http:
        clock.now = 1.0
        http.post(COMPAT, json=body(0))
        clock.now = 6.0
        http.post(COMPAT, json=body(1))
        limits = emu.stats(keys=False)["limits"]
        assert (limits["origin"], limits["schedule_factor"]) == (1.0, 0.5)
        assert [(c["t"], c["rpm"]) for c in limits["changes"]] == [(5.0, 300.0)]
        assert http.post("/_emulator/reset").status_code == 200
        limits = emu.stats(keys=False)["limits"]
        assert (limits["origin"], limits["schedule_factor"], limits["changes"]) == (None, 1.0, [])
        clock.now = 100.0
        http.post(COMPAT, json=body(2))
        clock.now = 104.9
        http.post(COMPAT, json=body(3))
        assert emu.stats(keys=False)["limits"]["schedule_factor"] == 1.0
        clock.now = 105.0
        http.post(COMPAT, json=body(4))
        stats = emu.stats(keys=False)
    assert stats["limits"]["schedule_factor"] == 0.5
    assert stats["clock"] == {"origin": 100.0, "last_arrival": 105.0, "last_ok": 105.0}
