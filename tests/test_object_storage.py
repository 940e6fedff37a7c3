"""Inputs on S3-compatible object storage (s3://bucket/key), end to end through the real CLI.

The store is tests/s3_server.py on 127.0.0.1 (it checks Signature V4 like S3), the API the emulator;
credentials reach the CLI through the environment only, as users give them.
"""

from __future__ import annotations

import gzip
import io
import json
import signal

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from tests.helpers import make_job, read_output, run_cli, start_cli, wait_until, write_prompts
from tests.s3_server import S3Server

KEY_ID = "AKIATESTLOOPBACK0001"
SECRET = "canary-secret-Zq81xkPw0o2B"  # must never show up anywhere the runner writes
IGNORED = {"started_at", "finished_at", "latency_ms", "duration_ms", "request_id"}


@pytest.fixture
def s3(monkeypatch):
    """A loopback S3 server that knows KEY_ID/SECRET, and those credentials in the environment."""
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with S3Server({KEY_ID: SECRET}) as server:
        yield server


def _s3_input(uri: str, server: S3Server, **more) -> dict:
    return {"path": uri, "id_column": "id", "prompt_column": "prompt", "keep_columns": ["n"],
            "s3_endpoint": server.endpoint, **more}


def _comparable(path) -> list[dict]:
    table = pq.read_table(path)
    return table.drop_columns([c for c in table.schema.names if c in IGNORED]).to_pylist()


def _upload_prompts(tmp_path, server: S3Server, name: str, rows: int) -> tuple[str, list[dict]]:
    """Write `name` locally (in a format chosen by its ending) and put the same bytes in bucket "data"."""
    local = tmp_path / name
    if name.endswith(".jsonl.gz"):
        records = write_prompts(tmp_path / "plain.jsonl", rows)
        local.write_bytes(gzip.compress((tmp_path / "plain.jsonl").read_bytes()))
    elif name.endswith(".csv"):
        records = write_prompts(tmp_path / "plain.parquet", rows)
        pcsv.write_csv(pq.read_table(tmp_path / "plain.parquet"), local)
    else:
        records = write_prompts(local, rows)
    return server.put("data", f"prompts/{name}", local.read_bytes()), records


def _assert_no_secret(result, tmp_path) -> None:
    assert SECRET not in result.stdout and SECRET not in result.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("name", ["prompts.parquet", "prompts.jsonl.gz", "prompts.csv"])
def test_input_on_s3_gives_the_same_table_as_the_local_file(tmp_path, emulator, s3, name):
    """A Parquet, a JSONL.gz and a CSV input read from s3:// give the table the same local file gives."""
    uri, records = _upload_prompts(tmp_path, s3, name, 300)
    keep = ["n"] if not name.endswith(".csv") else []
    local = make_job(tmp_path, emulator, name="local", output={"path": "out/local.parquet"},
                     input={"path": name, "id_column": "id", "prompt_column": "prompt", "keep_columns": keep})
    remote = make_job(tmp_path, emulator, name="remote", output={"path": "out/remote.parquet"},
                      input=_s3_input(uri, s3, keep_columns=keep))
    assert (result := run_cli("run", str(local))).code == 0, result.stderr
    result = run_cli("run", str(remote))
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/remote.parquet")
    assert [r["key"] for r in rows] == [r["id"] for r in records]
    assert {r["status"] for r in rows} == {"ok"}
    assert _comparable(tmp_path / "out/remote.parquet") == _comparable(tmp_path / "out/local.parquet")
    assert any(method == "GET" and path == f"/data/prompts/{name}" for method, path, _ in s3.requests)
    _assert_no_secret(result, tmp_path)


def test_parquet_on_s3_is_read_by_ranges_not_whole(tmp_path, s3):
    """A Parquet object is read with ranged GETs (footer, then row groups), so it streams like a local file."""
    records = [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(4000)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf, row_group_size=500)
    uri = s3.put("data", "big.parquet", buf.getvalue())
    job = make_job(tmp_path, input={"path": uri, "id_column": "id", "prompt_column": "prompt",
                                    "s3_endpoint": s3.endpoint})
    result = run_cli("validate", str(job))
    assert result.code == 0, result.stderr
    assert uri in result.stdout and "4,000" in result.stdout
    gets = [r for r in s3.requests if r[0] == "GET" and r[1] == "/data/big.parquet"]
    assert len(gets) >= 3  # footer + several row groups: never one whole-object download


