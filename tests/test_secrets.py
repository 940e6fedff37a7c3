"""The API key never reaches an output, a log line, a message or a traceback.

A recognisable canary key goes through every failure path of both transports (401, 429, 5xx, gateway
pages, timeouts, dropped connections, broken streams, moderation), --debug tracebacks, the dry run,
batch mode, validate, status and summary, and a proxy that quotes the key back; malformed keys and a
key pasted into api_key_env are refused before anything is sent. Then every file under the output
folder (raw bytes, and Parquet read back as a table) and every command's stdout and stderr are
searched for the canary, its prefix, and its base64, URL-encoded and hex forms.
"""

from __future__ import annotations

import base64
import json
import signal
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, quote_plus

import pyarrow.parquet as pq
import pytest

from runner.emulator import Emulator, EmulatorConfig
from runner.endpoints import ApiKey, key_env_problem, key_problem, request_headers, resolve_api_key
from runner.errors import SpecError
from runner.spec import EndpointSpec, parse_job
from tests.helpers import CliResult, make_job, read_output, run_cli, start_cli, wait_until, write_prompts

CANARY = "sk-canary-7f3aQz9cWx41d2e8Vb6a05Lm"
TRANSPORTS = ["aiohttp", "httpx"]
# Every fault the emulator has except arrearage (which stops the run; the 401 case covers that path).
FAULTS = {"429": 0.06, "429tpm": 0.03, "500": 0.05, "502": 0.04, "503": 0.04, "400": 0.04, "moderation": 0.04,
          "hang": 0.03, "drop": 0.04, "malformed": 0.04, "stream_drop": 0.05, "stream_truncate": 0.05,
          "stream_malformed": 0.05, "stream_error": 0.05}
MIXED_INPUT = {"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt", "model_column": "model"}


# --- where to look, and for what -----------------------------------------------------------------------

def leak_forms(secret: str) -> set[str]:
    """The canary as it could appear: whole, its first 16 characters (a truncated echo), without "sk-",
    URL-encoded, hex, and base64 / urlsafe base64 at each of the three byte alignments."""
    forms = {secret, secret[:16], secret[3:], quote(secret, safe=""), quote_plus(secret), secret.encode().hex()}
    for offset in range(3):
        tail = secret[offset:].encode()
        whole_groups = 4 * (len(tail) // 3)  # the last, partial group depends on what follows the key
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(encode(tail).decode()[:whole_groups])
    return forms


def folder_texts(folder: Path) -> dict[str, str]:
    """Every file under `folder` as text (bytes read as latin-1), and every Parquet file also read back as a
    table (its columns compressed on disk are only visible that way) with its metadata."""
    texts: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        texts[str(path)] = path.read_bytes().decode("latin-1")
        if path.name.endswith(".parquet"):
            table = pq.read_table(path)
            texts[f"{path} (as a table)"] = json.dumps(table.to_pylist(), default=str) + repr(table.schema.metadata)
    return texts


def assert_no_leak(secret: str, folder: Path, results: list[CliResult]) -> int:
    """No form of `secret` in any file under `folder` or any command's output; returns how many texts were read."""
    texts = folder_texts(folder) if folder.exists() else {}
    for i, result in enumerate(results):
        texts[f"command {i} stdout"] = result.stdout
        texts[f"command {i} stderr"] = result.stderr
    forms = leak_forms(secret)
    leaks = [f"{where}: {form!r}" for where, text in texts.items() for form in forms if form in text]
    assert not leaks, "the key leaked:\n" + "\n".join(leaks)
    return len(texts)


def write_mixed_prompts(path: Path, rows: int) -> None:
    """Rows alternate between a plain model and a streaming-only one, so both answer paths are exercised."""
    path.write_text("".join(json.dumps({"id": f"row-{i:04d}", "prompt": f"Question {i}: what is {i} squared?",
                                        "model": "qwq-plus" if i % 2 else "qwen-plus"}) + "\n"
                            for i in range(rows)), encoding="utf-8")


# --- the key's own checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("value, problem", [
    pytest.param(CANARY + "\nsecond-line", "contains a line break at position 35", id="newline"),
    pytest.param(CANARY + "\r\n# comment", "contains a line break at position 35", id="crlf"),
    pytest.param(CANARY[:10] + "\t" + CANARY[10:], "contains a tab at position 11", id="tab"),
    pytest.param(CANARY[:10] + "\x00" + CANARY[10:], "contains a control character at position 11 (U+0000)",
                 id="nul"),
    pytest.param(CANARY[:10] + "\x7f" + CANARY[10:], "contains a control character at position 11 (U+007F)",
                 id="del"),
    pytest.param(CANARY[:10] + " " + CANARY[10:], "contains a space at position 11", id="space"),
    pytest.param(CANARY[:12] + "\u200b" + CANARY[12:], "contains a non-ASCII character at position 13 (U+200B)",
                 id="zero-width-space"),
    pytest.param(CANARY[:12] + "\u00a0" + CANARY[12:], "contains a non-ASCII character at position 13 (U+00A0)",
                 id="no-break-space"),
    pytest.param("sk-сanary", "contains a non-ASCII character at position 4 (U+0441)", id="cyrillic-s"),
    pytest.param(CANARY, None, id="good"),
])
def test_key_problems_are_named_never_shown(value: str, problem: str | None) -> None:
    """A key that cannot be a header value is described by what and where, never by its value."""
    assert key_problem(value) == problem


