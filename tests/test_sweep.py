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
from bench.measuring.record import read

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
        ('[[group]]\nmodel = ["tiny-llama"]\noom_fallback_layers = 1\n', "'oom_fallback_layers' must be an integer"),
        ('[[group]]\nmodel = ["tiny-llama"]\nlayers = [2]\noom_fallback_layers = 2\n', "sets both 'layers'"),
        ('[[group]]\nmodel = ["tiny-llama"]\n[[estimate]]\nmodel = ["tiny-llama"]\nseq = [8]\n',
         "estimate 1: unknown config key(s): seq"),
        ('runs = 3\n[[group]]\nmodel = ["tiny-llama"]\n', "unknown top-level key(s) runs"),
        ('[[group]]\nmodel = ["tiny-llama"]\n[[quality]]\nmodel = "smollm2-135m-instruct"\ntask = "x"\nstep = 3\n',
         "quality 1: unknown key(s) step"),
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
    from bench.running.plan import load_plan
    from qlora.models import resolve

    configs = load_plan(plan)
    assert configs
    for cfg in configs:
        resolve(cfg.model)


def test_the_gpu_plan_is_the_7b_matrix():
    from bench.running.plan import load_plan, read_plan

    configs = load_plan(Path(__file__).parent.parent / "bench" / "plans" / "gpu-7b.toml")
    assert len(configs) == 12
    assert {c.device for c in configs} == {"cuda"} and {c.model for c in configs} == {"llama-2-7b"}
    plan = read_plan(Path(__file__).parent.parent / "bench" / "plans" / "gpu-7b.toml")
    assert {r.fallback_layers for r in plan.runs} == {2}  # Full FT oom on a 24 GB card still gets a breakdown
    assert plan.estimates == plan.configs  # the estimator's figures for exactly what is measured


def test_the_cpu_quick_plan_estimates_7b_on_gpus():
    from bench.running.plan import read_plan

    plan = read_plan(Path(__file__).parent.parent / "bench" / "plans" / "cpu-quick.toml")
    assert {c.model for c in plan.estimates} == {"llama-2-7b"} and {c.device for c in plan.estimates} == {"cuda"}
    assert {c.device for c in plan.configs} == {"cpu"}
    assert "smollm2-135m-instruct" in {c.model for c in plan.configs}


def deep_tiny(tmp_path, layers=6):
    """tiny-llama's width at more depth, as a config directory (random weights), so reduced depth means something."""
    d = tmp_path / "deep"
    d.mkdir()
    arch = json.loads((Path(__file__).parent.parent / "qlora" / "archs" / "tiny-llama.json").read_text())
    (d / "config.json").write_text(json.dumps({**arch, "num_hidden_layers": layers}))
    return d


@pytest.mark.slow
def test_oom_at_full_depth_is_measured_again_at_reduced_depth_and_resumes(tmp_path, capsys):
    from bench.render import summary

    plan, out = tmp_path / "plan.toml", tmp_path / "out"
    plan.write_text(f'[[group]]\nmodel = ["{deep_tiny(tmp_path)}"]\nmethod = ["full"]\nseq_len = [32]\n'
                    "steps = [1]\noom_fallback_layers = 2\n")
    # Full FT at 6 layers peaks near 8 MiB; at 2 layers under 4 MiB.
    args = ["sweep", str(plan), "--out", str(out), "--budget-gib", str(4 / 1024), "--device", "cpu"]
    assert main(args) == 0
    oom, fallback = read(out / "results.jsonl")
    assert oom["status"] == "oom" and oom["config"]["layers"] is None and oom["source"] == "measured"
    assert fallback["status"] == "ok" and fallback["source"] == "extrapolated"
    assert fallback["config"]["layers"] == 2 and fallback["fallback_for"] == oom["id"]
    assert [m["layers"] for m in fallback["measured_at"]] == [1, 2]
    assert fallback["bytes"]["peak"] > 4 * 2**20  # the full-depth figure, which did not fit
    text = summary.markdown(plan.name, [oom, fallback], [])
    assert "| oom | over 0.004 (budget 0.004) |" in text and "extrapolated from 1 and 2 layers" in text

    # Killed between the oom and its fallback: the re-run owes (and runs) only the fallback.
    results = out / "results.jsonl"
    results.write_text(results.read_text().splitlines(keepends=True)[0])
    capsys.readouterr()
    assert main(args) == 0
    assert "0 to run, 1 reduced-depth fallback(s) owed" in capsys.readouterr().err
    again = read(results)
    assert len(again) == 2 and again[1]["fallback_for"] == oom["id"] and again[1]["config"]["layers"] == 2


