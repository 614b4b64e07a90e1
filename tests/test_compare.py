"""compare: matching by config, thresholds, and the exit code CI acts on."""

import copy
import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.schema import label

REFERENCE = Path(__file__).parent.parent / "reports" / "measure" / "llama-2-7b-cpu.jsonl"


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def baseline():
    return [json.loads(line) for line in REFERENCE.read_text().splitlines()]


def test_identical_results_pass(tmp_path, capsys, baseline):
    a = write(tmp_path / "a.jsonl", baseline)
    assert main(["compare", a, a]) == 0
    assert "0 of 3 runs regressed" in capsys.readouterr().out


def test_five_percent_more_activations_fails_and_names_run_and_category(tmp_path, capsys, baseline):
    grown = copy.deepcopy(baseline)
    qlora = next(r for r in grown if r["config"]["method"] == "qlora")
    extra = int(qlora["bytes"]["activations"] * 0.05)
    qlora["bytes"]["activations"] += extra
    qlora["bytes"]["peak"] += extra
    md = tmp_path / "summary.md"
    code = main(["compare", write(tmp_path / "a.jsonl", baseline), write(tmp_path / "b.jsonl", grown),
                 "--markdown", str(md)])
    out = capsys.readouterr().out
    assert code == 3 and md.read_text() == out
    line = next(line for line in out.splitlines() if "regressed**" in line)
    assert "llama-2-7b qlora 1x256" in line and "activations +" in line and "(+5.0%)" in line
    assert "1 of 3 runs regressed" in out


def test_growth_under_the_threshold_and_a_new_oom(tmp_path, capsys, baseline):
    new = copy.deepcopy(baseline)
    new[0]["bytes"]["other"] += 1024  # 1 KiB: below the 1 MiB floor
    new[1].update(status="oom", error="CUDA out of memory", bytes=None)
    code = main(["compare", write(tmp_path / "a.jsonl", baseline), write(tmp_path / "b.jsonl", new)])
    out = capsys.readouterr().out
    assert code == 3
    oom = next(line for line in out.splitlines() if "was ok, now oom" in line)
    assert "llama-2-7b lora 1x256" in oom
    assert out.count("**regressed**") == 1  # the 1 KiB growth of the full run is not one


def test_slower_steps_fail_past_15_percent(tmp_path, capsys, baseline):
    slow = copy.deepcopy(baseline)
    slow[2]["step_seconds"] *= 1.2
    code = main(["compare", write(tmp_path / "a.jsonl", baseline), write(tmp_path / "b.jsonl", slow)])
    assert code == 3 and "step time +20%" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--time-threshold", "0.25"]) == 0


def test_unreadable_files_are_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert main(["compare", str(bad), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qlora-bench: error: {bad}:1: not valid JSON") and err.count("\n") == 1


def test_a_baseline_run_missing_from_new_fails_and_is_named(tmp_path, capsys, baseline):
    a = write(tmp_path / "a.jsonl", baseline)
    assert main(["compare", a, write(tmp_path / "b.jsonl", baseline[:1])]) == 3
    out = capsys.readouterr().out
    assert "2 of 3 runs regressed or missing" in out
    names = "; ".join(label(r["config"]) for r in baseline[1:])  # e.g. `llama-2-7b lora 1x256 at 2 layers`
    assert f"**Missing from new** (2): {names}." in out and "llama-2-7b lora 1x256" in names
    assert out.count("| **missing from new** |") == 2
    # The other way round, the runs only in new are listed, not judged: nothing of the baseline is missing.
    assert main(["compare", str(tmp_path / "b.jsonl"), a]) == 0
    out = capsys.readouterr().out
    assert "0 of 1 runs regressed or missing" in out and out.count("| new only |") == 2


def test_a_new_file_with_no_records_is_bad_input(tmp_path, capsys, baseline):
    a = write(tmp_path / "a.jsonl", baseline)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["compare", a, str(empty)]) == 2
    assert capsys.readouterr().err == f"qlora-bench: error: no result records in {empty}\n"
    assert main(["compare", a, str(tmp_path / "none.jsonl")]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_a_torn_line_in_new_is_bad_input_named_by_line(tmp_path, capsys, baseline):
    a = write(tmp_path / "a.jsonl", baseline)
    torn = tmp_path / "b.jsonl"
    write(torn, baseline)
    text = torn.read_text()
    torn.write_text(text[: len(text) - 200])  # a writer killed mid-line (record.append never leaves one)
    assert main(["compare", a, str(torn)]) == 2
    assert f"{torn}:3: not valid JSON (" in capsys.readouterr().err


def test_an_unknown_method_is_bad_input_not_a_crash(tmp_path, capsys, baseline):
    odd = copy.deepcopy(baseline)
    odd[1]["config"]["method"] = "dora"
    assert main(["compare", write(tmp_path / "a.jsonl", baseline), write(tmp_path / "b.jsonl", odd)]) == 2
    assert f"{tmp_path / 'b.jsonl'}:2: config.method must be one of" in capsys.readouterr().err


def test_extrapolated_runs_compare_time_at_their_measured_depth_and_devices_must_match(tmp_path, capsys, baseline):
    extrapolated = next(r for r in baseline if r["source"] == "extrapolated")
    slow = copy.deepcopy(baseline)
    moved = next(r for r in slow if r["id"] == extrapolated["id"])
    moved["step_seconds"] *= 3  # the slope through two timings: not what is compared
    assert main(["compare", write(tmp_path / "a.jsonl", baseline), write(tmp_path / "b.jsonl", slow)]) == 0
    moved["measured_at"][-1]["step_seconds"] *= 1.2
    assert main(["compare", str(tmp_path / "a.jsonl"), write(tmp_path / "b.jsonl", slow)]) == 3
    assert f"step time (at {extrapolated['measured_at'][-1]['layers']} layers) +20%" in capsys.readouterr().out
    for r in slow:
        r["env"]["device"]["name"] = "Some Other CPU"
    assert main(["compare", str(tmp_path / "a.jsonl"), write(tmp_path / "b.jsonl", slow)]) == 0
    assert "step time not compared" in capsys.readouterr().out
