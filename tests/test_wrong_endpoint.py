"""A wrong endpoint stops the run early instead of turning every row into a 404 error row.

A base_url that repeats a path the runner appends, or ends at the other dialect's root, is refused by
`runner run` before anything is sent and flagged by `runner validate`. A 404 for an unknown path or
for the job's own model before anything succeeded stops the run after at most `concurrency`
requests (exit 1, the URL, status and fix in the message), leaves the output unfinished, and a rerun
after the fix finishes the job. A per-row model that does not exist fails only its rows.
"""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from runner.clients import ChatClient, classify_answer
from runner.clients import dashscope_native as native
from runner.clients import openai_compat as compat
from runner.endpoint_check import EndpointGuard
from runner.endpoints import ApiKey, base_url_problem
from runner.errors import EndpointNotFound, NotFound, PermanentCallError
from runner.records import Request
from runner.spec import EndpointSpec
from tests.helpers import TEST_KEY, make_job, read_output, run_cli, write_prompts

CONCURRENCY = 4


# --- classification: which 404 names the model, which the path ------------------------------------

@pytest.mark.parametrize("dialect, status, body, what", [
    pytest.param(compat, 404, b'{"error":{"message":"The model `qwen-plux` does not exist or you do not have access '
                              b'to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}',
                 "model", id="compat-model_not_found"),
    pytest.param(compat, 404, b'{"error":{"message":"Unsupported model `x` for OpenAI compatibility mode.",'
                              b'"type":"invalid_request_error","code":"model_not_supported"}}', "model",
                 id="compat-model_not_supported"),
    pytest.param(native, 404, b'{"code":"ModelNotFound","message":"Model can not be found."}', "model",
                 id="native-ModelNotFound"),
    pytest.param(native, 400, b'{"code":"InvalidParameter","message":"Model not exist."}', "model",
                 id="native-400-model-not-exist"),
    pytest.param(native, 404, b'{"code":"NotFound","message":"Not found!"}', "path", id="native-NotFound"),
    pytest.param(compat, 404, b'{"code":"NotFound","message":"Not found!"}', "path", id="compat-NotFound"),
    pytest.param(compat, 404, b"<html><body>404 page not found</body></html>", "path", id="proxy-html"),
    pytest.param(native, 404, b"", "path", id="empty"),
])
def test_404_kinds(dialect, status: int, body: bytes, what: str) -> None:
    """A 404 (or the native 'Model not exist.' 400) is a NotFound row error saying whether the model or the path is unknown."""
    error = classify_answer(dialect, status, body, httpx.Headers({}))
    assert type(error) is NotFound and isinstance(error, PermanentCallError)
    assert error.what == what and error.http_status == status and not error.retryable


# --- base_url mistakes found without sending anything ------------------------------------------------

HOST = "http://127.0.0.1:8000"


@pytest.mark.parametrize("dialect, given, fixed, certain", [
    pytest.param("openai", f"{HOST}/compatible-mode/v1/chat/completions", f"{HOST}/compatible-mode/v1", True,
                 id="openai-chat-path"),
    pytest.param("openai", f"{HOST}/compatible-mode/v1/chat/completions/", f"{HOST}/compatible-mode/v1", True,
                 id="openai-chat-path-slash"),
    pytest.param("openai", f"{HOST}/api/v1", f"{HOST}/compatible-mode/v1", True, id="openai-native-root"),
    pytest.param("dashscope", f"{HOST}/compatible-mode/v1", f"{HOST}/api/v1", True, id="native-compat-root"),
    pytest.param("dashscope", f"{HOST}/api/v1/services/aigc/text-generation/generation", f"{HOST}/api/v1", True,
                 id="native-generation-path"),
    pytest.param("dashscope", f"{HOST}/compatible-mode/v1/chat/completions", f"{HOST}/api/v1", True,
                 id="native-compat-url"),
    pytest.param("openai", "https://dashscope-intl.aliyuncs.com",
                 "https://dashscope-intl.aliyuncs.com/compatible-mode/v1", False, id="dashscope-host-without-root"),
    pytest.param("openai", f"{HOST}/compatible-mode/v1", None, None, id="openai-right"),
    pytest.param("dashscope", f"{HOST}/api/v1/", None, None, id="native-right"),
    pytest.param("openai", "http://127.0.0.1:4000/v1", None, None, id="proxy-own-path"),
])
def test_base_url_problems(dialect: str, given: str, fixed: str | None, certain: bool | None) -> None:
    """A base_url ending in an appended path or the other dialect's root is certainly wrong and gets its fix;
    a DashScope host without the root is a warning; anything else (a proxy's own path) is left alone."""
    found = base_url_problem(EndpointSpec(dialect=dialect, base_url=given))
    if fixed is None:
        assert found is None
    else:
        assert (found.fixed, found.certain) == (fixed, certain)


