"""compare: matching by config, thresholds, and the exit code CI acts on."""

import copy
import json
from pathlib import Path

import pytest

from bench.cli import main

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
    assert "cannot read result records from" in capsys.readouterr().err


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
