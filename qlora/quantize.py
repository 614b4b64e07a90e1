"""The 4-bit base of QLoRA, built with bitsandbytes' own Linear4bit and Params4bit.

Random-weight models are quantised one decoder layer at a time straight after that layer is initialised, so a 7B
QLoRA build never holds the 16-bit model: peak memory while loading is the 4-bit model plus one 16-bit layer.
Real checkpoints go through transformers' `BitsAndBytesConfig` instead (see build.py); both give the same modules.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora.config import RunConfig, torch_dtype

# The QLoRA recipe quantises every Linear of the base except the output head (transformers' bitsandbytes
# integration keeps lm_head in 16 bit too): embeddings, norms and lm_head stay in the model dtype.
KEEP_UNQUANTISED = ("lm_head",)


def bnb_config(cfg: RunConfig, keep: tuple[str, ...] | None = None):
    """transformers' BitsAndBytesConfig for cfg, with every QLoRA choice explicit (its defaults are fp4/no DQ/fp32).
    `keep`: the modules left unquantised (default KEEP_UNQUANTISED; a classifier's head for encoders)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(cfg.compute_dtype),
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=list(keep or KEEP_UNQUANTISED),
    )


def to_linear4bit(linear: nn.Linear, cfg: RunConfig, device: torch.device) -> nn.Module:
    """A bitsandbytes Linear4bit holding `linear`'s weight quantised per cfg; `linear`'s 16-bit weight can be freed."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch_dtype(cfg.compute_dtype),
        compress_statistics=cfg.double_quant,
        quant_type=cfg.quant_type,
        quant_storage=torch.uint8,
        device="meta",  # placeholders only; the real weight is set just below
    )
    weight = bnb.nn.Params4bit(
        linear.weight.data,
        requires_grad=False,
        compress_statistics=cfg.double_quant,
        quant_type=cfg.quant_type,
        quant_storage=torch.uint8,
        module=q,
    )
    q.weight = weight._quantize(device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    q.train(linear.training)
    return q


def quantise_linears_(module: nn.Module, cfg: RunConfig, device: torch.device) -> None:
    """Replace every nn.Linear under `module` (except KEEP_UNQUANTISED) by a 4-bit Linear4bit, in place."""
    for name, child in list(module.named_children()):
        if name in KEEP_UNQUANTISED:
            continue
        if type(child) is nn.Linear:
            setattr(module, name, to_linear4bit(child, cfg, device))
        else:
            quantise_linears_(child, cfg, device)


def linear4bit_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every bitsandbytes Linear4bit in `model` (peft's LoRA wrappers subclass it)."""
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def disable_cpu_repacking_(model: nn.Module) -> None:
    """Stop bitsandbytes' in-place CPU repacking of 4-bit weights.

    On CPUs with avx512_bf16, an eval-mode forward with a no-grad input repacks every Linear4bit in place: double
    quantisation is undone (absmax becomes bf16) and later training forwards silently lose their gradients.
    """
    for m in linear4bit_modules(model).values():
        m.support_avx512bf16_for_cpu = False


def quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors of a Linear4bit's quantisation constants: absmax, and for double quant the nested absmax,
    the nested code table and the 8-bit-quantised absmax (bitsandbytes' QuantState layout); plus the code table."""
    qs = module.weight.quant_state
    out = [qs.absmax, qs.code]
    if qs.nested:
        out += [qs.state2.absmax, qs.state2.code]
        if isinstance(qs.offset, torch.Tensor):
            out.append(qs.offset)
    return out
