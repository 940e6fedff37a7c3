"""CSV, TSV and JSON-array inputs through the real CLI: the same rows give the same output table as JSONL,
row ids are stable across a resume, bad rows name the row as the user counts it, and an empty input warns
(or, with --fail-on-empty, exits 2)."""

from __future__ import annotations

import csv
import gzip
import json
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import make_job, read_output, run_cli, start_cli, wait_until

IGNORED = {"started_at", "finished_at", "latency_ms", "duration_ms", "time_to_first_token_ms", "request_id", "error_message"}
NOWHERE = {"base_url": "http://127.0.0.1:9/compatible-mode/v1"}  # nothing listens: nothing may be sent


def _records(rows: int) -> list[dict]:
    """Rows with text a CSV writer must quote (comma, quote, newline), a number and a leading-zero id; row 2
    has an empty prompt (a bad row in every format)."""
    return [{"id": f"00{i}", "prompt": "" if i == 2 else f'Question {i}, "quoted"\nline two',
             "n": i, "note": f"tab\there {i}"} for i in range(rows)]


def _write(path: Path, records: list[dict]) -> None:
    """`records` in the format the file name says."""
    name = path.name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as fh:
        if ".jsonl" in name:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
        elif ".json" in name:
            json.dump(records, fh, indent=2)
        else:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]), delimiter="\t" if ".tsv" in name else ",")
            writer.writeheader()
            writer.writerows(records)


def _comparable(path: Path) -> list[dict]:
    table = pq.read_table(path).sort_by("row_id")
    return table.drop_columns([c for c in table.schema.names if c in IGNORED]).to_pylist()


def _job(tmp_path: Path, emu, filename: str, **input_keys) -> Path:
    stem = filename.replace(".", "_")
    return make_job(tmp_path, emu, name=stem, output={"path": f"out/{stem}.parquet"}, run={"max_error_rate": 0.5},
                    input={"path": filename, "id_column": "id", "prompt_column": "prompt",
                           "keep_columns": ["n", "note"], **input_keys})


def test_csv_tsv_and_json_array_give_the_jsonl_table(tmp_path, emulator):
    """The same rows as .csv, .tsv, .csv.gz and .json give the same output table (columns, keys, kept values,
    answers, the bad row) as .jsonl; each bad row's message names it as its format counts rows."""
    records = _records(6)
    expected_where = {"p.jsonl": "p.jsonl line 3:", "p.csv": "p.csv data row 3:", "p.tsv": "p.tsv data row 3:",
                      "p.csv.gz": "p.csv.gz data row 3:", "p.json": "p.json array element 2:"}
    tables = {}
    for filename, where in expected_where.items():
        _write(tmp_path / filename, records)
        result = run_cli("run", str(_job(tmp_path, emulator, filename)))
        assert result.code == 0, result.stderr
        out = tmp_path / "out" / f"{filename.replace('.', '_')}.parquet"
        tables[filename] = _comparable(out)
        bad = [r for r in read_output(out) if r["status"] != "ok"]
        assert len(bad) == 1 and bad[0]["row_id"] == 2, bad
        assert bad[0]["error_message"].startswith(where), bad[0]["error_message"]
    reference = tables.pop("p.jsonl")
    assert [r["key"] for r in reference] == [f"00{i}" for i in range(6)]
    assert reference[1]["n"] == "1" and reference[1]["note"] == "tab\there 1"
    assert reference[1]["response"].startswith('Echo: Question 1, "quoted"\nline two')
    for filename, table in tables.items():
        assert table == reference, filename


def test_csv_json_text_columns_and_validate(tmp_path):
    """A CSV messages column and params column hold JSON text: validate and --dry-run render them into the
    request body; bad JSON text and invalid UTF-8 are bad rows naming the data row, not a failed file."""
    path = tmp_path / "chat.csv"
    messages = json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi, there"}])
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "messages", "params"])
        writer.writerow(["a", messages, json.dumps({"temperature": 0.1})])
        writer.writerow(["b", "[not json", ""])
        writer.writerow(["c", messages, ""])
    path.write_bytes(path.read_bytes() + b'd,"[{""role"": ""user"", ""content"": ""bad \xff byte""}]",\n')
    job = make_job(tmp_path, endpoint=NOWHERE,
                   input={"path": "chat.csv", "id_column": "id", "messages_column": "messages",
                          "params_column": "params"})
    result = run_cli("validate", str(job))
    assert result.code == 3, result.stdout + result.stderr  # 2 of 4 rows invalid, more than max_error_rate 0
    assert "input      " in result.stdout and "(csv, 4 rows)" in result.stdout
    assert "2 valid, 2 invalid" in result.stdout
    assert "chat.csv data row 2: column 'messages': invalid JSON" in result.stdout
    assert "chat.csv data row 4:" in result.stdout and "UTF-8" in result.stdout
    dry = run_cli("run", str(job), "--dry-run", "-q")
    assert dry.code == 0, dry.stderr
    lines = [json.loads(line) for line in (tmp_path / "out" / "result.requests.jsonl").read_text().splitlines()]
    assert [line["key"] for line in lines] == ["a", "b", "c", "d"]
    assert lines[0]["body"]["messages"][1] == {"role": "user", "content": "hi, there"}
    assert lines[0]["body"]["temperature"] == 0.1
    assert "problem" in lines[1] and "problem" in lines[3] and "body" in lines[2]