def test_progress_bar_has_counts_and_eta():
    from bench.running.sweep import progress

    line = progress(1, 4, 60.0, width=8)
    assert line.startswith("[##......] 1/4") and "1.0 min" in line and "eta 3.0 min" in line
    assert "eta --" in progress(0, 4, 0.0)


def test_bench_runs_the_plan_estimates_and_writes_a_summary(tmp_path, capsys):
    plan, out = tmp_path / "plan.toml", tmp_path / "out"
    plan.write_text('[[group]]\nmodel = ["tiny-llama"]\nmethod = ["qlora"]\nseq_len = [32]\nsteps = [1]\n'
                    '[[estimate]]\nmodel = ["llama-2-7b"]\nmethod = ["qlora"]\nseq_len = [512]\ndevice = ["cuda"]\n')
    assert main(["bench", "--plan", str(plan), "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    summary = (out / "summary.md").read_text()
    assert captured.out == summary
    row = next(line for line in summary.splitlines() if line.startswith("| tiny-llama | qlora |"))
    assert "| measured | ok |" in row
    est = read(out / "estimates.jsonl")
    assert len(est) == 1 and est[0]["source"] == "estimated" and est[0]["cards"]["rtx4090"]["headroom_bytes"] > 0
    assert "| llama-2-7b | qlora | seed | 1 x 512 | off | 8.207 |" in summary  # GB, and the recipe its config is
    # Again: nothing to run. With --fresh: the old results are set aside, the run is measured again.
    assert main(["bench", "--plan", str(plan), "--out", str(out), "--device", "cpu"]) == 0
    assert "1 already recorded, 0 to run" in capsys.readouterr().err and len(read(out / "results.jsonl")) == 1
    assert main(["bench", "--plan", str(plan), "--out", str(out), "--device", "cpu", "--fresh"]) == 0
    assert "earlier results moved to" in capsys.readouterr().err
    assert len(read(out / "results.jsonl")) == 1 and len(list(out.glob("results-*.jsonl"))) == 1


def test_bench_names_an_unknown_plan(tmp_path, capsys):
    assert main(["bench", "--plan", "gpu-8b", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "plan 'gpu-8b'" in err and "cpu-quick" in err and "gpu-7b" in err


def test_default_plan_follows_the_hardware():
    from bench.running.main_job import default_out, default_plan, resolve_plan

    assert default_plan("cpu").name == "cpu-quick.toml" and default_plan("cuda:0").name == "gpu-7b.toml"
    assert resolve_plan("gpu-7b") == default_plan("cuda")
    out = default_out(default_plan("cpu"), "cpu")
    # An untracked folder: a user's run never writes over the committed references in reports/
    assert out.parts[:2] == ("results", "cpu-quick") and out.name
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "results.jsonl")],
                             cwd=Path(__file__).parent.parent)
    assert ignored.returncode == 0, f"{out} is not ignored by git"


@pytest.mark.slow
def test_runs_recorded_by_other_code_are_measured_again(tmp_path, capsys):
    plan, out = tmp_path / "plan.toml", tmp_path / "out"
    plan.write_text(PLAN.replace('"full", "lora", "qlora"', '"lora"'))
    args = ["sweep", str(plan), "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    results = out / "results.jsonl"
    (old,) = read(results)
    old["env"]["git_commit"] = "0" * 40  # as if committed results came from an earlier commit
    results.write_text(json.dumps(old) + "\n")
    capsys.readouterr()
    assert main(args) == 0
    assert "0 already recorded, 1 to run" in capsys.readouterr().err
    assert len(read(results)) == 2
