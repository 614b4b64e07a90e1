"""What MemoryLedgerCallback costs a Trainer run: the measured steps, and the steps it leaves alone.

One decoder layer of Llama-2-7B at its real width under QLoRA (as benchmarks/test_ledger_overhead.py), trained by
transformers' Trainer for STEPS optimizer steps, with and without the callback (measuring steps 3 and 5), in
rounds that alternate which run goes first. Step times come from a timing callback. Targets: a measured step at
most 10% slower than the untouched steps beside it in the same run (the ledger's own 5%, plus finding the phases
without the engine's hooks); an untouched step within 3% of the same step of a run without the callback (the
callback returns at once there; 3% is this machine's run-to-run noise). Run: nox -s bench (or pytest benchmarks
--benchmark-enable).
"""

import statistics
import time

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from bench.running.callback import MemoryLedgerCallback
from qlora.build import build
from qlora.config import RunConfig

STEPS, MEASURED, ROUNDS = 6, (3, 5), 4


class StepTimes(TrainerCallback):
    def __init__(self):
        self.seconds: dict[int, float] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds[state.global_step] = time.perf_counter() - self._t0


@pytest.fixture(scope="module")
def model_and_data():
    cfg = RunConfig(model="llama-2-7b", method="qlora", layers=1, seq_len=256, device="cpu")
    built = build(cfg)
    ids = torch.randint(0, built.hf_config.vocab_size, (STEPS, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    return built.model, [{"input_ids": x, "labels": x} for x in ids]


def run(model, data, tmp_path, watched: bool) -> dict[int, float]:
    """Each optimizer step's seconds; a measured step's as the callback times it (from before the ledger starts to
    its end, before the record is made: the record's `ledger_step_seconds`)."""
    times = StepTimes()
    ledger = MemoryLedgerCallback(steps=MEASURED, model="llama-2-7b", estimate=False)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=1,
                             learning_rate=1e-4, optim="adamw_torch", report_to=[], save_strategy="no", use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[ledger, times] if watched else [times]).train()
    return times.seconds | {r["trainer"]["step"]: r["ledger_step_seconds"] for r in ledger.records}


def test_callback_overhead(model_and_data, tmp_path, record_property):
    measured, untouched = [], []
    for i in range(ROUNDS):
        # the order alternates: whichever run goes second in a round inherits the first's allocator and caches
        first = run(*model_and_data, tmp_path, watched=i % 2 == 1)
        second = run(*model_and_data, tmp_path, watched=i % 2 == 0)
        plain, watched = (second, first) if i % 2 == 1 else (first, second)
        # a measured step against the untouched steps on either side of it, in the same run
        measured += [watched[s] / statistics.mean((watched[s - 1], watched[s + 1])) for s in MEASURED]
        # the untouched steps (not the first: it allocates the optimizer state) against the run without it
        untouched += [watched[s] / plain[s] for s in range(2, STEPS + 1) if s not in MEASURED]
    on, off = statistics.median(measured), statistics.median(untouched)
    record_property("callback_measured_step_ratio", on)
    record_property("callback_untouched_step_ratio", off)
    print(f"\ncallback overhead: measured step {on:.3f}x its neighbours, untouched steps {off:.3f}x a run without it "
          f"(medians over {ROUNDS} rounds of {STEPS} steps)")
    assert on <= 1.10
    assert off <= 1.03
