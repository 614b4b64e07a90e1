"""The memory savers (qlora.savers, the optimizer in backward, the checkpointing policy): each changes only what it
should. Same loss and gradients with and without; the ledger shows the category it targets shrink."""

from dataclasses import replace

import pytest
import torch

from bench.measuring.measure import measure_once
from qlora.build import build
from qlora.config import ConfigError, RunConfig
from qlora.optim import InBackwardOptimizer, make_optimizer
from qlora.savers import OffloadActivations, chunked_cross_entropy
from qlora.train import train_step


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (cfg.batch_size, cfg.seq_len), generator=g)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_loss_equals_transformers_loss_and_gradients(tiny, method):
    """fp32, so the only difference is the order of additions: loss and every trainable gradient agree."""
    cfg = tiny(method=method, precision="fp32", seq_len=200, lora_dropout=0.0)  # 400 tokens: 4 chunks, one partial
    grads, losses = {}, {}
    for impl in ("standard", "chunked"):
        built = build(replace(cfg, loss_impl=impl))
        batch = _batch(cfg)
        labels = batch.clone()
        labels[:, :7] = -100  # a masked prompt, as quality runs train
        loss = built.model(input_ids=batch, labels=labels).loss
        loss.backward()
        losses[impl] = loss.item()
        grads[impl] = {n: p.grad.clone() for n, p in built.model.named_parameters() if p.requires_grad}
    assert losses["chunked"] == pytest.approx(losses["standard"], rel=1e-6)
    for name, g in grads["standard"].items():
        torch.testing.assert_close(grads["chunked"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_divides_by_num_items_in_batch_like_transformers():
    """A trainer accumulating micro-batches passes the window's token count: the sum is divided by it."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(2, 30, 16)
    labels = torch.randint(0, 40, (2, 30))
    mean = chunked_cross_entropy(hidden, head, labels, chunk_tokens=7)
    summed = chunked_cross_entropy(hidden, head, labels, num_items_in_batch=10, chunk_tokens=7)
    assert summed.item() == pytest.approx(mean.item() * 58 / 10, rel=1e-6)  # 2 x 29 counted tokens
    with pytest.raises(TypeError, match="bias-free"):
        chunked_cross_entropy(hidden, torch.nn.Linear(16, 40), labels)


def test_evaluating_with_labels_computes_the_loss_only(tiny):
    built = build(tiny(method="full", precision="fp32", loss_impl="chunked"))
    batch = _batch(tiny())
    with torch.no_grad():
        loss = built.model(input_ids=batch, labels=batch).loss
    assert loss.grad_fn is None and torch.isfinite(loss)


def test_no_labels_runs_the_models_own_forward(tiny):
    """Scoring and generation read logits: without labels the chunked model is the model."""
    built = build(tiny(method="full", precision="fp32", loss_impl="chunked"))
    out = built.model(input_ids=_batch(tiny()))
    assert out.logits.shape == (2, 32, 512)


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_optimizer_in_backward_trains_the_same(tiny, method):
    """AdamW updates each tensor on its own: stepping it in backward gives the same losses, step after step."""
    precision = "fp32" if method == "full" else "bf16"
    cfg = tiny(method=method, precision=precision, seq_len=64, lora_dropout=0.0)
    losses = {}
    for oib in (False, True):
        c = replace(cfg, optimizer_in_backward=oib)
        built = build(c)
        opt = make_optimizer(c, built.model)
        assert isinstance(opt, InBackwardOptimizer) == oib
        batch = _batch(c)
        losses[oib] = [train_step(built.model, opt, batch) for _ in range(3)]
        assert all(p.grad is None for p in built.model.parameters())  # every gradient freed
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][2] < losses[True][0]


def test_each_saver_shrinks_the_category_it_targets(tiny):
    """The ledger, saver by saver, on the tiny model (Full FT, 2 x 256 tokens)."""
    base = tiny(method="full", seq_len=256, steps=1)
    standard = measure_once(base)
    chunked = measure_once(replace(base, loss_impl="chunked"))
    # the fp32 log-softmax of 512 tokens x 512 vocab is no longer saved; backward starts with no logits gradient
    assert chunked["backward_start"]["activations"] < standard["backward_start"]["activations"] - 2 * 512 * 512
    ckpt = measure_once(replace(base, loss_impl="chunked", grad_checkpointing=True))
    assert ckpt["backward_start"]["activations"] < chunked["backward_start"]["activations"]
    # with checkpointing the peak waits for the optimizer step, where every gradient is live; stepped in backward,
    # at most a tensor's worth is
    assert ckpt["bytes"]["gradients"] > 0
    oib = measure_once(replace(base, loss_impl="chunked", grad_checkpointing=True, optimizer_in_backward=True))
    assert oib["bytes"]["gradients"] < ckpt["bytes"]["gradients"] / 4
    assert oib["bytes"]["peak"] < ckpt["bytes"]["peak"]
    eight = measure_once(replace(base, loss_impl="chunked", grad_checkpointing=True, optimizer_in_backward=True,
                                 optimizer="adamw8bit"))
    # bf16 moments (2 x 2 bytes an element) become 8-bit ones with a block constant per 256 (tensors of 4096
    # elements and more; the tiny model's smaller ones keep fp32 state)
    assert eight["bytes"]["optimizer"] < 0.6 * oib["bytes"]["optimizer"]


def test_every_other_layer_is_checkpointed(tiny):
    built = build(tiny(method="lora", grad_checkpointing=True, ckpt_every=2, layers=2))
    flags = [layer.gradient_checkpointing for layer in built.model.get_base_model().model.layers]
    assert flags == [True, False]
    every = measure_once(tiny(method="lora", seq_len=128, grad_checkpointing=True, steps=1))["backward_start"]
    other = measure_once(tiny(method="lora", seq_len=128, grad_checkpointing=True, ckpt_every=2,
                              steps=1))["backward_start"]
    none = measure_once(tiny(method="lora", seq_len=128, steps=1))["backward_start"]
    assert every["activations"] < other["activations"] < none["activations"]


def test_offload_hooks_leave_parameters_and_cpu_tensors_alone():
    """On a CPU nothing moves (and nothing is copied); CUDA tensors go to pinned memory (tests/test_cuda_path.py)."""
    w = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(8, 64, requires_grad=True)
    with OffloadActivations():
        y = (x @ w).relu().sum()
    y.backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("bad, message", [
    (dict(ckpt_every=2), "grad_checkpointing is off"),
    (dict(ckpt_every=0, grad_checkpointing=True), "ckpt_every must be an integer > 0"),
    (dict(optimizer_in_backward=True, precision="mixed"), "optimizer_in_backward with precision mixed"),
    (dict(offload_activations=True), "CUDA device"),
    (dict(loss_impl="cce"), "loss_impl must be one of standard, chunked"),
    (dict(optimizer_in_backward="yes"), "optimizer_in_backward must be true or false"),
])
def test_saver_settings_are_checked(bad, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**bad)


@pytest.mark.gpu
def test_offloading_moves_saved_activations_off_the_device(tiny):
    """On CUDA: what autograd saves goes to pinned host memory, so the device holds less as backward starts; the
    losses are the same."""
    base = tiny(method="lora", seq_len=256, steps=1, device="cuda", grad_checkpointing=True)
    kept = measure_once(base)
    moved = measure_once(replace(base, offload_activations=True))
    assert moved["backward_start"]["total"] < kept["backward_start"]["total"]
    assert moved["train_losses"] == pytest.approx(kept["train_losses"], rel=1e-3)