@pytest.mark.parametrize("source", ["env", "file"])
def test_malformed_key_is_refused_naming_its_source(tmp_path, source: str) -> None:
    """From the variable or the key file, a key with a line break is a SpecError naming the variable or the
    file; a key file's surrounding blank lines, spaces and byte order mark are not part of the key."""
    bad = CANARY + "\nsecond line"
    key_file = tmp_path / "dashscope.key"
    key_file.write_text(bad if source == "file" else "", encoding="utf-8")
    endpoint = EndpointSpec(api_key_env="MY_TEAM_KEY", api_key_file=key_file)
    with pytest.raises(SpecError) as info:
        resolve_api_key(endpoint, {"MY_TEAM_KEY": bad} if source == "env" else {})
    where = "environment variable MY_TEAM_KEY" if source == "env" else str(key_file)
    assert where in info.value.message and "contains a line break" in info.value.message
    assert CANARY not in info.value.message + (info.value.hint or "") + repr(info.value)
    key_file.write_bytes(b"\xef\xbb\xbf\n  " + CANARY.encode() + b"  \r\n\n")
    assert resolve_api_key(endpoint, {}).reveal() == CANARY


def test_request_headers_refuse_a_malformed_key_handed_in_directly() -> None:
    """A key given to run_job as an ApiKey is checked too, before any HTTP library can quote it."""
    with pytest.raises(SpecError) as info:
        request_headers(EndpointSpec(), ApiKey(CANARY + "\n"))
    assert "contains a line break" in info.value.message and CANARY not in str(info.value)


