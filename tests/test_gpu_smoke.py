"""The prepared GPU smoke: its checks judged on hand-made CUDA records, and its CPU rehearsal run for real."""

import json

import pytest

from bench.running import gpu_smoke

MiB, GiB = 2**20, 2**30


def cuda_record(method="lora", optimizer="adamw", batch=4, seq=512, status="ok", **fields):
    r = {"config": {"model": "smollm2-135m", "method": method, "batch_size": batch, "seq_len": seq,
                    "grad_checkpointing": False, "optimizer": optimizer},
         "status": status, "error": None if status == "ok" else "OutOfMemoryError: CUDA out of memory",
         "bytes": {"peak": GiB, "optimizer": 64 * MiB} if status == "ok" else None,
         "train_losses": [10.9, 10.1, 9.2], "cuda_max_allocated": GiB + 300 * MiB,
         "cuda_allocated_step_start": 700 * MiB, "ledger_step_start": 500 * MiB,
         "cuda_max_reserved": GiB + 400 * MiB, "nvml_process_used": GiB + 900 * MiB, "optimizer_paged_bytes": 0}
    r.update(fields)
    return r


def by_name(rows):
    return {name.split(": ", 1)[1]: (ok, figures) for name, ok, figures in rows}


def test_the_ledger_is_judged_against_the_allocator_less_what_it_held_before_the_step():
    rows = by_name(gpu_smoke.checks([cuda_record()]))
    ok, figures = rows["ledger within 2% + 160 MiB of the allocator"]
    # 1.293 GiB allocated at most, of which 200 MiB were held before the step that the ledger did not follow
    assert ok and "gap +100.0 MiB" in figures
    assert rows["CUDA context measured (NVML process less reserved)"] == (True, "500 MiB")
    assert rows["losses finite and falling"][0]
    bad = by_name(gpu_smoke.checks([cuda_record(cuda_allocated_step_start=200 * MiB)]))  # a 600 MiB gap
    assert not bad["ledger within 2% + 160 MiB of the allocator"][0]


def test_diverged_or_flat_losses_fail():
    assert not by_name(gpu_smoke.checks([cuda_record(train_losses=[10.0, None, 9.0])]))[
        "losses finite and falling"][0]
    assert not by_name(gpu_smoke.checks([cuda_record(train_losses=[10.0, 10.0])]))["losses finite and falling"][0]


def test_the_oom_run_must_be_oom_and_paged_state_must_be_counted():
    rows = by_name(gpu_smoke.checks([cuda_record(method="full", batch=32, seq=8192, status="oom"),
                                     cuda_record(method="qlora", optimizer="paged_adamw8bit",
                                                 optimizer_paged_bytes=40 * MiB)]))
    assert rows["a real out-of-memory is recorded oom"][0]
    assert rows["paged optimizer state counted"] == (True, "40.0 MiB paged of 64.0 MiB optimizer")
    crashed = by_name(gpu_smoke.checks([cuda_record(method="full", batch=32, seq=8192, status="error")]))
    assert not crashed["a real out-of-memory is recorded oom"][0]


@pytest.mark.slow
def test_the_cpu_rehearsal_checks_the_whole_plan_and_runs_its_small_runs(tmp_path, capsys):
    assert gpu_smoke.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "smoke.md").read_text()
    assert "| smollm2-135m full 1x128: losses finite and falling | pass |" in text
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["config"]["method"] for r in records) == ["full", "lora", "qlora", "qlora"]  # + the savers
    assert all(r["status"] == "ok" and r["config"]["device"] == "cpu" for r in records)
    assert len((tmp_path / "estimates.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "report" / "claims.md").is_file()