@pytest.mark.parametrize("dialect, suffix, fixed_root", [
    pytest.param("openai", "/compatible-mode/v1/chat/completions", "/compatible-mode/v1", id="doubled-chat-path"),
    pytest.param("openai", "/api/v1", "/compatible-mode/v1", id="other-dialect-root"),
    pytest.param("dashscope", "/compatible-mode/v1", "/api/v1", id="native-with-compat-root"),
])
def test_certain_mistakes_are_refused_by_run_and_flagged_by_validate(tmp_path, emulator, dialect, suffix, fixed_root):
    """`runner run` refuses the base_url before sending anything (exit 2, the corrected URL in the hint);
    `runner validate` exits 0 with a warning naming the corrected URL."""
    write_prompts(tmp_path / "prompts.jsonl", 20)
    job = make_job(tmp_path, emulator, dialect=dialect, endpoint={"base_url": emulator.url + suffix})
    validated = run_cli("validate", str(job))
    assert validated.code == 0, validated.stdout + validated.stderr
    assert "warning    base_url" in validated.stdout and f'"{emulator.url}{fixed_root}"' in validated.stdout
    refused = run_cli("run", str(job))
    assert refused.code == 2 and "Traceback" not in refused.stderr
    assert f"set base_url = \"{emulator.url}{fixed_root}\"" in refused.stderr
    stats = emulator.stats(keys=False)
    assert stats["requests"] == 0 and stats["unrouted"] == 0
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- a 404 before anything worked stops the run --------------------------------------------------------

def _assert_stopped_early(result, *, sent: int, needles: tuple[str, ...], output) -> None:
    assert result.code == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert 1 <= sent <= CONCURRENCY
    assert not output.exists()  # not marked finished
    assert "PermanentCallError" not in result.stderr


@pytest.mark.parametrize("dialect, wrong_root, right_root, route", [
    pytest.param("openai", "/compatible-mode/v2", "/compatible-mode/v1", "/chat/completions", id="openai"),
    pytest.param("dashscope", "/api/v2", "/api/v1", "/services/aigc/text-generation/generation", id="dashscope"),
])
def test_unknown_path_stops_the_run_and_the_fixed_rerun_finishes(tmp_path, emulator, dialect, wrong_root, right_root,
                                                                  route):
    """A base_url the server has no route for: at most `concurrency` requests, exit 1 naming the URL, 404 and the
    fix; nothing is committed, so the rerun with the corrected base_url simply runs the whole job."""
    records = write_prompts(tmp_path / "prompts.jsonl", 60)
    job = make_job(tmp_path, emulator, dialect=dialect, endpoint={"base_url": emulator.url + wrong_root},
                   run={"concurrency": CONCURRENCY})
    out = tmp_path / "out/result.parquet"
    result = run_cli("run", str(job))
    stats = emulator.stats(keys=False)
    _assert_stopped_early(result, sent=stats["unrouted"], output=out,
                          needles=(f"{emulator.url}{wrong_root}{route}", "HTTP 404 NotFound",
                                   f"base_url should end at {right_root}" if dialect == "openai" else right_root,
                                   "the runner appends"))
    assert stats["requests"] == 0

    rerun = run_cli("run", str(job), "--base-url", emulator.url + right_root)
    assert rerun.code == 0, rerun.stderr
    rows = read_output(out)
    assert [r["key"] for r in rows] == [r["id"] for r in records]
    assert {r["status"] for r in rows} == {"ok"}


