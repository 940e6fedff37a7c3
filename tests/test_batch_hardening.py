"""The Batch API client under damage and hostile answers: every failure is a one-line error, the key is in no
message or file, and a base URL holding credentials is refused before anything is printed or recorded.

The damaged answers come from `Front`, a small HTTP server on 127.0.0.1 that answers each request as the test
says (raw bytes, so anything an HTTP peer can send) or passes it to the project's emulator behind it.
"""

from __future__ import annotations

import json
import re
import socketserver
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import anyio
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.batch.api import BatchApi, BatchApiError
from runner.batch.join import join_batch
from runner.batch.render import custom_id
from runner.cost import PriceBook
from runner.endpoints import ApiKey
from runner.errors import SpecError
from runner.records import result_schema, results_to_table
from runner.spec import EndpointSpec, load_job
from runner.emulator import Emulator
from tests.helpers import make_job, run_cli, write_prompts
from tests.test_batch import plan, request
from tests.test_batch_e2e import ManualClock
from tests.test_batch_status import STILL, _start_batches

CANARY = "sk-canary-5ec2e7-do-not-print"  # an API key that must show up nowhere
PASSWORD = "pw-canary-77d1"  # a password in a base URL that must show up nowhere
FAST_BATCHES = dict(batch_time_scale=100.0, batch_phase_seconds=20.0)
BATCH_RUN = {"mode": "batch", "batch_poll_seconds": 0.05, "max_error_rate": 1.0}


# -- a server that answers what the test says -------------------------------------------------------------

@dataclass
class Req:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    upstream: str | None

    def forward(self) -> tuple[int, dict[str, str], bytes]:
        """The upstream emulator's answer to this request: status, headers, decoded body."""
        assert self.upstream, "no upstream"
        headers = {k: v for k, v in self.headers.items() if k not in ("host", "content-length", "connection",
                                                                       "transfer-encoding", "accept-encoding")}
        with httpx.Client(base_url=self.upstream, timeout=30) as client:
            answer = client.request(self.method, self.path, headers=headers, content=self.body)
        return answer.status_code, dict(answer.headers), answer.content


