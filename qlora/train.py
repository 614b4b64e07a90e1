"""The training step and a short training loop over packed text."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from qlora import data
from qlora.build import Built
from qlora.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Step:
    loss: float
    seconds: float
    tokens: int


def train_step(model: nn.Module, optimizer, batch, on_phase=None) -> float:
    """One optimisation step. `batch` is a tensor of token ids (labels = inputs, shifted inside the model) or a dict
    of model inputs with its own `labels` (padding and prompts masked with -100). Returns the loss.

    `on_phase(name)`, if given, is called as the step enters "forward", "backward", "optimizer", "zero_grad" and
    at its "end": the memory ledger uses it to place the peak and to see gradients and optimizer state.
    """
    phase = on_phase or (lambda name: None)
    phase("forward")
    out = model(**batch) if isinstance(batch, dict) else model(input_ids=batch, labels=batch)
    loss = out.loss
    del out  # drop the logits before backward, or they stay live through the whole step
    phase("backward")
    loss.backward()
    phase("optimizer")
    optimizer.step()
    phase("zero_grad")
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    del loss
    phase("end")
    return value


def corpus_blocks(built: Built, cfg: RunConfig, text: str | None = None) -> torch.Tensor:
    """The training text (default: the Shakespeare corpus) tokenised for this model and packed to cfg.seq_len."""
    tokenizer = built.tokenizer or data.ByteTokenizer()
    vocab = built.hf_config.vocab_size
    if isinstance(tokenizer, data.ByteTokenizer) and vocab < tokenizer.vocab_size:
        raise ConfigError(f"model {cfg.model} has vocab_size {vocab} < 256 and no tokenizer; byte tokens do not fit")
    return data.pack(data.encode(tokenizer, text if text is not None else data.shakespeare()), cfg.seq_len)


def train(built: Built, cfg: RunConfig, optimizer, blocks: torch.Tensor, steps: int | None = None) -> list[Step]:
    """Run cfg.steps (or `steps`) optimisation steps on shuffled batches of `blocks`; returns one Step each."""
    device = next(built.model.parameters()).device
    it = data.batches(blocks, cfg.batch_size, cfg.seed)
    out = []
    for _ in range(steps if steps is not None else cfg.steps):
        batch = next(it).to(device)
        sync(device)
        t0 = time.perf_counter()
        loss = train_step(built.model, optimizer, batch)  # .item() inside synchronises the loss, not the step
        sync(device)
        out.append(Step(loss, time.perf_counter() - t0, batch.numel()))
    return out


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a clock read around a step times the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