@pytest.mark.parametrize("dialect, model, fixed", [
    pytest.param("openai", "qwen-plux", "qwen-plus", id="openai"),
    pytest.param("dashscope", "qwen-plux", "qwen-plus", id="dashscope"),
    pytest.param("dashscope", "qwq-plux", "qwq-plus", id="dashscope-streamed"),  # the 404 arrives as an SSE frame
])
def test_misspelled_job_model_stops_the_run(tmp_path, emulator, dialect, model, fixed):
    """The job's model is unknown: at most `concurrency` requests, exit 1 naming the model, URL, status and
    'check the model name'; the output is not finished, and the rerun with the right model finishes it."""
    write_prompts(tmp_path / "prompts.jsonl", 60)
    job = make_job(tmp_path, emulator, dialect=dialect, model={"name": model},
                   run={"concurrency": CONCURRENCY})
    out = tmp_path / "out/result.parquet"
    result = run_cli("run", str(job))
    stats = emulator.stats(keys=False)
    assert stats["by_model"] == {model: stats["requests"]}
    _assert_stopped_early(result, sent=stats["requests"], output=out,
                          needles=(f"model {model!r} not found", "HTTP 404", "check the model name",
                                   emulator.openai_base_url if dialect == "openai" else emulator.dashscope_base_url))

    rerun = run_cli("run", str(job), "--model", fixed)
    assert rerun.code == 0, rerun.stderr
    rows = read_output(out)
    assert len(rows) == 60 and {r["status"] for r in rows} == {"ok"} and {r["model"] for r in rows} == {fixed}


def test_a_misspelled_model_among_names_stops_the_run(tmp_path, emulator):
    """[model] names with the second one misspelled: the run stops at that model's first answers (exit 1
    naming it, and saying a fixed list needs --restart), not after failing a third of the rows; the rerun
    with the names fixed and --restart writes every (row, model) once."""
    write_prompts(tmp_path / "prompts.jsonl", 60)
    job = make_job(tmp_path, emulator, model={"names": ["qwen-plus", "qwen-plux", "qwen-flash"]},
                   run={"concurrency": CONCURRENCY})
    out = tmp_path / "out/result.parquet"
    result = run_cli("run", str(job))
    stats = emulator.stats(keys=False)
    assert result.code == 1, result.stderr
    assert "Traceback" not in result.stderr and "model 'qwen-plux' not found" in result.stderr
    assert "check the model name" in result.stderr and "--restart" in result.stderr
    assert 1 <= stats["by_model"].get("qwen-plux", 0) <= CONCURRENCY
    assert stats["requests"] < 180 and not out.exists()

    fixed = make_job(tmp_path, emulator, model={"names": ["qwen-plus", "qwen-max", "qwen-flash"]},
                     run={"concurrency": CONCURRENCY})
    rerun = run_cli("run", str(fixed), "--restart")
    assert rerun.code == 0, rerun.stderr
    rows = read_output(out)
    assert len(rows) == 180 and {r["status"] for r in rows} == {"ok"}
    assert sorted((r["key"], r["model"]) for r in rows) == sorted(
        (f"row-{i:05d}", m) for i in range(60) for m in ("qwen-plus", "qwen-max", "qwen-flash"))

def test_one_misspelled_row_model_fails_only_its_rows(tmp_path, emulator):
    """With a model column, rows naming an unknown model become NotFound error rows (even when they come
    first) and the rows of good models succeed; the run is not stopped."""
    rows_in = [{"id": f"r{i}", "prompt": f"Question {i}", "model": "qwen-plux" if i < 10 or i % 7 == 0 else "qwen-flash"}
               for i in range(80)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_in), encoding="utf-8")
    job = make_job(tmp_path, emulator, input={"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt",
                                              "model_column": "model"}, run={"concurrency": CONCURRENCY})
    result = run_cli("run", str(job), "--max-error-rate", "1")
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert len(rows) == 80
    for row, given in zip(rows, rows_in):
        if given["model"] == "qwen-plux":
            assert (row["status"], row["error_type"], row["error_code"], row["http_status"]) == \
                ("error", "NotFound", "model_not_found", 404)
        else:
            assert row["status"] == "ok"