def http(status: int, body: bytes | str | dict | list = b"", headers: dict[str, str] | None = None,
         length: int | None = None) -> bytes:
    """A raw HTTP/1.1 answer; `length` sends a Content-Length other than the body's (a body cut short)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
        headers = {"Content-Type": "application/json", **(headers or {})}
    if isinstance(body, str):
        body = body.encode()
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(body) if length is None else length}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def passed_on(req: Req) -> bytes:
    status, headers, body = req.forward()
    kept = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "transfer-encoding",
                                                                  "content-encoding", "connection")}
    return http(status, body, kept)


class Front:
    """HTTP on 127.0.0.1: `answer(req)` gives the raw bytes to send back (the connection closes after them),
    or None to pass the request to `upstream`. `seen` lists (method, path) of every request."""

    def __init__(self, answer: Callable[[Req], bytes | None], upstream: str | None = None) -> None:
        self.answer, self.upstream = answer, upstream
        self.seen: list[tuple[str, str]] = []
        front = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline().decode("latin-1").strip()
                if not line:
                    return
                method, path, _ = line.split(" ", 2)
                headers: dict[str, str] = {}
                while (header := self.rfile.readline().decode("latin-1").strip()):
                    name, _, value = header.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = self.rfile.read(int(headers.get("content-length", 0)))
                front.seen.append((method, path))
                req = Req(method, path, headers, body, front.upstream)
                answer = front.answer(req)
                self.wfile.write(passed_on(req) if answer is None else answer)
                self.wfile.flush()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/compatible-mode/v1"

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p in self.seen if m == method and p.split("?")[0].startswith(prefix))

    def __enter__(self) -> "Front":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()


def api_call(front: Front, call: Callable, *, attempts: int = 2):
    """Run `call(api)` against `front` with the canary key, retries without waiting."""
    async def no_wait(_seconds: float) -> None:
        return None

    async def main():
        async with BatchApi(EndpointSpec(base_url=front.url), ApiKey(CANARY), sleep=no_wait,
                            attempts=attempts) as api:
            return await call(api)
    return anyio.run(main)


def assert_one_line_error(error: BaseException, *phrases: str) -> None:
    text = str(error)
    assert "\n" not in text and CANARY not in text and CANARY not in str(getattr(error, "hint", "")), text
    for phrase in phrases:
        assert phrase in text, text


BATCH = {"id": "batch_1", "object": "batch", "status": "in_progress", "input_file_id": "file-1",
         "output_file_id": None, "error_file_id": None, "request_counts": {"total": 3, "completed": 1, "failed": 0}}


# -- 1. every way a call can blow up is a one-line BatchApiError -----------------------------------------

MALFORMED = [
    ("retrieve, HTML instead of JSON", lambda api: api.retrieve("batch_1"), "GET",
     http(200, "<html><body>Gateway login</body></html>", {"Content-Type": "text/html"}),
     "cannot check batch batch_1: HTTP 200 malformed_answer the answer is not JSON (text/html"),
    ("retrieve, a JSON list", lambda api: api.retrieve("batch_1"), "GET", http(200, []),
     "the answer lacks a batch object"),
    ("retrieve, no status", lambda api: api.retrieve("batch_1"), "GET", http(200, {"id": "batch_1"}),
     "the answer lacks a batch object"),
    ("retrieve, a status that is not text", lambda api: api.retrieve("batch_1"), "GET",
     http(200, {**BATCH, "status": ["completed"]}), "the answer lacks a batch object"),
    ("retrieve, a file id that is not text", lambda api: api.retrieve("batch_1"), "GET",
     http(200, {**BATCH, "status": "completed", "output_file_id": 7}), "the answer lacks a batch object"),
    ("retrieve, not UTF-8", lambda api: api.retrieve("batch_1"), "GET",
     http(200, b"\xff\xfe{}", {"Content-Type": "application/json"}), "the answer is not JSON"),
    ("cancel, empty body", lambda api: api.cancel("batch_1"), "POST", http(200, b""),
     "cannot cancel batch batch_1: HTTP 200 malformed_answer the answer is not JSON"),
    ("create, no id", lambda api: api.create("file-1", "24h", {}), "POST", http(200, {"status": "validating"}),
     "cannot create a batch from file-1"),
    ("list, data is not a list", lambda api: api.find("file-1"), "GET", http(200, {"data": "none"}),
     "cannot list batches: HTTP 200 malformed_answer the answer lacks a list of batch objects"),
    ("list, an entry that is not a batch", lambda api: api.find("file-1"), "GET", http(200, {"data": [1, 2]}),
     "the answer lacks a list of batch objects"),
    ("retrieve, a Content-Encoding that does not decode", lambda api: api.retrieve("batch_1"), "GET",
     http(200, b"not gzip at all", {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
     "malformed_body the answer's body could not be decoded"),
    ("retrieve, a body cut short", lambda api: api.retrieve("batch_1"), "GET",
     http(200, json.dumps(BATCH)[:20], {"Content-Type": "application/json"}, length=400),
     "truncated_body the answer was cut short"),
    ("retrieve, a broken status line", lambda api: api.retrieve("batch_1"), "GET",
     b"HTTP/1.1 abc\r\n\r\n", "protocol_error the answer broke the HTTP protocol"),
    ("retrieve, a redirect (not followed)", lambda api: api.retrieve("batch_1"), "GET",
     http(302, b"", {"Location": "http://127.0.0.1:9/elsewhere"}), "cannot check batch batch_1: HTTP 302"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_a_damaged_or_malformed_answer_is_a_one_line_batch_api_error(case):
    """Each damaged answer (not JSON, fields missing or of the wrong type, undecodable, cut short, not HTTP, a
    redirect) becomes a BatchApiError on one line naming the call; answers that may pass are retried."""
    _, call, method, answer, phrase = case
    with Front(lambda req: answer) as front:
        with pytest.raises(BatchApiError) as caught:
            api_call(front, call, attempts=2)
    assert_one_line_error(caught.value, phrase)
    sent = front.count(method, "/compatible-mode/v1/")
    if "create" in case[0]:
        assert sent == 1 and caught.value.transient  # never sent twice; it may have been carried out
    elif "HTTP 302" in phrase:
        assert sent == 1 and not caught.value.transient
    else:
        assert sent == 2 and caught.value.transient


def test_a_list_that_hands_back_the_same_cursor_ends_with_an_error():
    """A list endpoint whose has_more never ends (the same last_id again) is an error, not an endless loop."""
    page = {"data": [{**BATCH, "input_file_id": "file-other"}], "has_more": True, "last_id": "batch_1"}
    with Front(lambda req: http(200, page)) as front:
        with pytest.raises(BatchApiError) as caught:
            api_call(front, lambda api: api.find("file-1"))
    assert_one_line_error(caught.value, "cannot list batches", "returned the page after batch_1 again")
    assert front.count("GET", "/compatible-mode/v1/batches") == 2


def test_an_upload_answer_without_a_file_id_is_an_error(tmp_path):
    """POST /files answering 200 without an `id` is a BatchApiError, not a KeyError in the driver."""
    path = tmp_path / "batch-0001.input.jsonl"
    path.write_text('{"custom_id": "0-a"}\n')
    with Front(lambda req: http(200, {"object": "file", "status": "processed"})) as front:
        with pytest.raises(BatchApiError) as caught:
            api_call(front, lambda api: api.upload(path))
    assert_one_line_error(caught.value, "cannot upload batch-0001.input.jsonl", "lacks the file's id")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_download_cut_midway_leaves_no_file(tmp_path, chunked):
    """A file download whose body stops before its Content-Length (or last chunk) is retried, then a one-line
    error; neither the target nor a temporary file is left behind."""
    line = b'{"custom_id": "0-a", "response": {"status_code": 200, "body": {}}}\n'
    if chunked:
        raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + f"{len(line) * 3:x}\r\n".encode() + line)
    else:
        raw = http(200, line, {"Content-Type": "application/jsonl"}, length=len(line) * 3)
    target = tmp_path / "batch-0001.output.jsonl"
    with Front(lambda req: raw) as front:
        with pytest.raises(BatchApiError) as caught:
            api_call(front, lambda api: api.download("file-out", target))
    assert_one_line_error(caught.value, "cannot download file file-out", "truncated_body")
    assert caught.value.transient and front.count("GET", "/compatible-mode/v1/files/file-out/content") == 2
    assert list(tmp_path.iterdir()) == []


def test_ids_from_a_state_file_stay_one_path_segment():
    """A batch id with a slash or a line break (a hand-edited state) asks for that id, percent-encoded: never
    another route, never an httpx.InvalidURL traceback."""
    with Front(lambda req: http(200, {**BATCH, "id": "a/../files"})) as front:
        batch = api_call(front, lambda api: api.retrieve("a/../files"))
        api_call(front, lambda api: api.cancel("batch\n1"))
    assert batch["id"] == "a/../files"
    assert front.seen == [("GET", "/compatible-mode/v1/batches/a%2F..%2Ffiles"),
                          ("POST", "/compatible-mode/v1/batches/batch%0A1/cancel")]


def test_a_malformed_batch_output_file_becomes_error_rows(tmp_path):
    """Output-file lines that are not JSON, not objects, lack a custom_id, carry one that is not text, are cut
    short or hold fields of the wrong type leave their rows as error rows that fit the table's types (never a
    crash, never a mistyped column)."""
    state, _, _ = plan(tmp_path, [request(i) for i in range(6)])
    record = state.records[0]
    record.status = "completed"
    ids = [custom_id(i, f"k{i}") for i in range(6)]
    good = {"status_code": 200, "request_id": "r", "body": {
        "id": "x", "object": "chat.completion", "model": "qwen-plus",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}}
    lines = [json.dumps({"custom_id": ids[0], "response": good}).encode(),
             b"{this is not json",
             b"[1, 2, 3]",
             json.dumps({"response": good}).encode(),  # no custom_id
             json.dumps({"custom_id": 3, "response": good}).encode(),  # a custom_id that is not text
             json.dumps({"custom_id": ids[4], "id": {"x": 1},
                         "response": {"status_code": "500", "request_id": ["r"], "body": "oops"}}).encode(),
             b"\xff\xfe not utf-8",
             json.dumps({"custom_id": ids[5], "response": good}).encode()[:30]]  # the last line cut short
    record.output_path(tmp_path).write_bytes(b"\n".join(lines) + b"\n")
    results = join_batch(record, tmp_path, PriceBook("singapore", job_model="qwen-plus", overrides={}, batch=True))
    assert [(r.row_id, r.status) for r in results] == [(0, "ok")] + [(i, "error") for i in range(1, 6)]
    assert [r.error_code for r in results[1:]] == ["batch_missing_line"] * 3 + [None, "batch_missing_line"]
    odd = results[4]
    assert odd.http_status is None and odd.request_id is None and odd.error_type == "PermanentCallError"
    table = results_to_table(results, result_schema((pa.field("n", pa.int64()),)))
    assert table.num_rows == 6 and table.column("status").to_pylist() == ["ok"] + ["error"] * 5


# -- 1, end to end: a garbled create answer ---------------------------------------------------------------

def upstream_of(emu: Emulator) -> str:
    return emu.openai_base_url.removesuffix("/compatible-mode/v1")


def test_a_create_carried_out_but_answered_garbled_is_found_not_sent_again(tmp_path, make_emulator):
    """POST /batches reaches the server but its answer is an HTML page: the run looks the batch up, follows it
    to the end and never creates a second one."""
    emu = make_emulator(**FAST_BATCHES)
    garbled: list[str] = []

    def answer(req: Req) -> bytes | None:
        if req.method == "POST" and req.path.endswith("/batches") and not garbled:
            req.forward()  # the batch exists now
            garbled.append(req.path)
            return http(200, "<html>proxy error</html>", {"Content-Type": "text/html"})
        return None

    write_prompts(tmp_path / "prompts.jsonl", 20)
    with Front(answer, upstream_of(emu)) as front:
        job = make_job(tmp_path, endpoint={"base_url": front.url}, run=BATCH_RUN)
        result = run_cli("run", str(job), "--quiet")
    assert result.code == 0, result.stderr
    assert garbled and emu.stats(keys=False)["batches"]["created"] == 1
    rows = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
    assert len(rows) == 20 and {r["status"] for r in rows} == {"ok"}


# -- 2. a key the server echoes is scrubbed everywhere -----------------------------------------------------

def echo_of(req: Req) -> str:
    auth = req.headers.get("authorization", "")
    return f"you sent Authorization: {auth} (key {auth.removeprefix('Bearer ')})"


def strings_in_table(path: Path) -> str:
    return json.dumps(pq.read_table(path).to_pylist(), default=str)


def test_a_key_echoed_in_batch_objects_and_answer_files_is_in_no_output(tmp_path, make_emulator):
    """A server that quotes the Authorization header in the batch object (errors, metadata) and in every error
    line of its files: the key is in no stdout/stderr, state file (at any step), output row or summary."""
    emu = make_emulator(batch_line_fault_rate=0.3, **FAST_BATCHES)
    state_path = tmp_path / "out" / "result.parquet.parts" / "batch-state.json"
    states: list[str] = []

    def answer(req: Req) -> bytes | None:
        if state_path.exists():
            states.append(state_path.read_text())
        if req.method == "GET" and "/batches/" in req.path:
            status, _, body = req.forward()
            batch = json.loads(body)
            batch["errors"] = {"object": "list", "data": [{"code": "echo", "message": echo_of(req)}]}
            batch["metadata"] = {"echo": echo_of(req)}
            return http(status, batch)
        if req.method == "GET" and req.path.endswith("/content"):
            status, _, body = req.forward()
            echoed = re.sub(rb'"message":\s*"', f'"message": "{echo_of(req)} '.encode(), body)
            return http(status, echoed, {"Content-Type": "application/jsonl"})
        return None

    write_prompts(tmp_path / "prompts.jsonl", 40)
    with Front(answer, upstream_of(emu)) as front:
        job = make_job(tmp_path, endpoint={"base_url": front.url}, run=BATCH_RUN)
        result = run_cli("run", str(job), key=CANARY)
    assert result.code == 0, result.stderr
    assert CANARY not in result.stdout + result.stderr
    assert states and all(CANARY not in state for state in states)
    assert any("you sent Authorization: Bearer ***" in state for state in states)  # the echo was there
    rows = strings_in_table(tmp_path / "out" / "result.parquet")
    assert CANARY not in rows and "you sent Authorization: Bearer ***" in rows
    summaries = list((tmp_path / "out").glob("*.json"))
    assert summaries and all(CANARY not in p.read_text() for p in summaries)


def live_state(parts: Path, base_url: str, batch_id: str = "batch_live") -> None:
    """A batch state naming one running batch on `base_url`, as a run leaves it when it is killed."""
    parts.mkdir(parents=True, exist_ok=True)
    (parts / "batch-state.json").write_text(json.dumps({
        "first_created_at": 1.0, "endpoint": {"dialect": "openai", "base_url": base_url, "emulator": False},
        "batches": [{"seq": 1, "model": "qwen-plus", "thinking": None, "rows": 3, "bytes": 300,
                     "input_file_id": "file-1", "batch_id": batch_id, "status": "in_progress"}]}))


@pytest.mark.parametrize("status", [400, 401, 500])
def test_status_and_cancel_errors_do_not_repeat_an_echoed_key(tmp_path, status):
    """`runner status` and `runner cancel` against a server whose every error quotes the Authorization header:
    one-line errors, exit 1, and the key in neither stream."""
    def answer(req: Req) -> bytes:
        return http(status, {"error": {"code": "InvalidParameter", "message": echo_of(req)}})

    write_prompts(tmp_path / "prompts.jsonl", 3)
    with Front(answer) as front:
        job = make_job(tmp_path, endpoint={"base_url": front.url}, run=BATCH_RUN)
        live_state(tmp_path / "out" / "result.parquet.parts", front.url)
        shown = run_cli("status", str(job), key=CANARY)
        cancelled = run_cli("cancel", str(job), key=CANARY)
    for result in (shown, cancelled):
        assert result.code == 1, result.stderr
        assert CANARY not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert shown.stderr.startswith("error: ") and len(shown.stderr.splitlines()) == 2  # error and hint
    if status != 401:  # a 401 is the usual "refused the credentials" error, which quotes nothing
        assert "Bearer ***" in shown.stderr and "Bearer ***" in cancelled.stdout


# -- 3. no credentials in a base URL -----------------------------------------------------------------------

SECRET_URL = f"http://runner:{PASSWORD}@127.0.0.1:9/compatible-mode/v1"


def assert_refused_quietly(result) -> None:
    assert result.code == 2, (result.stdout, result.stderr)
    assert PASSWORD not in result.stdout + result.stderr and "runner:" not in result.stderr
    assert "user name or password" in result.stderr and "DASHSCOPE_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_base_url_with_credentials_in_the_job_file_is_refused(tmp_path):
    """[endpoint] base_url with user:password@ is exit 2 for every command that reads the job, and the
    password is not repeated."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, endpoint={"base_url": SECRET_URL})
    for args in (["run"], ["run", "--executor", "batch"], ["validate"], ["status"], ["cancel"]):
        assert_refused_quietly(run_cli(args[0], str(job), *args[1:]))
    with pytest.raises(SpecError) as caught:
        load_job(job)
    assert "[endpoint] base_url" in caught.value.message and PASSWORD not in str(caught.value)


