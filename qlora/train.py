"""The training step and a short training loop over packed text."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qlora import data
from qlora.build import Built
from qlora.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Step:
    """One optimisation step as `timed_steps` saw it."""

    index: int
    loss: float  # NaN if the step diverged
    seconds: float | None  # None for a step run by the `around` hook: its clock would include the hook's work
    tokens: int  # input tokens (padding excluded when the batch has an attention mask)


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


def timed_steps(model: nn.Module, optimizer, batches: Iterable, *, around=None, on_step=None) -> list[Step]:
    """The training loop every caller shares (`train`, the harness's measured runs and its quality runs): one
    `train_step` per batch (a token-id tensor or a dict of model inputs, moved to the model's device), each timed
    between device synchronisations.

    `around(index, step)`, if given, may run a step itself, e.g. inside a memory ledger: it calls
    `step(on_phase)` (see train_step) and returns the loss; or it returns None and the step runs timed as usual.
    `on_step(Step)`, if given, is called after every step (progress, logging).
    """
    device = next(model.parameters()).device
    out = []
    for index, batch in enumerate(batches):
        if isinstance(batch, dict):
            batch = {k: v.to(device) for k, v in batch.items()}
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        else:
            batch = batch.to(device)
            tokens = batch.numel()

        def step(on_phase=None, batch=batch):
            return train_step(model, optimizer, batch, on_phase)

        loss = around(index, step) if around is not None else None
        if loss is not None:
            done = Step(index, loss, None, tokens)
        else:
            sync(device)
            t0 = time.perf_counter()
            loss = step()  # .item() inside synchronises the loss, not the step: sync() does
            sync(device)
            done = Step(index, loss, time.perf_counter() - t0, tokens)
        out.append(done)
        if on_step is not None:
            on_step(done)
    return out


def train(built: Built, cfg: RunConfig, optimizer, blocks: torch.Tensor, steps: int | None = None,
          on_step=None) -> list[Step]:
    """Run cfg.steps (or `steps`) optimisation steps on shuffled batches of `blocks`; returns one Step each."""
    it = data.batches(blocks, cfg.batch_size, cfg.seed)
    n = steps if steps is not None else cfg.steps
    return timed_steps(built.model, optimizer, itertools.islice(it, n), on_step=on_step)


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a clock read around a step times the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