def test_validate_reads_a_jsonl_input_on_s3(tmp_path, s3):
    """`runner validate` reads an s3:// JSONL input, renders every row and names the URI."""
    uri, _ = _upload_prompts(tmp_path, s3, "prompts.jsonl", 25)
    job = make_job(tmp_path, input=_s3_input(uri, s3))
    result = run_cli("validate", str(job))
    assert result.code == 0, result.stderr + result.stdout
    assert uri in result.stdout and "25" in result.stdout


def test_kill_and_rerun_resumes_an_s3_input(tmp_path, make_emulator, s3):
    """kill -9 mid-run then a rerun on an s3:// input: it resumes, and every row is in the output once."""
    uri, records = _upload_prompts(tmp_path, s3, "prompts.parquet", 1500)
    emu = make_emulator(latency_ms=20)
    job = make_job(tmp_path, emu, input=_s3_input(uri, s3),
                   run={"concurrency": 16, "part_rows": 100, "part_seconds": 0.2})
    proc = start_cli("run", str(job))
    wait_until(lambda: (tmp_path / "out/result.parquet.parts").exists() and emu.stats(keys=False)["requests"] >= 400
               or proc.poll() is not None, what="400 requests")
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    sent_before = emu.stats(keys=False)["requests"]
    final = run_cli("run", str(job))
    assert final.code == 0, final.stderr
    assert "resuming:" in final.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["key"] for r in rows] == [r["id"] for r in records]
    stats = emu.stats()
    assert len(stats["keys"]) == 1500 and stats["succeeded_more_than_once"] <= 16
    assert emu.stats(keys=False)["requests"] - sent_before < 1500  # the rerun sent only what was missing


def _one_error_line(result, uri: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.code == 2, result.stderr
    assert len(lines) == 1 and uri in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["run", "validate"])
def test_missing_bucket_and_key_are_one_line_errors(tmp_path, emulator, s3, command):
    """A wrong bucket or key stops `run` and `validate` with exit 2 and one line naming the URI."""
    s3.put("data", "prompts/real.jsonl", b'{"id": "a", "prompt": "hi"}\n')
    for uri, words in [("s3://nobucket/prompts/real.jsonl", "no such bucket"),
                       ("s3://data/prompts/missing.jsonl", "not found")]:
        job = make_job(tmp_path, emulator, input=_s3_input(uri, s3))
        result = run_cli(command, str(job))
        assert words in _one_error_line(result, uri)
        _assert_no_secret(result, tmp_path)
    assert emulator.stats(keys=False)["requests"] == 0


@pytest.mark.parametrize("key_id, secret", [(KEY_ID, "wrong-secret-value"), ("AKIAUNKNOWN000000000", SECRET)])
def test_wrong_credentials_are_access_denied_without_the_secret(tmp_path, emulator, s3, monkeypatch, key_id, secret):
    """A wrong secret or an unknown key id: exit 2, "access denied" naming the URI, the secret nowhere."""
    uri, _ = _upload_prompts(tmp_path, s3, "prompts.parquet", 10)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    job = make_job(tmp_path, emulator, input=_s3_input(uri, s3))
    result = run_cli("run", str(job))
    line = _one_error_line(result, uri)
    assert "access denied" in line and "AWS_SECRET_ACCESS_KEY" in result.stderr  # the hint names the variable
    assert secret not in result.stdout + result.stderr
    _assert_no_secret(result, tmp_path)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unreachable_endpoint_is_one_line_error(tmp_path, emulator, s3):
    """An endpoint nobody listens on: exit 2, "cannot connect" naming the URI and the endpoint."""
    s3.__exit__()  # its port is now closed
    uri = "s3://data/prompts/p.jsonl"
    job = make_job(tmp_path, emulator, input=_s3_input(uri, s3))
    result = run_cli("run", str(job))
    line = _one_error_line(result, uri)
    assert "cannot connect" in line and s3.endpoint in line
    _assert_no_secret(result, tmp_path)


def test_no_credentials_is_an_error_and_anonymous_reads_a_public_bucket(tmp_path, emulator, s3, monkeypatch):
    """Without AWS credentials in the environment the run stops (exit 2) unless s3_anonymous = true, which
    reads a public bucket unsigned."""
    uri, records = _upload_prompts(tmp_path, s3, "prompts.jsonl", 20)
    s3.public.add("data")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    job = make_job(tmp_path, emulator, input=_s3_input(uri, s3))
    line = _one_error_line(run_cli("run", str(job)), uri)
    assert "no credentials" in line and "AWS_ACCESS_KEY_ID" in line
    job = make_job(tmp_path, emulator, input=_s3_input(uri, s3, s3_anonymous=True))
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    assert [r["key"] for r in read_output(tmp_path / "out/result.parquet")] == [r["id"] for r in records]
    assert s3.unsigned_served > 0  # read without a signature: anonymous, not some credentials found elsewhere