# --- the rule, on a client whose answers the test chooses -------------------------------------------

MODEL_404 = (404, b'{"error":{"message":"The model `qwen-plus` does not exist or you do not have access to it.",'
                  b'"type":"invalid_request_error","code":"model_not_found"}}')
PATH_404 = (404, b'{"code":"NotFound","message":"Not found!"}')
OK = (200, b'{"choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
           b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}')


def _guarded_outcomes(answers: list[tuple[int, bytes]], models: list[str]) -> list[str]:
    """Send one request per answer through EndpointGuard(ChatClient); name what each one ended as."""
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        status, body = queue.pop(0)
        return httpx.Response(status, content=body, headers={"content-type": "application/json"})

    spec = EndpointSpec(dialect="openai", base_url="http://127.0.0.1:9/compatible-mode/v1", transport="httpx")

    async def main() -> list[str]:
        outcomes = []
        async with ChatClient(spec, ApiKey(TEST_KEY), max_connections=2,
                              transport=httpx.MockTransport(handler)) as client:
            guard = EndpointGuard(client, dialect="openai", job_models=("qwen-plus", "qwen-max"))
            for i, model in enumerate(models):
                request = Request(row_id=i, key=str(i), model=model, messages=({"role": "user", "content": "x"},))
                try:
                    await guard.complete(request)
                    outcomes.append("ok")
                except EndpointNotFound as error:
                    assert isinstance(error.__cause__, NotFound)
                    outcomes.append("stop")
                except NotFound:
                    outcomes.append("row")
        return outcomes

    return anyio.run(main)


@pytest.mark.parametrize("answers, models, expected", [
    pytest.param([MODEL_404], ["qwen-plus"], ["stop"], id="job-model-unknown-first"),
    pytest.param([OK, MODEL_404], ["qwen-plus", "qwen-plus"], ["ok", "row"], id="job-model-404-after-success"),
    pytest.param([MODEL_404, MODEL_404], ["qwen-plux", "qwen-plux"], ["row", "row"], id="row-model-unknown"),
    pytest.param([OK, MODEL_404], ["qwen-flash", "qwen-plus"], ["ok", "stop"], id="job-model-unknown-after-other"),
    pytest.param([OK, MODEL_404], ["qwen-plus", "qwen-max"], ["ok", "stop"], id="second-job-model-unknown"),
    pytest.param([OK, MODEL_404], ["qwen-max", "qwen-max"], ["ok", "row"], id="second-job-model-404-after-success"),
    pytest.param([PATH_404], ["qwen-plus"], ["stop"], id="path-unknown-first"),
    pytest.param([OK, PATH_404], ["qwen-flash", "qwen-plus"], ["ok", "row"], id="path-404-after-success"),
])
def test_stop_rule(answers, models, expected) -> None:
    """A path 404 stops the run only before any success; a model 404 only for the job's own model before it
    succeeded; every other 404 is the row's own error."""
    assert _guarded_outcomes(answers, models) == expected


def test_emulator_answers_unknown_paths_like_the_gateway(emulator):
    """A path the emulator does not serve: 404 with the native NotFound body, counted as unrouted."""
    response = httpx.post(emulator.openai_base_url + "/chat/completions/chat/completions", json={},
                          headers={"Authorization": f"Bearer {TEST_KEY}"})
    assert response.status_code == 404
    assert response.json()["code"] == "NotFound" and response.json()["message"] == "Not found!"
    assert response.headers["x-request-id"] == response.json()["request_id"]
    stats = emulator.stats(keys=False)
    assert (stats["unrouted"], stats["requests"], stats["by_status"]) == (1, 0, {"404": 1})
