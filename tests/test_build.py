"""Structure of each method on the tiny model: what trains, what is frozen, what is 4-bit and how big."""

import math

import pytest
import torch
from torch import nn

from qlora import quantize
from qlora.build import build, count_trainable
from qlora.config import LLAMA_TARGETS, ConfigError
from qlora.optim import make_optimizer, optimizer_state_tensors
from qlora.train import train_step


def projection_shapes(hf):
    """(in, out) of each Llama projection, from the config alone."""
    h, hd = hf.hidden_size, hf.hidden_size // hf.num_attention_heads
    q, kv, i = hf.num_attention_heads * hd, hf.num_key_value_heads * hd, hf.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def batch(cfg, vocab=256):
    return torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len))


def test_full_trains_every_parameter(tiny):
    built = build(tiny(method="full"))
    total = sum(p.numel() for p in built.model.parameters())
    assert count_trainable(built.model) == total == 426_624


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("targets", [LLAMA_TARGETS, ("q_proj", "v_proj"), ("down_proj",)])
@pytest.mark.parametrize("r", [4, 16])
def test_lora_count_is_layers_times_r_times_in_plus_out(tiny, method, targets, r):
    built = build(tiny(method=method, lora_r=r, lora_targets=targets))
    shapes = projection_shapes(built.hf_config)
    expected = built.hf_config.num_hidden_layers * r * sum(sum(shapes[t]) for t in targets)
    assert count_trainable(built.model) == expected
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_frozen_base_is_bit_identical_after_a_step(tiny, method):
    cfg = tiny(method=method, lr=1e-2)
    built = build(cfg)
    before = snapshot(built.model)
    states = {n: [t.clone() for t in quantize.quant_state_tensors(m)]
              for n, m in quantize.linear4bit_modules(built.model).items()}
    train_step(built.model, make_optimizer(cfg, built.model), batch(cfg))
    for n, p in built.model.named_parameters():
        if p.requires_grad:
            if ".lora_B." in n:  # B starts at zero, so only B is sure to move on the first step
                assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    for n, m in quantize.linear4bit_modules(built.model).items():
        after = quantize.quant_state_tensors(m)
        assert all(torch.equal(a, b) for a, b in zip(states[n], after, strict=True)), n


@pytest.mark.parametrize("precision", ["bf16", "mixed", "fp32"])
def test_full_changes_every_weight(tiny, precision):
    cfg = tiny(method="full", lr=1e-2, precision=precision)
    built = build(cfg)
    before = snapshot(built.model)
    train_step(built.model, make_optimizer(cfg, built.model), batch(cfg))
    unchanged = [n for n, p in built.model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def decoder_linears(hf):
    return {f"layers.{i}.{part}.{t}" for i in range(hf.num_hidden_layers)
            for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                ("mlp", ("gate_proj", "up_proj", "down_proj")))
            for t in names}


def quant_constant_bytes(numel, double_quant, blocksize=64, nested_blocksize=256):
    """bitsandbytes' 4-bit layout: one absmax per block of 64; with double quantisation the absmax are stored as
    uint8 codes around their mean (fp32 offset), with one fp32 absmax per 256 of them and a 256-entry fp32 code
    table; the 16-entry fp32 4-bit code table is stored either way."""
    blocks = math.ceil(numel / blocksize)
    code4 = 16 * 4
    if not double_quant:
        return blocks * 4 + code4
    return blocks * 1 + math.ceil(blocks / nested_blocksize) * 4 + 256 * 4 + 4 + code4


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("targets", [LLAMA_TARGETS, ("q_proj", "v_proj")])
def test_qlora_quantises_exactly_the_decoder_linears(tiny, quant_type, double_quant, targets):
    built = build(tiny(method="qlora", quant_type=quant_type, double_quant=double_quant, lora_targets=targets))
    q = quantize.linear4bit_modules(built.model)
    # peft wraps targeted Linear4bit as `<name>.base_layer`; untargeted ones stay where they were.
    names = {n[n.index("layers."):].removesuffix(".base_layer") for n in q}
    assert names == decoder_linears(built.hf_config)
    assert not isinstance(built.model.get_base_model().lm_head, type(next(iter(q.values()))))
    for n, m in q.items():
        w, qs = m.weight, m.weight.quant_state
        assert w.dtype == torch.uint8 and qs.quant_type == quant_type and qs.nested == double_quant, n
        numel = math.prod(qs.shape)
        assert w.numel() == numel // 2  # two 4-bit values per byte
        got = sum(t.numel() * t.element_size() for t in quantize.quant_state_tensors(m))
        assert got == quant_constant_bytes(numel, double_quant), n
        if double_quant:
            assert qs.absmax.dtype == torch.uint8


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("eval_first", [False, True])
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_loss_decreases_on_a_fixed_batch(tiny, method, eval_first, optimizer):
    cfg = tiny(method=method, lr=1e-3 if method == "full" else 1e-2, optimizer=optimizer, lora_dropout=0.0)
    built = build(cfg)
    ids = batch(cfg)
    if eval_first:
        # The CPU repacking trap: an eval-mode no-grad forward must not undo double quantisation or cut gradients.
        built.model.eval()
        with torch.no_grad():
            built.model(input_ids=ids)
        built.model.train()
    opt = make_optimizer(cfg, built.model)
    losses = [train_step(built.model, opt, ids) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05, losses
    for m in quantize.linear4bit_modules(built.model).values():
        assert m.weight.quant_state.absmax.dtype == torch.uint8  # still double-quantised


def test_mixed_precision_keeps_fp32_masters_in_the_optimizer(tiny):
    cfg = tiny(method="lora", precision="mixed")
    built = build(cfg)
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.bfloat16}
    opt = make_optimizer(cfg, built.model)
    train_step(built.model, opt, batch(cfg))
    state = optimizer_state_tensors(opt)
    n = sum(p.numel() for p in trainable)
    fp32 = sum(t.numel() for t in state if t.dtype == torch.float32 and t.dim() > 0)
    assert fp32 == 3 * n  # master copy + two AdamW moments


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_adapters_are_in_the_precision_dtype(tiny, precision, dtype):
    built = build(tiny(method="qlora", precision=precision))
    assert {p.dtype for p in built.model.parameters() if p.requires_grad} == {dtype}


def test_checkpointing_trains(tiny):
    cfg = tiny(method="qlora", grad_checkpointing=True, lr=1e-2, lora_dropout=0.0)
    built = build(cfg)
    assert built.model.get_base_model().is_activation_checkpointing
    ids = batch(cfg)
    opt = make_optimizer(cfg, built.model)
    losses = [train_step(built.model, opt, ids) for _ in range(4)]
    assert losses[-1] < losses[0]


def test_unknown_lora_target_is_named(tiny):
    with pytest.raises(ConfigError, match="lora_targets qkv_proj not found in tiny-llama"):
        build(tiny(method="lora", lora_targets=("q_proj", "qkv_proj")))


def test_seq_len_above_model_maximum(tiny):
    with pytest.raises(ConfigError, match="seq_len 512 exceeds the model's maximum of 256"):
        build(tiny(seq_len=512))


def test_cuda_without_cuda_is_bad_input(tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        build(tiny(device="cuda"))


def test_reduced_depth_builds_fewer_layers(tiny):
    built = build(tiny(method="qlora", layers=1))
    assert len(built.model.get_base_model().model.layers) == 1
    assert isinstance(built.model.get_base_model().lm_head, nn.Linear)