def _aws_files(tmp_path, key_id: str, secret: str) -> dict[str, str]:
    """An AWS shared credentials file (profile "default") and the variables that point the SDK at it; the
    instance metadata service is switched off so nothing is asked beyond 127.0.0.1."""
    folder = tmp_path / "aws"
    folder.mkdir(exist_ok=True)
    (folder / "credentials").write_text(f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
    (folder / "config").write_text("[default]\n")
    return {"AWS_SHARED_CREDENTIALS_FILE": str(folder / "credentials"), "AWS_CONFIG_FILE": str(folder / "config"),
            "AWS_EC2_METADATA_DISABLED": "true"}


def test_aws_chain_reads_credentials_from_a_profile(tmp_path, emulator, s3, monkeypatch):
    """s3_credentials = "aws-chain": with no AWS_* keys in the environment, the keys of an AWS profile file sign
    the requests (the default, "environment", stops for want of the variables)."""
    uri, records = _upload_prompts(tmp_path, s3, "prompts.parquet", 30)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    env = _aws_files(tmp_path, KEY_ID, SECRET)
    plain = make_job(tmp_path, emulator, name="plain", input=_s3_input(uri, s3))
    result = run_cli("run", str(plain), env=env)
    assert result.code == 2 and "no credentials" in result.stderr, result.stderr
    chain = make_job(tmp_path, emulator, name="chain", input=_s3_input(uri, s3, s3_credentials="aws-chain"))
    result = run_cli("run", str(chain), env=env)
    assert result.code == 0, result.stderr
    assert [r["key"] for r in read_output(tmp_path / "out/result.parquet")] == [r["id"] for r in records]
    assert s3.unsigned_served == 0  # a private bucket: every request was signed with the profile's keys
    (tmp_path / "aws").rename(tmp_path / "aws-moved")  # the secret is in that file; nowhere else
    _assert_no_secret(result, tmp_path / "out")


def test_aws_chain_with_a_wrong_profile_is_access_denied(tmp_path, emulator, s3, monkeypatch):
    """A profile whose secret the store rejects: exit 2, access denied naming the AWS chain, the secret not shown."""
    uri, _ = _upload_prompts(tmp_path, s3, "prompts.jsonl", 5)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    wrong = "wrong-canary-Hb27ddQ0pLx"
    job = make_job(tmp_path, emulator, input=_s3_input(uri, s3, s3_credentials="aws-chain"))
    result = run_cli("run", str(job), env=_aws_files(tmp_path, KEY_ID, wrong))
    assert "access denied (credentials from the AWS chain)" in _one_error_line(result, uri)
    assert wrong not in result.stdout + result.stderr

def test_anonymous_on_a_private_bucket_is_access_denied(tmp_path, emulator, s3):
    """s3_anonymous = true on a bucket that is not public: exit 2, access denied (anonymous)."""
    uri, _ = _upload_prompts(tmp_path, s3, "prompts.jsonl", 5)
    job = make_job(tmp_path, emulator, input=_s3_input(uri, s3, s3_anonymous=True))
    assert "access denied (anonymous)" in _one_error_line(run_cli("run", str(job)), uri)


@pytest.mark.parametrize("input_keys, words", [
    ({"path": "gs://bucket/prompts.jsonl"}, "gs:// inputs are not supported"),
    ({"path": "s3://bucket-only"}, "expected s3://bucket/key"),
    ({"path": "prompts.jsonl", "s3_endpoint": "http://127.0.0.1:9000"}, "only applies to an s3:// path"),
    ({"path": "s3://b/p.jsonl", "s3_endpoint": "127.0.0.1:9000"}, "expected an http:// or https:// URL"),
    ({"path": "s3://b/p.jsonl", "s3_addressing": "dns"}, "expected one of path, virtual"),
    ({"path": "s3://b/p.jsonl", "s3_credentials": "profile"}, "expected one of environment, aws-chain"),
    ({"path": "s3://b/p.jsonl", "s3_credentials": "aws-chain", "s3_anonymous": True}, "set one or the other"),
    ({"path": "prompts.jsonl", "s3_credentials": "aws-chain"}, "only applies to an s3:// path"),
])
def test_bad_object_storage_keys_are_spec_errors(tmp_path, input_keys, words):
    """A URI of another scheme, a bucket without a key, or a bad s3_* key: exit 2 naming the key."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, input={"id_column": "id", "prompt_column": "prompt", **input_keys})
    result = run_cli("validate", str(job))
    assert result.code == 2 and words in result.stderr and "[input]" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_fingerprint_of_an_s3_input_names_the_object(tmp_path, s3):
    """The job fingerprint of an s3:// input records the object's name, as a local input's records the file's."""
    from runner.job import job_fingerprint
    from runner.spec import load_job

    job = make_job(tmp_path, input=_s3_input("s3://data/prompts/x.parquet", s3))
    assert job_fingerprint(load_job(job))["input"] == "x.parquet"
    assert json.dumps(job_fingerprint(load_job(job)))  # plain values: it is written beside the output


def test_virtual_hosted_addressing_puts_the_bucket_in_the_host(tmp_path, s3):
    """s3_addressing = "virtual" (what OSS requires) sends bucket.host/key requests, and they are read."""
    uri, _ = _upload_prompts(tmp_path, s3, "prompts.jsonl", 12)
    port = s3.endpoint.rsplit(":", 1)[1]
    job = make_job(tmp_path, input=_s3_input(uri, s3, s3_endpoint=f"http://localhost:{port}",
                                             s3_addressing="virtual"))
    result = run_cli("validate", str(job))
    assert result.code == 0, result.stderr
    assert "12" in result.stdout and s3.hosts and set(s3.hosts) == {"data.localhost"}


@pytest.mark.parametrize("endpoint, given, expected", [
    ("https://s3.oss-cn-hangzhou.aliyuncs.com", None, "virtual"),
    ("https://oss-cn-beijing-internal.aliyuncs.com", None, "virtual"),
    ("http://127.0.0.1:9000", None, "path"),
    (None, None, "virtual"),
    ("https://s3.oss-cn-hangzhou.aliyuncs.com", "path", "path"),
    ("http://minio:9000", "virtual", "virtual"),
])
def test_addressing_default_is_virtual_for_oss_only(endpoint, given, expected):
    """OSS endpoints (*.aliyuncs.com) and Amazon S3 default to virtual-hosted requests, other endpoints to path
    style; a given value wins."""
    from runner.object_store import ObjectStoreSettings

    assert ObjectStoreSettings(endpoint=endpoint, addressing=given).addressing_for() == expected


def test_store_failing_mid_download_is_a_one_line_error_and_a_rerun_resumes(tmp_path, emulator, s3):
    """A download that breaks after the first megabytes stops the run with exit 2 naming the URI (no
    traceback); the rows read before it are committed, and a rerun once the store works sends only the rest."""
    records = [{"id": f"row-{i:05d}", "prompt": f"Question {i}: " + "x" * 400} for i in range(8000)]
    data = "".join(json.dumps(r) + "\n" for r in records).encode()  # ~3.3 MB: several 1 MB reads
    uri = s3.put("data", "big.jsonl", data)
    s3.break_reads_from["big.jsonl"] = 2 * 1024 * 1024
    job = make_job(tmp_path, emulator, input={"path": uri, "id_column": "id", "prompt_column": "prompt",
                                              "s3_endpoint": s3.endpoint})
    result = run_cli("run", str(job))
    line = _one_error_line(result, uri)
    assert f"input became unreadable while reading (the connection to the object store at {s3.endpoint} failed)" \
        in line, line
    sent_before = emulator.stats(keys=False)["requests"]
    assert 0 < sent_before < len(records)
    del s3.break_reads_from["big.jsonl"]
    final = run_cli("run", str(job))
    assert final.code == 0, final.stderr
    assert [r["key"] for r in read_output(tmp_path / "out/result.parquet")] == [r["id"] for r in records]
    _assert_no_secret(final, tmp_path)


def test_scrub_removes_credentials_and_signatures_from_store_errors(monkeypatch):
    """Text quoted from the store or the SDK loses the credentials' values and any signature, on one line."""
    from runner.object_store import scrub

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-canary-777")
    text = (f"AWS Error UNKNOWN during GetObject: secret {SECRET}\nAuthorization: AWS4-HMAC-SHA256 "
            f"Credential={KEY_ID}/20260101/us-east-1/s3/aws4_request, Signature=abcdef0123 "
            "x-amz-security-token: session-token-canary-777")
    cleaned = scrub(text)
    assert "\n" not in cleaned and "GetObject" in cleaned
    for value in (SECRET, KEY_ID, "session-token-canary-777", "abcdef0123"):
        assert value not in cleaned
