"""One training step per method, timed by pytest-benchmark, with the step's memory record in `extra_info`.

On CPU: the real pretrained SmolLM2-135M-Instruct at batch 1 x 128 tokens. With CUDA: random-weight Llama-2-7B at
batch 1 x 512 (a method whose estimate does not fit the card is skipped, with the estimate in the reason).
QLORA_BENCH_STEP_MODEL / _SEQ_LEN override the model and sequence length.

`nox -s bench` saves pytest-benchmark's JSON (and its autosave history), so `pytest-benchmark compare` works on it;
the memory of each step is in each benchmark's extra_info.
"""

import math
import os

import pytest
import torch

from bench.measuring.measure import ledgered_step
from qlora.build import build
from qlora.config import RunConfig
from qlora.optim import make_optimizer
from qlora.train import sync, train_step

CUDA = torch.cuda.is_available()
MODEL = os.environ.get("QLORA_BENCH_STEP_MODEL", "llama-2-7b" if CUDA else "smollm2-135m-instruct")
SEQ_LEN = int(os.environ.get("QLORA_BENCH_STEP_SEQ_LEN", "512" if CUDA else "128"))


@pytest.fixture(scope="module", params=["full", "lora", "qlora"])
def step(request):
    cfg = RunConfig(model=MODEL, method=request.param, seq_len=SEQ_LEN, batch_size=1,
                    device="cuda" if CUDA else "cpu")
    if CUDA:
        from bench.modelling import gpus
        from bench.modelling.estimate import estimate_bytes

        peak = estimate_bytes(cfg)["bytes"]["peak"]
        total = torch.cuda.get_device_properties(0).total_memory
        if gpus.needed(peak) > total:
            pytest.skip(f"{cfg.method} on {MODEL}: estimated {gpus.needed(peak) / 2**30:.1f} GiB needed, "
                        f"the card has {total / 2**30:.1f} GiB")
    built = build(cfg)
    device = next(built.model.parameters()).device
    opt = make_optimizer(cfg, built.model)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = torch.randint(0, built.hf_config.vocab_size, (1, cfg.seq_len), generator=gen).to(device)
    train_step(built.model, opt, batch)  # optimizer state exists from here on
    ledger = ledgered_step(built.model, opt, batch, device)
    memory = {"bytes": ledger.categories(), "peak_at": ledger.peak_at}
    yield cfg, built.model, opt, batch, device, memory
    del built, opt
    if CUDA:
        torch.cuda.empty_cache()


def test_train_step(benchmark, step):
    cfg, model, opt, batch, device, memory = step

    def one_step():
        loss = train_step(model, opt, batch)
        sync(device)
        return loss

    benchmark.extra_info.update(config=cfg.to_dict(), memory=memory, tokens=batch.numel())
    loss = benchmark.pedantic(one_step, rounds=5, warmup_rounds=1)
    assert math.isfinite(loss)
    assert memory["bytes"]["peak"] == sum(v for k, v in memory["bytes"].items() if k != "peak")
    # The three methods differ where they should: only Full FT holds optimizer state for every weight.
    if cfg.method == "full":
        assert memory["bytes"]["optimizer"] > memory["bytes"]["adapter"]
    else:
        assert memory["bytes"]["adapter"] > 0
