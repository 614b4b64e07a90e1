"""Sweeps: one process per run, out-of-memory as a result, resumable after kill -9, bad plans named."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli import main
from bench.record import read

PLAN = """
[[group]]
model = ["tiny-llama"]
method = ["full", "lora", "qlora"]
seq_len = [32]
steps = [1]
"""


def configs(results):
    return sorted(json.dumps(r["config"], sort_keys=True) for r in read(results))


@pytest.mark.slow
def test_killed_sweep_resumes_with_every_run_once(tmp_path):
    plan, out = tmp_path / "plan.toml", tmp_path / "out"
    plan.write_text(PLAN)
    cmd = [sys.executable, "-m", "bench.cli", "sweep", str(plan), "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while not (results.exists() and results.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline and proc.poll() is None, "the first run never finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the run it had started, mid-way
    proc.wait()
    assert 1 <= len(read(results)) < 3
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "already recorded" in done.stderr
    got = configs(results)
    assert len(got) == 3 and len(set(got)) == 3
    assert {r["config"]["method"] for r in read(results)} == {"full", "lora", "qlora"}
    assert all(r["status"] == "ok" for r in read(results))


def test_run_over_budget_is_oom_and_the_sweep_goes_on(tmp_path, capsys):
    plan, out = tmp_path / "plan.toml", tmp_path / "out"
    # Full FT of the tiny model peaks above 3 MiB at 32 tokens; QLoRA stays under it.
    plan.write_text(PLAN.replace('"full", "lora", "qlora"', '"full", "qlora"'))
    budget = 3 / 1024
    assert main(["sweep", str(plan), "--out", str(out), "--budget-gib", str(budget), "--device", "cpu"]) == 0
    full, qlora = read(out / "results.jsonl")
    assert full["status"] == "oom" and full["oom_bytes"] > budget * 2**30 and full["bytes"] is None
    assert "over the budget" in full["error"]
    assert qlora["status"] == "ok" and qlora["bytes"]["peak"] <= budget * 2**30
    assert full["budget_bytes"] == qlora["budget_bytes"] == int(budget * 2**30)


@pytest.mark.parametrize(
    "text, named",
    [
        ('[[group]]\nmodel = ["tiny-llama"]\nlora_rank = [4]\n', "unknown config key(s): lora_rank"),
        ('[[group]]\nmodel = ["llama-2-7"]\n', "key 'model': unknown model 'llama-2-7'"),
        ('[[group]]\nmodel = ["tiny-llama"]\nseq_len = []\n', "key 'seq_len' must be a non-empty list"),
        ("", "no [[group]] tables"),
    ],
)
def test_bad_plans_exit_2_naming_file_and_key(tmp_path, capsys, text, named):
    plan = tmp_path / "plan.toml"
    plan.write_text(text)
    assert main(["sweep", str(plan), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert named in err and str(plan) in err and err.count("\n") == 1


def test_unreadable_plan(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    assert main(["sweep", str(missing), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert str(missing) in capsys.readouterr().err


PLANS = sorted((Path(__file__).parent.parent / "bench" / "plans").glob("*.toml"))


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_every_committed_plan_loads_and_names_known_models(plan):
    from bench.plan import load_plan
    from qlora.models import resolve

    configs = load_plan(plan)
    assert configs
    for cfg in configs:
        resolve(cfg.model)


def test_the_gpu_plan_is_the_7b_matrix():
    from bench.plan import load_plan

    configs = load_plan(Path(__file__).parent.parent / "bench" / "plans" / "gpu-7b.toml")
    assert len(configs) == 12
    assert {c.device for c in configs} == {"cuda"} and {c.model for c in configs} == {"llama-2-7b"}
