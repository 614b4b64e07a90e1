"""The one record reader: every line checked against the contract, every failure one error naming FILE:LINE."""

import json

import pytest

from bench.measuring import record
from qlora.config import ConfigError, RunConfig


def make(method="lora", **kw):
    cfg = RunConfig(model="tiny-llama", method=method, batch_size=1, seq_len=32).to_dict()
    return record.make(cfg, source="measured", status="ok", bytes_={"peak": 1024, "weights": 512}, **kw)


def lines(path, *texts):
    path.write_text("".join(t + "\n" for t in texts))
    return path


def error(path) -> str:
    with pytest.raises(ConfigError) as e:
        record.read(path)
    text = str(e.value)
    assert "\n" not in text
    return text


def test_records_written_by_append_read_back_unchanged(tmp_path):
    path = tmp_path / "results.jsonl"
    written = [make("full"), make("lora", error=None), make("qlora", quality={"task": "t", "value": 0.5})]
    for r in written:
        record.append(path, r)
    path.write_text(path.read_text() + "\n  \n")  # blank lines are not records
    assert record.read(path) == written
    assert [n for n, _ in record.read_numbered(path)] == [1, 2, 3]


def test_a_torn_line_is_reported_by_its_line_number(tmp_path):
    good = json.dumps(make())
    path = lines(tmp_path / "results.jsonl", good, "", good[: len(good) // 2])
    assert error(path).startswith(f"{path}:3: not valid JSON (")
    assert "at column" in error(path)


@pytest.mark.parametrize("line, named", [
    ("[1, 2]", ":2: not a result record (a JSON list, not an object)"),
    ('"text"', ":2: not a result record (a JSON str, not an object)"),
    ('{"a": 1}', ":2: not a result record (no 'schema')"),
    ('{"schema": "1"}', ":2: not a result record (schema must be an integer, got '1')"),
    ('{"value": NaN}', ":2: not valid JSON (NaN is not JSON)"),
])
def test_a_line_that_is_not_a_result_record_is_named(tmp_path, line, named):
    path = lines(tmp_path / "r.jsonl", json.dumps(make()), line)
    assert error(path) == f"{path}{named}"


def test_a_newer_schema_asks_for_an_upgrade(tmp_path):
    path = lines(tmp_path / "results.jsonl", json.dumps(make()), json.dumps(make()), json.dumps({"schema": 2}))
    assert error(path) == f"{path}:3: schema 2 is newer than this qlora-bench reads (1); upgrade qlora-bench"


@pytest.mark.parametrize("change, named", [
    (lambda r: r["config"].update(method="dora"), "config.method must be one of full, lora, qlora; got 'dora'"),
    (lambda r: r.update(config=None), "config must be an object, got None"),
    (lambda r: r.update(source="guessed"), "source must be one of measured, extrapolated, estimated; got 'guessed'"),
    (lambda r: r.update(status="done"), "status must be one of ok, oom, error; got 'done'"),
    (lambda r: r.pop("status"), "not a result record (no 'status')"),
    (lambda r: r["bytes"].update(peak=1.5), "bytes.peak must be an integer, got 1.5"),
    (lambda r: r.update(bytes=[1]), "bytes must be null or an object, got [1]"),
    (lambda r: r["config"].pop("model"), "config.model must be a non-empty string, got None"),
])
def test_contract_fields_are_checked(tmp_path, change, named):
    bad = make()
    change(bad)
    path = lines(tmp_path / "results.jsonl", json.dumps(bad))
    assert error(path) == f"{path}:1: {named}"


def test_unknown_method_is_bad_input_not_a_key_error_downstream(tmp_path):
    bad = make()
    bad["config"]["method"] = "dora"
    path = lines(tmp_path / "results.jsonl", json.dumps(make()), json.dumps(bad))
    assert f"{path}:2: config.method" in error(path)


def test_line_numbers_count_newlines_only(tmp_path):
    odd = make(error="line\u2028separator")  # U+2028 may stand unescaped in JSON; it does not end a JSONL line
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(odd, ensure_ascii=False) + "\r\n" + "{torn\n", encoding="utf-8")
    assert error(path).startswith(f"{path}:2: not valid JSON")


def test_undecodable_bytes_and_missing_files_are_bad_input(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(json.dumps(make()).encode() + b'\n{"model": "caf\xe9"}\n')
    assert error(path) == f"{path}:2: not UTF-8 text (byte 0xe9 at column 15)"
    assert error(tmp_path / "none.jsonl") == f"no such results file: {tmp_path / 'none.jsonl'}"


def test_read_objects_takes_any_json_objects_but_still_names_torn_lines(tmp_path):
    path = lines(tmp_path / "quality-runs.jsonl", '{"config": {}, "score": 1}', "{torn")
    with pytest.raises(ConfigError, match=r"quality-runs.jsonl:2: not valid JSON"):
        record.read_objects(path)
    assert record.read_objects(lines(path, '{"score": 1}')) == [{"score": 1}]
