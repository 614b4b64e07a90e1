"""What the memory ledger costs: one training step at the width of a 7B layer, with and without it.

Target (issue 3): the ledger makes a step at most 5% slower. Both variants run in one process on the same model,
interleaved, so drift on a shared machine hits both alike. Run: nox -s bench (or pytest benchmarks
--benchmark-enable).
"""

import statistics
import time

import pytest
import torch

from bench.measuring.measure import ledgered_step
from qlora.build import build
from qlora.config import RunConfig
from qlora.optim import make_optimizer
from qlora.train import train_step

ROUNDS = 5
OVERHEAD_ROUNDS = 15


@pytest.fixture(scope="module")
def one_7b_layer():
    # One decoder layer of Llama-2-7B at its real width, QLoRA as the suite's main case; sequence 256 keeps a CPU
    # step around a second.
    cfg = RunConfig(model="llama-2-7b", method="qlora", layers=1, seq_len=256, device="cpu")
    built = build(cfg)
    opt = make_optimizer(cfg, built.model)
    batch = torch.randint(0, built.hf_config.vocab_size, (1, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    train_step(built.model, opt, batch)  # optimizer state exists from here on
    return built.model, opt, batch


def plain(model, opt, batch):
    return train_step(model, opt, batch)


def ledgered(model, opt, batch):
    return ledgered_step(model, opt, batch, "cpu").peak


@pytest.mark.parametrize("variant", [plain, ledgered], ids=["plain", "ledger"])
def test_step(benchmark, one_7b_layer, variant):
    result = benchmark.pedantic(variant, args=one_7b_layer, rounds=ROUNDS, warmup_rounds=1)
    assert result > 0  # a loss, or a peak in bytes


def test_ledger_overhead_is_within_5_percent(one_7b_layer, record_property):
    # Each round times a plain step and a ledgered step back to back, and the verdict is the median of the rounds'
    # ratios: on a shared 2-core machine a step's time drifts by several percent between rounds (more than the
    # ledger costs), and a ratio of adjacent steps cancels most of that drift where a ratio of two medians does not.
    ratios, plain_times = [], []
    for _ in range(OVERHEAD_ROUNDS):
        t = []
        for fn in (plain, ledgered):
            t0 = time.perf_counter()
            fn(*one_7b_layer)
            t.append(time.perf_counter() - t0)
        ratios.append(t[1] / t[0])
        plain_times.append(t[0])
    ratio = statistics.median(ratios)
    record_property("ledger_overhead_ratio", ratio)
    print(f"\nledger overhead: {ratio:.3f}x (median of {OVERHEAD_ROUNDS} paired rounds, plain step "
          f"{statistics.median(plain_times):.3f} s)")
    assert ratio <= 1.05
