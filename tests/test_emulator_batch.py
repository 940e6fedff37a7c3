"""The emulator's OpenAI-compatible files and batches API over loopback: upload, validation, a
lifecycle driven by an injected clock, output and error files, cancel, expiry, paging, stats."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.emulator import Emulator, EmulatorConfig
from runner.emulator.batchfile import is_faulty

V1 = "/compatible-mode/v1"
AUTH = {"Authorization": "Bearer sk-test"}
PHASE = 3600.0  # emulated seconds per phase; with SCALE 3600, one fake-clock second
SCALE = 3600.0
MSG_DUPLICATE = (
    "The custom_id 'r1' for this request is a duplicate of another request. "
    "The custom_id parameter must be unique for each request in a batch."
)


class FakeClock:
    """Monotonic seconds the test sets by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def line(custom_id: str, text: str = "hello", model: str = "qwen-plus", **body: Any) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def jsonl(items: list[Any]) -> bytes:
    return b"".join(
        (item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n" for item in items
    )


class Batches:
    """An Emulator with a fake clock, plus an httpx client for the batch API."""

    def __init__(self, emu: Emulator, clock: FakeClock) -> None:
        self.emu, self.clock = emu, clock
        self.created: dict[str, float] = {}  # batch id -> fake-clock time of its creation
        self.http = httpx.Client(base_url=emu.url + V1, headers=AUTH, timeout=10)

    def upload(self, items: list[Any], name: str = "input.jsonl") -> dict:
        r = self.http.post("/files", files={"file": (name, jsonl(items))},
                           data={"purpose": "batch"})
        assert r.status_code == 200, r.text
        return r.json()

    def create(self, file_id: str, **extra: Any) -> httpx.Response:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                "completion_window": "24h", **extra}
        return self.http.post("/batches", json=body)

    def start(self, items: list[Any], **extra: Any) -> dict:
        r = self.create(self.upload(items)["id"], **extra)
        assert r.status_code == 200, r.text
        return r.json()

    def get(self, batch_id: str) -> dict:
        r = self.http.get(f"/batches/{batch_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def at(self, batch: dict, phases: float) -> dict:
        """The batch read `phases` phases after it was created."""
        self.clock.now = self.created[batch["id"]] + phases * PHASE / SCALE
        return self.get(batch["id"])

    def lines(self, file_id: str | None) -> list[dict]:
        if file_id is None:
            return []
        r = self.http.get(f"/files/{file_id}/content")
        assert r.status_code == 200
        return [json.loads(x) for x in r.content.splitlines()]


@contextmanager
def serving(**config: Any) -> Iterator[Batches]:
    clock = FakeClock()
    settings = {"batch_time_scale": SCALE, "batch_phase_seconds": PHASE, **config}
    with Emulator(EmulatorConfig(**settings), clock=clock) as emu:
        srv = Batches(emu, clock)
        with srv.http:
            yield srv


@pytest.fixture
def srv() -> Iterator[Batches]:
    with serving() as served:
        yield served


def started(srv: Batches, items: list[Any], **extra: Any) -> dict:
    batch = srv.start(items, **extra)
    srv.created[batch["id"]] = srv.clock.now
    return batch


def join(srv: Batches, batch: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """Output and error lines by custom_id; no custom_id in both or twice."""
    out, err = srv.lines(batch["output_file_id"]), srv.lines(batch["error_file_id"])
    ids = [x["custom_id"] for x in out + err]
    assert len(ids) == len(set(ids))
    return {x["custom_id"]: x for x in out}, {x["custom_id"]: x for x in err}


# -- files -----------------------------------------------------------------------------------


def test_file_upload_info_content_delete(srv: Batches) -> None:
    """POST /files returns the file object; GET, /content (raw bytes) and DELETE work; then 404."""
    data = [line("a"), line("b")]
    info = srv.upload(data, name="in.jsonl")
    assert info["id"].startswith("file-batch-")
    assert info == {"id": info["id"], "bytes": len(jsonl(data)), "created_at": info["created_at"],
                    "filename": "in.jsonl", "object": "file", "purpose": "batch",
                    "status": "processed", "status_details": None}
    assert srv.http.get(f"/files/{info['id']}").json() == info
    assert srv.http.get(f"/files/{info['id']}/content").content == jsonl(data)
    r = srv.http.delete(f"/files/{info['id']}")
    assert r.json() == {"id": info["id"], "object": "file", "deleted": True}
    r = srv.http.get(f"/files/{info['id']}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NotFound"


def test_upload_needs_purpose_batch(srv: Batches) -> None:
    """An upload without purpose=batch is a 400."""
    r = srv.http.post("/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"


def test_auth_is_required(srv: Batches) -> None:
    """Files and batches need a bearer sk- key like the chat endpoint: 401 invalid_api_key."""
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer nope"}):
        for r in (srv.http.get("/batches", headers=headers),
                  srv.http.post("/files", headers=headers, files={"file": ("x", b"")}),
                  srv.http.get("/files/file-batch-1/content", headers=headers)):
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.json()["request_id"] == r.headers["x-request-id"]


# -- lifecycle -------------------------------------------------------------------------------


def test_batch_moves_through_every_status_and_delivers_every_line(srv: Batches) -> None:
    """validating -> in_progress (lines finish evenly) -> finalizing -> completed, one phase
    each; the output file holds every custom_id once, in a shuffled order."""
    ids = [f"r{i:02d}" for i in range(20)]
    meta = {"ds_name": "job-1", "ds_description": "nightly"}
    batch = started(srv, [line(i, f"text {i}") for i in ids], metadata=meta)
    assert batch["id"].startswith("batch_")
    assert batch["object"] == "batch" and batch["metadata"] == meta
    assert batch["status"] == "validating"
    assert batch["expires_at"] == batch["created_at"] + 24 * 3600
    assert batch["request_counts"] == {"total": 20, "completed": 0, "failed": 0}
    assert srv.at(batch, 0.9)["status"] == "validating"
    mid = srv.at(batch, 1.5)
    assert mid["status"] == "in_progress"
    assert mid["in_progress_at"] == batch["created_at"] + PHASE
    assert mid["request_counts"] == {"total": 20, "completed": 10, "failed": 0}
    assert mid["output_file_id"] is None
    late = srv.at(batch, 2.5)
    assert late["status"] == "finalizing"
    assert late["finalizing_at"] == batch["created_at"] + 2 * PHASE
    assert late["request_counts"]["completed"] == 20
    done = srv.at(batch, 3.5)
    assert done["status"] == "completed"
    assert done["completed_at"] == batch["created_at"] + 3 * PHASE
    for name in ("failed_at", "expired_at", "cancelling_at", "cancelled_at", "errors",
                 "error_file_id"):
        assert done[name] is None
    assert done["output_file_id"].startswith("file-batch_output-")
    out, err = join(srv, done)
    assert set(out) == set(ids) and err == {}
    order = [x["custom_id"] for x in srv.lines(done["output_file_id"])]
    assert order != ids  # shuffled: clients join on custom_id
    sample = out["r03"]
    assert sample["error"] is None and sample["id"] == sample["response"]["request_id"]
    assert sample["response"]["status_code"] == 200
    assert sample["response"]["body"]["id"] == "chatcmpl-" + sample["id"]
    assert sample["response"]["body"]["choices"][0]["message"]["content"] == "Echo: text r03"
    # Files are made once: later reads name the same file.
    assert srv.at(batch, 9)["output_file_id"] == done["output_file_id"]


def test_answers_equal_the_chat_endpoint(srv: Batches) -> None:
    """Each output line carries the chat endpoint's answer for the same body; a body the chat
    endpoint rejects lands in the error file with the same status and code."""
    bodies = {
        "plain": line("plain", "what is 2+2")["body"],
        "short": line("short", "x" * 100, max_tokens=3)["body"],
        "json": line("json", "reply in json", response_format={"type": "json_object"})["body"],
        "bad": line("bad", "think", enable_thinking=True)["body"],
    }
    items = [{"custom_id": k, "method": "POST", "url": "/v1/chat/completions", "body": b}
             for k, b in bodies.items()]
    out, err = join(srv, srv.at(started(srv, items), 3))
    for key, body in bodies.items():
        chat = srv.http.post("/chat/completions", json=body)
        if key == "bad":
            assert chat.status_code == 400
            response = err[key]["response"]
            assert response["status_code"] == 400
            assert response["body"]["error"] == chat.json()["error"]
            assert err[key]["error"] == {"code": "invalid_parameter_error",
                                         "message": chat.json()["error"]["message"]}
            continue
        got = out[key]["response"]["body"]
        want = chat.json()
        for name in ("choices", "usage", "model", "object"):
            assert got[name] == want[name], name


def test_line_faults_are_deterministic() -> None:
    """batch_line_fault_rate sends the same custom_ids to the error file (as 500s) every time,
    as the hash of (seed, custom_id) says; counts match the files."""
    ids = [f"k{i}" for i in range(40)]
    failed_sets = []
    for _ in range(2):
        with serving(batch_line_fault_rate=0.3, seed=5) as srv:
            batch = srv.at(started(srv, [line(i) for i in ids]), 3)
            out, err = join(srv, batch)
            assert set(out) | set(err) == set(ids)
            assert batch["request_counts"] == {"total": 40, "completed": len(out),
                                               "failed": len(err)}
            failed_sets.append(set(err))
            sample = next(iter(err.values()))
            assert sample["response"]["status_code"] == 500
            assert sample["error"]["code"] == "internal_error"
            assert sample["response"]["body"]["error"]["code"] == "internal_error"
    config = EmulatorConfig(batch_line_fault_rate=0.3, seed=5)
    assert failed_sets[0] == failed_sets[1] == {i for i in ids if is_faulty(config, i)}
    assert 0 < len(failed_sets[0]) < 40


# -- validation ------------------------------------------------------------------------------

MIXED = [line("a"), line("b", model="qwen-max"), line("c")]
DUPLICATE = [line("r1"), line("r2"), line("r1")]
BAD_JSON = [line("a"), b'{"custom_id": "b", "method": ', line("c")]


@pytest.mark.parametrize(("items", "config", "code", "message", "at_line"), [
    (DUPLICATE, {}, "duplicate_custom_id", MSG_DUPLICATE, 3),
    (MIXED, {}, "mismatched_model",
     "The model 'qwen-max' for this request does not match the rest of the batch. "
     "Each batch must contain requests for a single model.", 2),
    (BAD_JSON, {}, "invalid_json_line", "This line is not parseable as valid JSON.", 2),
    ([line(str(i)) for i in range(4)], {"batch_max_lines": 3}, "too_many_tasks",
     "The input file has 4 requests; a batch may contain at most 3.", None),
    ([line("a"), line("b", "x" * 300)], {"batch_max_line_bytes": 200}, "request_too_large",
     None, 2),
    ([line("a")], {"batch_fail_validation": True}, "validation_failed", None, None),
], ids=["duplicate", "mixed-models", "bad-json", "too-many-lines", "line-too-large", "injected"])
def test_validation_failures(
    items: list[Any], config: dict, code: str, message: str | None, at_line: int | None
) -> None:
    """A bad input file: validating for one phase, then failed with errors.data and no files."""
    with serving(**config) as srv:
        batch = started(srv, items)
        assert batch["status"] == "validating"
        failed = srv.at(batch, 1.01)
        assert failed["status"] == "failed"
        assert failed["failed_at"] == batch["created_at"] + PHASE
        assert failed["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        assert failed["output_file_id"] is None and failed["error_file_id"] is None
        assert failed["errors"]["object"] == "list"
        (entry,) = failed["errors"]["data"]
        assert (entry["code"], entry["line"]) == (code, at_line)
        if message is not None:
            assert entry["message"] == message
        assert srv.at(batch, 5)["status"] == "failed"


def test_unknown_model_is_404_at_create(srv: Batches) -> None:
    """A model the Batch API does not serve: 404 ModelNotFound at create; no batch is made."""
    r = srv.create(srv.upload([line("a", model="qwen-nope")])["id"])
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "ModelNotFound"
    assert r.json()["error"]["message"] == (
        "The provided model qwen-nope is not supported by the Batch API.")
    assert srv.emu.stats()["batches"]["created"] == 0


def test_create_checks_file_endpoint_and_window(srv: Batches) -> None:
    """Unknown input file 404; wrong endpoint and windows outside 24h..336h are 400; "14d" is ok."""
    file_id = srv.upload([line("a")])["id"]
    assert srv.create("file-batch-missing").status_code == 404
    assert srv.create(file_id, endpoint="/v1/embeddings").status_code == 400
    for window in ("23h", "337h", "15d", "24", "day"):
        r = srv.create(file_id, completion_window=window)
        assert r.status_code == 400 and r.json()["error"]["param"] == "completion_window"
    ok = srv.create(file_id, completion_window="14d").json()
    assert ok["expires_at"] == ok["created_at"] + 336 * 3600
    assert srv.create(file_id, completion_window="336h").status_code == 200


# -- ends other than completed -----------------------------------------------------------------


def test_expiry_after_a_fraction_delivers_partial_output() -> None:
    """batch_expire_after_fraction=0.5: expired halfway through in_progress; the finished half
    is in the output file, the rest in the error file as batch_expired."""
    with serving(batch_expire_after_fraction=0.5) as srv:
        ids = [f"e{i}" for i in range(10)]
        batch = started(srv, [line(i) for i in ids])
        assert srv.at(batch, 1.4)["status"] == "in_progress"
        expired = srv.at(batch, 1.6)
        assert expired["status"] == "expired"
        assert expired["expired_at"] == batch["created_at"] + 1.5 * PHASE
        assert expired["request_counts"] == {"total": 10, "completed": 5, "failed": 5}
        out, err = join(srv, expired)
        assert len(out) == 5 and set(out) | set(err) == set(ids)
        assert {x["error"]["code"] for x in err.values()} == {"batch_expired"}


def test_completion_window_expiry() -> None:
    """Phases longer than the window: the batch expires at expires_at with the lines done by then."""
    with serving(batch_phase_seconds=50_000.0) as srv:
        batch = started(srv, [line(f"w{i}") for i in range(10)])
        srv.clock.now = srv.created[batch["id"]] + 86_401 / SCALE
        expired = srv.get(batch["id"])
        assert expired["status"] == "expired"
        assert expired["expired_at"] == expired["expires_at"]
        # 36,400 of 50,000 in_progress seconds had passed: 7 of 10 lines.
        assert expired["request_counts"] == {"total": 10, "completed": 7, "failed": 3}


def test_cancel_delivers_finished_lines(srv: Batches) -> None:
    """Cancel in in_progress: cancelling until the next phase boundary, then cancelled; lines
    finished before the cancel are delivered, the rest are batch_cancelled errors."""
    ids = [f"c{i}" for i in range(10)]
    batch = started(srv, [line(i) for i in ids])
    srv.at(batch, 1.25)
    r = srv.http.post(f"/batches/{batch['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    assert r.json()["cancelling_at"] == batch["created_at"] + 1.25 * PHASE
    assert srv.at(batch, 1.9)["status"] == "cancelling"
    cancelled = srv.at(batch, 2.1)
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelled_at"] == batch["created_at"] + 2 * PHASE
    assert cancelled["finalizing_at"] is None and cancelled["completed_at"] is None
    assert cancelled["request_counts"] == {"total": 10, "completed": 2, "failed": 8}
    out, err = join(srv, cancelled)
    assert len(out) == 2 and set(out) | set(err) == set(ids)
    assert {x["error"]["code"] for x in err.values()} == {"batch_cancelled"}
    # Cancelling again is a no-op; a completed batch cannot be cancelled.
    assert srv.http.post(f"/batches/{batch['id']}/cancel").json()["status"] == "cancelled"
    other = started(srv, [line("x")])
    srv.at(other, 3.5)
    assert srv.http.post(f"/batches/{other['id']}/cancel").status_code == 400


def test_cancel_while_validating_runs_nothing(srv: Batches) -> None:
    """Cancelled during validating: cancelled when validation would end, no output file."""
    batch = started(srv, [line("a"), line("b")])
    srv.http.post(f"/batches/{batch['id']}/cancel")
    cancelled = srv.at(batch, 1.0)
    assert cancelled["status"] == "cancelled" and cancelled["in_progress_at"] is None
    out, err = join(srv, cancelled)
    assert out == {} and set(err) == {"a", "b"}


# -- listing and stats -------------------------------------------------------------------------


def test_list_is_newest_first_with_paging(srv: Batches) -> None:
    """GET /batches: newest first, `limit` and `after` page through all of them."""
    made = []
    for i in range(5):
        made.append(started(srv, [line("a")], metadata={"ds_name": f"n{i}"})["id"])
        srv.clock.now += 0.01
    newest_first = list(reversed(made))
    page = srv.http.get("/batches", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [b["id"] for b in page["data"]] == newest_first[:2]
    assert (page["first_id"], page["last_id"]) == (newest_first[0], newest_first[1])
    seen = [b["id"] for b in page["data"]]
    while page["has_more"]:
        page = srv.http.get("/batches", params={"limit": 2, "after": page["last_id"]}).json()
        seen += [b["id"] for b in page["data"]]
    assert seen == newest_first
    assert [b["id"] for b in srv.http.get("/batches").json()["data"]] == newest_first
    named = srv.http.get("/batches", params={"ds_name": "n1"}).json()["data"]
    assert [b["id"] for b in named] == [made[1]]
    assert srv.http.get("/batches", params={"limit": 0}).status_code == 400


def test_stats_count_batches_and_files_but_not_chat_requests() -> None:
    """stats.batches/files count uploads, batches, lines and statuses; batch calls bypass the
    rate limiter and the chat counters."""
    with serving(rpm=60) as srv:
        done = started(srv, [line("a"), line("b")])
        srv.at(done, 3.5)
        started(srv, [line("c")])
        for _ in range(5):
            srv.get(done["id"])
        stats = srv.emu.stats()
        assert stats["batches"] == {"created": 2, "by_status": {"completed": 1, "validating": 1},
                                    "lines": 3}
        assert stats["files"]["uploaded"] == 2
        assert stats["files"]["bytes"] == len(jsonl([line("a"), line("b")])) + len(
            jsonl([line("c")]))
        assert stats["requests"] == 0 and stats["admitted"] == {}
        assert stats["rejected"] == {"rpm": 0, "tpm": 0, "burst": 0}
        assert httpx.get(srv.emu.url + "/_emulator/stats").json()["batches"] == stats["batches"]
        srv.emu.reset()
        assert srv.emu.stats()["batches"]["created"] == 0


# -- clients and config ------------------------------------------------------------------------


def test_openai_client_round_trip(srv: Batches) -> None:
    """openai-python's files/batches calls work against the emulator (facts 7.1)."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(api_key="sk-test", base_url=srv.emu.openai_base_url, max_retries=0)
    uploaded = client.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    srv.clock.now += 3.5 * PHASE / SCALE
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 1
    content = client.files.content(batch.output_file_id).content
    assert json.loads(content)["custom_id"] == "a"
    assert [b.id for b in client.batches.list(limit=5)] == [batch.id]


def test_config_and_cli_flags_are_checked() -> None:
    """Batch settings are range-checked in EmulatorConfig and by the CLI flags."""
    for bad in ({"batch_time_scale": 0}, {"batch_line_fault_rate": 1.5},
                {"batch_expire_after_fraction": -0.1}, {"batch_max_lines": 0},
                {"batch_phase_seconds": -1}):
        with pytest.raises(ValueError):
            EmulatorConfig(**bad)
    for flags in (["--batch-line-faults", "2"], ["--batch-time-scale", "0"],
                  ["--batch-expire-after", "1.5"]):
        result = CliRunner().invoke(main, ["emulator", *flags])
        assert result.exit_code == 2, result.output