def test_a_base_url_with_credentials_as_a_flag_is_refused(tmp_path):
    """--base-url with user:password@ is exit 2 for run, validate, status and cancel, password unrepeated."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/compatible-mode/v1"})
    for command in ("run", "validate", "status", "cancel"):
        result = run_cli(command, str(job), "--base-url", SECRET_URL)
        assert_refused_quietly(result)
        assert "--base-url" in result.stderr


def test_a_base_url_with_credentials_in_a_state_file_is_refused(tmp_path):
    """A hand-edited batch state whose recorded base_url holds user:password@: status, cancel and a batch run
    stop with exit 2 naming the state file, without the password."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/compatible-mode/v1"}, run=BATCH_RUN)
    live_state(tmp_path / "out" / "result.parquet.parts", SECRET_URL)
    for args in (["status"], ["status", "--offline"], ["cancel"], ["run"]):
        result = run_cli(args[0], str(job), *args[1:])
        assert_refused_quietly(result)
        assert "batch-state.json: the recorded endpoint base_url" in result.stderr


def test_an_endpoint_built_in_code_refuses_credentials_too():
    """EndpointSpec itself refuses a base_url with userinfo (library users skip load_job), password unrepeated."""
    with pytest.raises(SpecError) as caught:
        EndpointSpec(base_url=SECRET_URL)
    assert PASSWORD not in caught.value.message and PASSWORD not in str(caught.value.hint)
    assert EndpointSpec(base_url="http://127.0.0.1:9/compatible-mode/v1").base_url