def test_csv_run_resumes_by_row(tmp_path, make_emulator):
    """An interrupted CSV run resumes: the rerun sends only the rows not yet answered (row ids are stable)."""
    emu = make_emulator(latency_ms=200)
    records = [{"id": f"k{i}", "prompt": f"Question {i}", "n": i, "note": ""} for i in range(120)]
    _write(tmp_path / "p.csv", records)
    job = _job(tmp_path, emu, "p.csv", keep_columns=["n"])
    proc = start_cli("run", str(job), "--concurrency", "8")
    wait_until(lambda: emu.stats(keys=False)["requests"] >= 16, what="some requests")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    answered = emu.stats(keys=False)["by_status"]["200"]
    assert 16 <= answered < 120
    result = run_cli("run", str(job), "--concurrency", "32")
    assert result.code == 0, result.stderr
    assert f"resuming: {answered} rows already done" in result.stderr
    rows = read_output(tmp_path / "out" / "p_csv.parquet")
    assert [r["row_id"] for r in rows] == list(range(120)) and [r["key"] for r in rows] == [f"k{i}" for i in range(120)]
    assert emu.stats()["succeeded_more_than_once"] == 0


@pytest.mark.parametrize("filename,content", [
    ("empty.csv", "id,prompt\n"), ("blank.tsv", ""), ("empty.json", "[]\n"), ("empty.jsonl.gz", None),
])
def test_empty_input_warns_and_fail_on_empty_exits_2(tmp_path, emulator, filename, content):
    """An input with no rows: run (and validate, checked once) warn on stderr and exit 0 (run writes an empty
    table); with --fail-on-empty both exit 2."""
    path = tmp_path / filename
    if content is None:
        path.write_bytes(gzip.compress(b"\n"))
    else:
        path.write_text(content)
    job = make_job(tmp_path, emulator, input={"path": filename, "id_column": "id", "prompt_column": "prompt"})
    for command in ("validate", "run") if filename == "empty.csv" else ("run",):
        result = run_cli(command, str(job))
        assert result.code == 0, result.stderr
        assert f"warning: {path} has no rows" in result.stderr
        failed = run_cli(command, str(job), "--fail-on-empty")
        assert failed.code == 2, failed.stderr
        assert f"error: {path} has no rows" in failed.stderr and "Traceback" not in failed.stderr
    assert read_output(tmp_path / "out" / "result.parquet") == []


def test_rows_are_not_warned_about(tmp_path, emulator):
    """An input with rows gives no empty-input warning, and --fail-on-empty lets it run."""
    _write(tmp_path / "p.tsv", _records(3))
    result = run_cli("run", str(_job(tmp_path, emulator, "p.tsv")), "--fail-on-empty")
    assert result.code == 0, result.stderr
    assert "has no rows" not in result.stderr
    assert len(read_output(tmp_path / "out" / "p_tsv.parquet")) == 3


def test_json_array_parser_across_chunk_boundaries(tmp_path, monkeypatch):
    """The element-by-element parser gives json.loads' elements when every element, string and number is cut
    by a buffer boundary, and names the element and character of a syntax error."""
    from runner import json_array
    from runner.errors import SourceError

    monkeypatch.setattr(json_array, "_CHUNK_CHARS", 7)
    values = [{"x": i, "s": "é\"\\" * i, "f": 1.5e10 + i} for i in range(30)] + [123456789, "text", None, [1, 2]]
    path = tmp_path / "a.json"
    for text in (json.dumps(values, ensure_ascii=False, indent=2), json.dumps(values), "\ufeff" + json.dumps(values)):
        path.write_text(text, encoding="utf-8")
        assert list(json_array.JsonArrayReader(path, gzipped=False, max_element_chars=10_000)) == values
    bad = {'[{"a": 1},]': "array element 1: invalid JSON (Expecting value)",
           '[{"a": 1}] x': "text after the array's closing ']' (character 12)",
           '[{"a": 1} {"b": 2}]': "after array element 0: expected ',' or ']' (character 11)",
           '[{"a": 1': "array element 0: invalid JSON",
           '{"a": 1}': "expected a JSON array of objects, the file holds an object",
           '[{"a": "' + "x" * 500 + '"}]': "array element 0: longer than 100 characters"}
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(SourceError) as caught:
            list(json_array.JsonArrayReader(path, gzipped=False, max_element_chars=100))
        assert message in caught.value.message, (text, caught.value.message)
    for empty in ("", " \n", "[]", "[ ]"):
        path.write_text(empty)
        assert list(json_array.JsonArrayReader(path, gzipped=False, max_element_chars=100)) == []


def test_fail_on_empty_from_the_job_file(tmp_path):
    """`[input] fail_on_empty = true` makes an empty input exit 2 without the flag; false (the default) warns."""
    (tmp_path / "empty.csv").write_text("id,prompt\n")
    strict = make_job(tmp_path, endpoint=NOWHERE, name="strict",
                      input={"path": "empty.csv", "prompt_column": "prompt", "fail_on_empty": True})
    result = run_cli("validate", str(strict))
    assert result.code == 2 and "error: " in result.stderr and "empty.csv has no rows" in result.stderr
    lenient = make_job(tmp_path, endpoint=NOWHERE, name="lenient",
                       input={"path": "empty.csv", "prompt_column": "prompt", "fail_on_empty": False})
    result = run_cli("validate", str(lenient))
    assert result.code == 0 and "warning: " in result.stderr and "empty.csv has no rows" in result.stderr
