"""The one runner for isolated runs: a run that dies is never silent, never mislabelled, never hangs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli import main
from bench.measuring import runner
from bench.measuring.record import read
from bench.measuring.runner import RunFailed, call
from qlora.config import ConfigError

ROOT = Path(__file__).parent.parent


def test_a_result_comes_back_as_json():
    assert call("math:hypot", [3, 4]) == 5.0


def test_a_child_killed_by_sigkill_without_an_oom_kill_is_an_error_naming_the_signal():
    started = time.monotonic()
    with pytest.raises(RunFailed) as e:
        call("signal:raise_signal", [signal.SIGKILL])
    assert e.value.status == "error" and "SIGKILL" in e.value.message and "no out-of-memory kill" in e.value.message
    assert time.monotonic() - started < 30  # returns: the old multiprocessing pool waited forever here


def test_a_sigkill_is_oom_only_with_the_kernels_evidence(monkeypatch):
    counts = iter([{"/proc/vmstat": 4}, {"/proc/vmstat": 5}])  # before the run, after it
    monkeypatch.setattr(runner, "oom_kill_counts", lambda: next(counts))
    with pytest.raises(RunFailed) as e:
        call("signal:raise_signal", [signal.SIGKILL])
    assert e.value.status == "oom" and "oom_kill in /proc/vmstat went 4 -> 5" in e.value.message


def test_other_signals_are_errors_even_with_an_oom_kill_elsewhere(monkeypatch):
    counts = iter([{"/proc/vmstat": 0}, {"/proc/vmstat": 1}])
    monkeypatch.setattr(runner, "oom_kill_counts", lambda: next(counts))
    with pytest.raises(RunFailed) as e:
        call("signal:raise_signal", [signal.SIGABRT])
    assert e.value.status == "error" and "SIGABRT" in e.value.message


@pytest.mark.parametrize(
    "exception, status",
    [("MemoryError", "oom"), ("ZeroDivisionError", "error")],
)
def test_exceptions_in_the_child_are_classified(exception, status):
    with pytest.raises(RunFailed) as e:
        call("builtins:exec", [f"raise {exception}('boom')"])
    assert e.value.status == status and e.value.message == f"{exception}: boom"


def test_bad_input_found_in_the_child_is_bad_input_here():
    with pytest.raises(ConfigError, match="lora_r must be an integer > 0, got 0"):
        call("qlora.config:RunConfig.from_dict", [{"lora_r": 0}])


def test_a_result_written_survives_a_crash_at_interpreter_exit():
    """A library that crashes during teardown (CUDA, bitsandbytes) must not turn a finished run into a failed one."""
    crash_at_exit = "import atexit, os, signal; atexit.register(lambda: os.kill(os.getpid(), signal.SIGSEGV))"
    assert call("builtins:exec", [crash_at_exit]) is None


def test_the_run_dies_with_its_caller_however_the_caller_ends(tmp_path):
    """A sweep killed by SIGKILL (or SIGTERM) must not leave its run holding memory: the kernel kills the child."""
    script = "from bench.measuring.runner import call; call('time:sleep', [120])"
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (children := _children_running("time:sleep", parent.pid)):
        assert parent.poll() is None and time.monotonic() < deadline, "the run never started"
        time.sleep(0.1)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{children[0]}").exists() and _state(children[0]) != "Z":
        assert time.monotonic() < deadline, "the run outlived its caller"
        time.sleep(0.1)


def test_a_sweep_sent_sigterm_stops_and_records_no_error(tmp_path):
    """SIGTERM (a cancelled CI job) stops the sweep like Ctrl-C: the run it interrupted is not a result (it once
    became an `error` record, "SystemExit: 143", and the sweep went on to the next run)."""
    plan = tmp_path / "plan.toml"
    plan.write_text('[[group]]\nmodel = ["tiny-llama"]\nmethod = ["lora", "qlora"]\nseq_len = [32]\n'
                    'steps = [100000]\n')
    out = tmp_path / "out"
    sweep = subprocess.Popen([sys.executable, "-m", "bench.cli", "sweep", str(plan), "--out", str(out)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _children_running("bench.measuring.runner:_apply", sweep.pid):
            assert sweep.poll() is None and time.monotonic() < deadline, "the run never started"
            time.sleep(0.1)
        sweep.send_signal(signal.SIGTERM)
        _, err = sweep.communicate(timeout=60)
    finally:  # whatever failed above, no sweep outlives the test
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert sweep.returncode == 128 + signal.SIGTERM, err
    results = out / "results.jsonl"
    assert not results.exists() or read(results) == []
    assert "error" not in err


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def test_a_time_out_kills_the_child_and_is_an_error():
    started = time.monotonic()
    with pytest.raises(RunFailed) as e:
        call("time:sleep", [60], timeout_s=2)
    assert e.value.status == "error" and "timed out after 2 s" in e.value.message
    assert time.monotonic() - started < 20


def test_a_result_that_is_not_json_is_an_error():
    with pytest.raises(RunFailed, match="not valid JSON"):
        call("builtins:float", ["nan"])


@pytest.mark.parametrize("message", ["CUDA error: out of memory",
                                     "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate",
                                     "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"])
def test_out_of_memory_in_other_words(message):
    assert runner.is_oom(RuntimeError(message))
    assert not runner.is_oom(RuntimeError("CUDA error: device-side assert triggered"))


def test_the_oom_counters_of_this_machine_are_read():
    counts = runner.oom_kill_counts()
    if Path("/proc/vmstat").is_file() and "oom_kill" in Path("/proc/vmstat").read_text():
        assert counts["/proc/vmstat"] >= 0
    assert all(isinstance(n, int) for n in counts.values())


def _children_running(target: str, parent: int) -> list[int]:
    """PIDs of bench.measuring.runner processes whose command line has `target` and whose parent is `parent`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"bench.measuring.runner" in cmd and target.encode() in b" ".join(cmd):
            found.append(int(d.name))
    return found