def test_the_runner_reads_no_proxy_variables(tmp_path, make_emulator):
    """What the README says: proxy variables pointing nowhere change nothing, online and in batch mode (so
    there is no place for proxy credentials to leak from, and none to put them)."""
    emu = make_emulator(**FAST_BATCHES)
    write_prompts(tmp_path / "prompts.jsonl", 5)
    nowhere = "http://127.0.0.1:9"
    env = {name: nowhere for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                      "all_proxy")}
    env.update(NO_PROXY="", no_proxy="")
    for executor in ("online", "batch"):
        job = make_job(tmp_path, emu, name=executor, run=BATCH_RUN, output={"path": f"out/{executor}.parquet"})
        result = run_cli("run", str(job), "--quiet", "--executor", executor, env=env)
        assert result.code == 0, result.stderr


def test_a_state_whose_rows_file_is_gone_is_an_error_line(tmp_path):
    """A killed run's parts folder missing a batch's rows sidecar (a half-copied folder): the rerun is a
    one-line error naming the file, not a pyarrow traceback."""
    out = tmp_path / "out" / "result.parquet"
    with Emulator(STILL, clock=ManualClock()) as emu:
        job, proc = _start_batches(tmp_path, emu, out, rows=20, lines=20)
        proc.kill()
        proc.wait(10)
        (out.with_name(out.name + ".parts") / "batch-0001.rows.parquet").unlink()
        result = run_cli("run", str(job), "--quiet", "--output", str(out), "--base-url", emu.openai_base_url)
    assert result.code == 1, result.stderr
    assert result.stderr.startswith("error: ") and "batch-0001.rows.parquet: cannot read the rows of batch-0001" \
        in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("edit, problem", [
    (lambda state: state.update(batches={"seq": 1}), '"batches" is not a list'),
    (lambda state: state["batches"][0].pop("seq"), "batch 1 has no seq (int)"),
    (lambda state: state["batches"][0].update(batch_id=7), "batch 1: batch_id is not text"),
    (lambda state: state["batches"][0].update(times={"created_at": "yesterday"}), "times are not whole seconds"),
])
def test_a_hand_edited_state_of_the_wrong_shape_is_an_error_line(tmp_path, edit, problem):
    """A batch state whose fields have the wrong type is `cannot read the batch state (...)`, not a traceback."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/compatible-mode/v1"}, run=BATCH_RUN)
    parts = tmp_path / "out" / "result.parquet.parts"
    live_state(parts, "http://127.0.0.1:9/compatible-mode/v1")
    state = json.loads((parts / "batch-state.json").read_text())
    edit(state)
    (parts / "batch-state.json").write_text(json.dumps(state))
    result = run_cli("status", str(job), "--offline")
    assert result.code == 1 and "cannot read the batch state" in result.stderr and problem in result.stderr, \
        result.stderr
    assert "Traceback" not in result.stderr