@pytest.mark.parametrize("name, looks_like_key", [
    pytest.param(CANARY, True, id="sk-key"),
    pytest.param("  " + CANARY, True, id="sk-key-with-space"),
    pytest.param("7f3aQz9cWx41d2e8Vb6a05Lm", True, id="bare-token"),
    pytest.param("abc/def+ghijklmnopqrstu==", True, id="base64-token"),
    pytest.param("not a name", False, id="invalid-short"),
    pytest.param("DASHSCOPE_API_KEY", None, id="default"),
    pytest.param("MY_TEAM_KEY_FOR_THE_NIGHTLY_EVAL_JOB_2026", None, id="long-name"),
    pytest.param("K", None, id="one-letter"),
    pytest.param("dashscopeKey2", None, id="short-mixed"),
])
def test_api_key_env_that_looks_like_a_key_is_refused_without_echo(name: str, looks_like_key: bool | None) -> None:
    """api_key_env must name a variable: a key pasted there is refused with the fixed wording, any other bad
    name without repeating it, and a job file's wrong-typed value is not shown either."""
    problem = key_env_problem(name)
    if looks_like_key is None:
        assert problem is None
        return
    raw = {"input": {"path": "x.jsonl", "prompt_column": "p"}, "endpoint": {"api_key_env": name},
           "model": {"name": "qwen-plus"}, "output": {"path": "out.parquet"}}
    with pytest.raises(SpecError) as info:
        parse_job(raw)
    message = info.value.message
    assert message.endswith("[endpoint] api_key_env: " + problem)
    assert name.strip() not in message
    if looks_like_key:
        assert problem == ("looks like an API key, not the name of an environment variable; put the key in an "
                           "environment variable and name it here")
    with pytest.raises(SpecError) as typed:
        parse_job({**raw, "endpoint": {"api_key_env": [name]}})
    assert name.strip() not in typed.value.message


def test_key_pasted_as_key_file_or_key_name_is_not_echoed() -> None:
    """A key pasted as api_key_file, or as a key name in a job file, is refused without being repeated."""
    base = {"input": {"path": "x.jsonl", "prompt_column": "p"}, "model": {"name": "qwen-plus"},
            "output": {"path": "out.parquet"}}
    for endpoint in ({"api_key_file": CANARY}, {CANARY: "x"}):
        with pytest.raises(SpecError) as info:
            parse_job({**base, "endpoint": endpoint})
        assert CANARY not in info.value.message and CANARY[:16] not in info.value.message


# --- the real CLI over loopback -----------------------------------------------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_canary_survives_every_failure_path(tmp_path, make_emulator, transport: str) -> None:
    """Faults of every kind (plain and streamed), a rejected key with and without --debug, the dry run,
    validate and summary: the canary is in no file of the output folder and in no command's output."""
    emu = make_emulator(api_keys=(CANARY,), faults=FAULTS, hang_seconds=5.0, seed=11)
    write_mixed_prompts(tmp_path / "prompts.jsonl", 120)
    job = make_job(tmp_path, emu, input=MIXED_INPUT, endpoint={"transport": transport, "timeout": 0.5},
                   run={"max_attempts": 1, "concurrency": 16})  # one attempt: every fault drawn becomes a row
    out = tmp_path / "out" / "result.parquet"
    results = [run_cli("run", str(job), "--debug", "--max-error-rate", "1", key=CANARY)]
    assert results[0].code == 0, results[0].stderr
    rows = read_output(out)
    failed = {r["error_type"] for r in rows if r["status"] == "error"}
    assert {"Throttled", "TransientCallError", "PermanentCallError"} <= failed  # messages of each kind were written
    stats = emu.stats(keys=False)
    assert stats["by_status"].get("200", 0) > 0  # the canary really was sent and accepted
    assert stats["by_fault"].get("hang", 0) and stats["by_fault"].get("drop", 0) and stats["by_fault"].get("stream_drop", 0)

    rejected = make_emulator(api_keys=("sk-someone-else",))
    job_401 = make_job(tmp_path, rejected, name="rejected", endpoint={"transport": transport},
                       output={"path": "out/rejected.parquet"})
    plain, debug = run_cli("run", str(job_401), key=CANARY), run_cli("run", str(job_401), "--debug", key=CANARY)
    assert plain.code == 1 and "refused the credentials" in plain.stderr
    assert debug.code == 1 and "Traceback" in debug.stderr and "AuthError" in debug.stderr
    results += [plain, debug]

    results.append(run_cli("run", str(job), "--dry-run", "--output", str(tmp_path / "out" / "dry.parquet"), key=CANARY))
    assert results[-1].code == 0 and (tmp_path / "out" / "dry.requests.jsonl").exists()
    results.append(run_cli("validate", str(job), key=CANARY))
    assert results[-1].code == 0 and "DASHSCOPE_API_KEY is set" in results[-1].stdout
    results += [run_cli("summary", str(out)), run_cli("summary", str(out), "--json")]
    assert all(r.code == 0 for r in results[-2:])
    assert assert_no_leak(CANARY, tmp_path / "out", results) >= 8


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_malformed_keys_are_refused_before_sending(tmp_path, make_emulator, transport: str) -> None:
    """A key with a line break or U+200B, from the variable or a key file, stops `runner run` with exit 2
    naming the variable or file (with --debug: a traceback, still without the key); nothing is sent."""
    emu = make_emulator(api_keys=(CANARY,))
    write_prompts(tmp_path / "prompts.jsonl", 20)
    job = make_job(tmp_path, emu, endpoint={"transport": transport})
    zero_width = CANARY[:12] + "\u200b" + CANARY[12:]
    results = []
    for bad, problem in [(CANARY + "\nsecond-line", "contains a line break"),
                         (zero_width, "contains a non-ASCII character at position 13")]:
        refused = run_cli("run", str(job), key=bad)
        assert refused.code == 2 and "Traceback" not in refused.stderr
        assert f"environment variable DASHSCOPE_API_KEY {problem}" in refused.stderr
        debug = run_cli("run", str(job), "--debug", key=bad)
        assert debug.code == 1 and "Traceback" in debug.stderr and problem in debug.stderr
        results += [refused, debug]
    keys = tmp_path / "keys"  # outside the output folder: the key file holds the key by design
    keys.mkdir()
    for name, text, problem in [("two-lines.key", CANARY + "\n# the key above\n", "contains a line break"),
                                ("zero-width.key", zero_width + "\n", "contains a non-ASCII character")]:
        (keys / name).write_text(text, encoding="utf-8")
        job_file = make_job(tmp_path, emu, name=name, endpoint={"transport": transport, "api_key_env": "NO_SUCH_VAR",
                                                                "api_key_file": f"keys/{name}"})
        refused = run_cli("run", str(job_file), key=None)
        assert refused.code == 2 and f"the key in {keys / name} {problem}" in refused.stderr
        validated = run_cli("validate", str(job_file), key=None)
        assert validated.code == 0 and problem in validated.stdout and "refuses it" in validated.stdout
        results += [refused, validated]
    assert emu.stats(keys=False)["requests"] == 0
    assert_no_leak(CANARY, tmp_path / "out", results)