@pytest.mark.slow
def test_measure_whose_worker_is_killed_returns_within_seconds_with_an_error_record(tmp_path):
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "bench.cli", "measure", "smollm2-135m", "--method", "full", "--steps", "50",
           "--seq-len", "128", "--device", "cpu", "--json", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (workers := _children_running("bench.measuring.runner:_apply", proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, "the worker never started"
        time.sleep(0.1)
    time.sleep(2)  # mid-build or mid-step, as the OOM killer would find it
    os.kill(workers[0], signal.SIGKILL)
    killed = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - killed < 30
    assert proc.returncode == 1, stderr
    (r,) = [json.loads(line) for line in stdout.splitlines()]
    assert r["status"] == "error" and "SIGKILL" in r["error"] and r["bytes"] is None
    assert read(out) == [r]


TINY_PLAN = """
[[group]]
model = ["tiny-llama"]
method = ["lora", "qlora"]
seq_len = [32]
steps = [1]
"""


def test_a_sweep_run_killed_without_an_oom_event_is_an_error_retried_on_resume(tmp_path, capsys, monkeypatch):
    import bench.running.sweep as sweep

    plan, out = tmp_path / "plan.toml", tmp_path / "out"
    plan.write_text(TINY_PLAN)
    args = ["sweep", str(plan), "--out", str(out), "--device", "cpu"]
    real = sweep.isolated

    def killed(fn, cfg, **kwargs):  # the run's process dies by SIGKILL, as under `kill -9`
        if cfg.method == "lora":
            return call("signal:raise_signal", [signal.SIGKILL])
        return real(fn, cfg, **kwargs)

    monkeypatch.setattr(sweep, "isolated", killed)
    assert main(args) == 1
    lora, qlora = read(out / "results.jsonl")
    assert lora["status"] == "error" and "SIGKILL" in lora["error"] and qlora["status"] == "ok"
    assert "1 run(s) ended in error" in capsys.readouterr().err

    assert main(args) == 1  # still killed: still an error, still a non-zero exit
    assert "1 to run (1 recorded as error, run again)" in capsys.readouterr().err

    monkeypatch.setattr(sweep, "isolated", real)
    assert main(args) == 0
    assert "1 already recorded, 1 to run" in capsys.readouterr().err
    records = read(out / "results.jsonl")
    assert [r["status"] for r in records] == ["error", "ok", "error", "ok"]
    assert main(args) == 0  # nothing left to do
    assert "2 already recorded, 0 to run" in capsys.readouterr().err


def test_a_run_that_fails_inside_on_input_only_it_could_see_is_an_error_and_the_sweep_goes_on(tmp_path, capsys):
    """A weights folder whose safetensors cannot be read fails only when the run loads it: that run is an error
    record, and the next run still runs."""
    weights = tmp_path / "weights"
    weights.mkdir()
    arch = json.loads((ROOT / "qlora" / "archs" / "tiny-llama.json").read_text())
    (weights / "config.json").write_text(json.dumps(arch))
    (weights / "tokenizer.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(b"not safetensors")
    plan, out = tmp_path / "plan.toml", tmp_path / "out"
    plan.write_text(f'[[group]]\nmodel = ["{weights}", "tiny-llama"]\nmethod = ["lora"]\nseq_len = [32]\n'
                    "steps = [1]\n")
    assert main(["sweep", str(plan), "--out", str(out), "--device", "cpu"]) == 1
    broken, fine = read(out / "results.jsonl")
    assert broken["status"] == "error" and broken["bytes"] is None and fine["status"] == "ok"


def test_a_group_that_pins_its_device_resumes_under_that_device(tmp_path, capsys):
    """The resume key is the run's own device, not the sweep's --device (which a pinned group does not use)."""
    plan, out = tmp_path / "plan.toml", tmp_path / "out"
    plan.write_text(TINY_PLAN.replace('"lora", "qlora"', '"lora"') + 'device = ["cpu"]\n')
    args = ["sweep", str(plan), "--out", str(out), "--device", "cuda"]  # no CUDA here: only the group's cpu runs
    assert main(args) == 0
    assert main(args) == 0
    assert "1 already recorded, 0 to run" in capsys.readouterr().err
    assert len(read(out / "results.jsonl")) == 1


def test_records_that_are_not_runs_do_not_stop_a_resume(tmp_path, capsys):
    from bench.measuring import record

    plan, out = tmp_path / "plan.toml", tmp_path / "out"
    plan.write_text(TINY_PLAN)
    estimate = record.make({"model": "tiny-llama", "method": "lora", "batch_size": 1, "seq_len": 32},
                           source="estimated", status="ok", bytes_=None)  # no env, as estimate records are
    record.append(out / "results.jsonl", estimate)
    assert main(["sweep", str(plan), "--out", str(out), "--device", "cpu", "--dry-run"]) == 0
    assert "0 already recorded, 2 to run" in capsys.readouterr().err


@pytest.mark.slow
def test_two_sweeps_on_one_out_do_not_duplicate_work(tmp_path):
    plan, out = tmp_path / "plan.toml", tmp_path / "out"
    plan.write_text(TINY_PLAN.replace('"lora", "qlora"', '"full", "lora", "qlora"'))
    cmd = [sys.executable, "-m", "bench.cli", "sweep", str(plan), "--out", str(out), "--device", "cpu"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    methods = sorted(r["config"]["method"] for r in read(out / "results.jsonl"))
    assert methods == ["full", "lora", "qlora"], logs  # each run once, whichever sweep ran it
