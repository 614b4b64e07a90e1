"""The RunConfig a transformers Trainer run is, read from its model and TrainingArguments (for MemoryLedgerCallback),
and in words what the run does that no RunConfig expresses (the record's `caveats`)."""

from __future__ import annotations

import torch

from qlora import quantize
from qlora.config import ConfigError, RunConfig

# TrainingArguments.optim -> (RunConfig.optimizer, RunConfig.adamw_impl): the optimizers the estimator models.
OPTIMS = {"adamw_torch": ("adamw", "default"), "adamw_torch_fused": ("adamw", "fused"),
          "adamw_bnb_8bit": ("adamw8bit", "default"), "adamw_8bit": ("adamw8bit", "default"),
          "paged_adamw_8bit": ("paged_adamw8bit", "default"), "paged_adamw_32bit": ("paged_adamw32bit", "default")}
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def inner_optimizer(optimizer):
    """The torch or bitsandbytes optimizer under accelerate's AcceleratedOptimizer wrapper."""
    while getattr(optimizer, "optimizer", optimizer) is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_name(model) -> str | None:
    """What the model was loaded from (a bundled name, a directory or a hub id), as its config says."""
    name = getattr(base_model(model).config, "name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def optimizer_of(args) -> tuple[str, str]:
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in OPTIMS:
        raise ConfigError(f"MemoryLedgerCallback: optim {optim!r} is not one the suite models ({', '.join(OPTIMS)})")
    return OPTIMS[optim]


def _dtype(dtype) -> str:
    return DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def config_of(model, args, batch_shape: tuple[int, int], name: str, steps: int = 1,
              caveats: list | None = None) -> RunConfig:
    """The RunConfig a Trainer run is: method, quantisation and LoRA read from the model, the optimizer, seed and
    checkpointing from `args` (TrainingArguments), batch size and length from the batch the step trained on. What
    the run does that no config expresses is appended to `caveats`, in words. Raises ConfigError naming a setting
    the suite does not model (an optimizer, a model dtype)."""
    caveats = [] if caveats is None else caveats
    optimizer, impl = optimizer_of(args)
    base = base_model(model)
    four_bit = quantize.linear4bit_modules(base)
    peft = getattr(model, "peft_config", None)
    fields: dict = {}
    if peft:
        lora = peft[getattr(model, "active_adapter", "default")]
        targets = lora.target_modules
        if not isinstance(targets, str):  # in the order the model has them (q_proj, k_proj, ...), as runs record
            leaves = dict.fromkeys(n.rsplit(".", 1)[-1] for n, _ in base.named_modules())
            targets = tuple([t for t in leaves if t in targets] + sorted(set(targets) - set(leaves)))
        fields.update(lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=float(lora.lora_dropout),
                      lora_targets=(targets,) if isinstance(targets, str) else targets)
        caveats += _unmodelled_peft(model, lora)
    elif four_bit:
        raise ConfigError("MemoryLedgerCallback: a 4-bit model without LoRA adapters cannot be trained")
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        if trainable < total:
            caveats.append(f"{trainable:,} of {total:,} parameters are trainable; Full FT's estimate trains all")
    if four_bit:
        layer = next(iter(four_bit.values()))
        fields.update(quant_type=layer.weight.quant_type, double_quant=bool(layer.weight.quant_state.nested),
                      compute_dtype=_dtype(layer.compute_dtype or torch.float32))
        if fields["compute_dtype"] not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"MemoryLedgerCallback: 4-bit compute dtype {layer.compute_dtype} is not modelled")
    frozen = [p for n, p in base.named_parameters() if "lora_" not in n and p.is_floating_point()]
    dtype = frozen[0].dtype if frozen else torch.float32
    if dtype not in PRECISIONS:
        raise ConfigError(f"MemoryLedgerCallback: model dtype {_dtype(dtype)} is not one the suite models "
                          "(fp32, bf16)")
    adapters = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    if adapters and adapters[0].dtype == torch.float32 and dtype != torch.float32:
        fields["adapter_dtype"] = "fp32"
    elif adapters and adapters[0].dtype != dtype:
        caveats.append(f"LoRA adapters are {_dtype(adapters[0].dtype)} on a {PRECISIONS[dtype]} model (TRL casts a "
                       "4-bit model's adapters to bf16), which no config expresses: the estimate counts them, their "
                       f"gradients and moments in {PRECISIONS[dtype]}")
    if getattr(args, "bf16", False) or getattr(args, "fp16", False):
        caveats.append(f"the Trainer ran under {'bf16' if args.bf16 else 'fp16'} autocast, which the estimator does "
                       "not model (it keeps activations in the model's dtype)")
    attention = getattr(base.config, "_attn_implementation", None) or "sdpa"
    if attention not in ("sdpa", "eager"):
        caveats.append(f"attention {attention!r} is recorded as sdpa, the nearest the estimator models")
    if getattr(args, "world_size", 1) > 1:
        caveats.append(f"{args.world_size} processes: the record is rank 0's and the config one device's; DDP's "
                       "gradient buckets are made before the step and neither counted nor estimated")
    fields["layers"] = _reduced_depth(name, base.config.num_hidden_layers)
    return _resolved(RunConfig(
        model=name, method="qlora" if four_bit else "lora" if peft else "full", optimizer=optimizer,
        adamw_impl=impl, lr=float(args.learning_rate), precision=PRECISIONS[dtype], batch_size=batch_shape[0],
        seq_len=batch_shape[1], attention=attention if attention in ("sdpa", "eager") else "sdpa",
        grad_checkpointing=bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
                                or getattr(base, "is_gradient_checkpointing", False)),
        steps=max(int(steps), 1), seed=int(args.seed),
        device="cpu" if args.device.type == "cpu" else f"cuda:{args.device.index or 0}", **fields))


def _resolved(cfg: RunConfig) -> RunConfig:
    """cfg as `measure` records it (LoRA targets resolved to the architecture's names, Full FT's too), where the
    suite can resolve the model; else as read."""
    from qlora.preflight import preflight

    try:
        return preflight(cfg, device=False)
    except Exception:  # noqa: BLE001 - a model the suite cannot resolve offline keeps the config as read
        return cfg


def _unmodelled_peft(model, lora) -> list[str]:
    """PEFT settings the estimator does not model, in words."""
    out = []
    others = [n for n, p in model.named_parameters() if p.requires_grad and "lora_A" not in n and "lora_B" not in n]
    if others:
        count = sum(p.numel() for n, p in model.named_parameters() if n in set(others))
        out.append(f"{count:,} trainable parameters outside the LoRA matrices ({others[0]}"
                   f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}: modules_to_save, DoRA magnitudes, "
                   "biases or trainable tokens), which the estimate does not count")
    if getattr(lora, "use_dora", False):
        out.append("DoRA: its weight-norm computation in forward and backward is not in the estimate")
    if getattr(lora, "rank_pattern", None) or getattr(lora, "alpha_pattern", None):
        out.append(f"per-module ranks (rank_pattern); the config records r={lora.r} everywhere")
    return out


def _reduced_depth(name: str, layers: int) -> int | None:
    """`layers` when the model is shallower than the model `name` resolves to (a reduced-depth build), else None."""
    from qlora import models

    try:
        full = models.hf_config(models.resolve(name)).num_hidden_layers
    except Exception:  # noqa: BLE001 - a name the suite cannot resolve offline: the depth is the model's own
        return None
    return layers if layers < full else None