def test_key_pasted_into_api_key_env_is_refused_by_every_command(tmp_path, emulator) -> None:
    """`api_key_env = "sk-..."`: run, the dry run, validate, status and cancel all exit 2 with the fixed
    message and never repeat the value; nothing is sent."""
    write_prompts(tmp_path / "prompts.jsonl", 10)
    job = str(make_job(tmp_path, emulator, endpoint={"api_key_env": CANARY}))
    results = []
    for args in (["run", job], ["run", job, "--dry-run"], ["run", job, "--emulator"], ["validate", job],
                 ["status", job], ["cancel", job]):
        result = run_cli(*args)
        assert result.code == 2, (args, result.stderr)
        assert ("[endpoint] api_key_env: looks like an API key, not the name of an environment variable; put the "
                "key in an environment variable and name it here") in result.stderr
        results.append(result)
    debug = run_cli("run", job, "--debug")
    assert debug.code == 1 and "Traceback" in debug.stderr
    results.append(debug)
    assert emulator.stats(keys=False)["requests"] == 0
    assert_no_leak(CANARY, tmp_path / "out", results)


class _QuotingHandler(BaseHTTPRequestHandler):
    """Answers every POST with an error whose message quotes the Authorization header, as some proxies do."""

    protocol_version = "HTTP/1.1"
    status = 400
    seen: list[str]

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        auth = self.headers.get("Authorization", "")
        self.seen.append(auth)
        body = json.dumps({"error": {"message": f"header Authorization: {auth} is not accepted here",
                                     "type": "invalid_request_error",
                                     "code": "invalid_api_key" if self.status == 401 else "invalid_parameter_error"}}
                          ).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def quoting_server(status: int):
    handler = type("Handler", (_QuotingHandler,), {"status": status, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_key_quoted_back_by_the_endpoint_is_masked(tmp_path, transport: str) -> None:
    """An endpoint whose error message quotes the Authorization header: the rows' error_message and the
    run-stopping 401 message show sk-*** instead of the key."""
    write_prompts(tmp_path / "prompts.jsonl", 8)
    results = []
    with quoting_server(400) as (url, seen):
        job = make_job(tmp_path, endpoint={"base_url": url + "/compatible-mode/v1", "transport": transport},
                       run={"max_attempts": 1, "concurrency": 2})
        results.append(run_cli("run", str(job), "--max-error-rate", "1", key=CANARY))
        assert results[-1].code == 0, results[-1].stderr
        assert seen and set(seen) == {f"Bearer {CANARY}"}
    rows = read_output(tmp_path / "out" / "result.parquet")
    assert len(rows) == 8 and all("Authorization: Bearer " in r["error_message"] and "*** is not" in r["error_message"]
                                  and CANARY not in r["error_message"] for r in rows)
    with quoting_server(401) as (url, seen):
        job = make_job(tmp_path, name="rejected", endpoint={"base_url": url + "/compatible-mode/v1",
                                                            "transport": transport},
                       output={"path": "out/rejected.parquet"})
        for args in ([], ["--debug"]):
            results.append(run_cli("run", str(job), *args, key=CANARY))
            assert results[-1].code == 1 and "Bearer " in results[-1].stderr and "*** is not" in results[-1].stderr
        assert seen
    assert_no_leak(CANARY, tmp_path / "out", results)


def test_canary_in_batch_mode(tmp_path) -> None:
    """Batch mode: upload, create, status (fresh from the server), the join with failed lines, a rejected
    key (also with --debug), summary: the canary is nowhere, the batch state and the downloads included."""
    now = [1000.0]
    config = EmulatorConfig(api_keys=(CANARY,), batch_time_scale=1.0, batch_phase_seconds=100.0,
                            batch_line_fault_rate=0.2)
    results = []
    with Emulator(config, clock=lambda: now[0]) as emu:
        write_prompts(tmp_path / "prompts.jsonl", 60)
        job = str(make_job(tmp_path, emu, run={"mode": "batch", "batch_poll_seconds": 0.1}))
        state = tmp_path / "out" / "result.parquet.parts" / "batch-state.json"

        def created() -> bool:
            return state.exists() and any(b.get("batch_id") for b in json.loads(state.read_text())["batches"])

        proc = start_cli("run", job, key=CANARY)
        try:
            wait_until(created, 60, "the batch created and recorded")
        finally:
            proc.send_signal(signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=10)
        results.append(CliResult(proc.returncode, stdout, stderr))
        for args in (["status", job], ["status", job, "--json"]):
            results.append(run_cli(*args, key=CANARY))
            assert results[-1].code == 0 and "validating" in results[-1].stdout, results[-1].stderr
        now[0] += 1000  # the batch completes
        results.append(run_cli("run", job, "--debug", "--max-error-rate", "1", key=CANARY))
        assert results[-1].code == 0, results[-1].stderr
        rows = read_output(tmp_path / "out" / "result.parquet")
        assert len(rows) == 60 and any(r["status"] == "error" for r in rows)
        results += [run_cli("summary", str(tmp_path / "out" / "result.parquet")), run_cli("status", job, key=CANARY)]
    with Emulator(EmulatorConfig(api_keys=("sk-someone-else",))) as rejected:
        job_401 = str(make_job(tmp_path, rejected, name="rejected", run={"mode": "batch"},
                               output={"path": "out/rejected.parquet"}))
        for args in ([], ["--debug"]):
            results.append(run_cli("run", job_401, *args, key=CANARY))
            assert results[-1].code == 1 and "refused the credentials" in results[-1].stderr
    assert_no_leak(CANARY, tmp_path / "out", results)
