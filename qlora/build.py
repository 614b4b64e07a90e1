"""Build the model a RunConfig asks for: base weights (random or real, 16-bit or 4-bit), then the method.

Full FT trains every parameter; LoRA freezes the base and adds peft adapters; QLoRA is LoRA on a 4-bit base.
Encoders (models.ENCODER_TYPES, e.g. all-MiniLM-L6-v2) are built as sequence classifiers with `num_labels` classes:
their head (models.HEAD_MODULES: the checkpoint's pooler, if it has one, and a new classifier) stays 16-bit and is
trained in every method (PEFT's modules_to_save).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qlora import models, quantize, savers
from qlora.config import ConfigError, RunConfig


@dataclass
class Built:
    """A ready-to-train model and what it came from."""

    model: nn.Module
    hf_config: object
    source: models.ModelSource
    tokenizer: object | None  # None for random-weight models (they train on byte tokens)


def model_dtype(cfg: RunConfig) -> torch.dtype:
    """Dtype of the unquantised weights and of the trainable parameters as the model holds them."""
    return torch.float32 if cfg.precision == "fp32" else torch.bfloat16


def build(cfg: RunConfig, on_layer=None, num_labels: int = 2) -> Built:
    """Build cfg's model on cfg.device, in training mode, with exactly the method's parameters trainable.

    `on_layer(done, total)`, if given, is called as each decoder layer of a random-weight model is ready
    (initialised, and quantised under QLoRA): minutes for a 7B model on CPU, so callers can show progress.
    `num_labels`: the classes of an encoder's classification head (decoders ignore it).
    Raises ConfigError for input the user can fix (unknown model, bad targets, seq_len too long, no CUDA).
    """
    from qlora.preflight import preflight

    cfg = preflight(cfg, classifier=True)  # lora_targets resolved (all-linear -> this architecture's names)
    source = models.resolve(cfg.model)
    hf_cfg = models.hf_config(source, cfg.layers)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    if source.random_weights:
        if models.is_encoder(hf_cfg):
            raise ConfigError(f"model {cfg.model!r} is a {hf_cfg.model_type} encoder without weights; encoders are "
                              "built from real weights only (all-minilm-l6-v2, or a directory with safetensors)")
        model, tokenizer = random_model(hf_cfg, cfg, device, on_layer), None
    else:
        if models.is_encoder(hf_cfg):
            hf_cfg.num_labels = num_labels
        model, tokenizer = pretrained_model(source, hf_cfg, cfg, device)
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    quantize.disable_cpu_repacking_(model)
    if cfg.kbit_prepare:
        from peft import prepare_model_for_kbit_training

        # PEFT's own function (fp32 for every parameter that is not 4-bit); checkpointing stays ours, below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.loss_impl == "chunked":
        if models.is_encoder(hf_cfg):
            raise ConfigError(f"loss_impl chunked is a causal-LM loss; model {cfg.model!r} is a classifier")
        savers.use_chunked_loss(model)
    if cfg.offload_activations:
        savers.offload_activations(model)
    if cfg.adapter:
        model = add_lora(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.grad_checkpointing:
        enable_checkpointing(model.get_base_model() if hasattr(model, "get_base_model") else model, cfg.ckpt_every)
    model.train()
    return Built(model, hf_cfg, source, tokenizer)


def enable_checkpointing(model: nn.Module, every: int = 1) -> None:
    """Recompute the activations of every `every`-th decoder layer (0, every, 2 x every...) in backward, with
    whichever name this transformers has: `activation_checkpointing_enable` (5.24 on, which takes `every_n_layers`)
    or the older `gradient_checkpointing_enable` (earlier 5.x, and the GPU machine's 5.17), after which the layers
    left out are switched back off here. Non-reentrant: it needs no input that requires grad, so frozen embeddings
    are fine."""
    import inspect

    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and "every_n_layers" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
        return
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if every > 1:
        for i, layer in enumerate(models.layers_of(model)):
            layer.gradient_checkpointing = i % every == 0


def _materialise_(module: nn.Module, device: torch.device, init) -> None:
    """Give every meta tensor directly under `module` real (uninitialised) memory, then run `init` on each submodule."""
    for m in module.modules():
        m.to_empty(device=device, recurse=False)
    for m in module.modules():
        init(m)


def random_model(hf_cfg, cfg: RunConfig, device: torch.device, on_layer=None) -> nn.Module:
    """Random weights, straight in the target dtype; under qlora each layer is quantised as soon as it exists.
    `on_layer(done, total)` as in `build`."""
    model = models.meta_model(hf_cfg, model_dtype(cfg), cfg.attention)
    layers = model.get_decoder().layers
    if on_layer is not None:
        on_layer(0, len(layers))
    with torch.no_grad():
        for done, layer in enumerate(layers, 1):
            _materialise_(layer, device, model._init_weights)
            if cfg.quantized:
                quantize.quantise_linears_(layer, cfg, device)
            if on_layer is not None:
                on_layer(done, len(layers))
        # Then what lies outside the decoder layers: embeddings, final norm, rotary buffers, lm_head.
        in_layers = {id(m) for m in layers.modules()}
        for m in model.modules():
            direct = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
            if id(m) not in in_layers and any(t.is_meta for t in direct):
                m.to_empty(device=device, recurse=False)
                model._init_weights(m)
    reset_rotary_(model)
    model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"random build left tensors on the meta device: {leftover[:5]}")
    return model


@torch.no_grad()
def reset_rotary_(model: nn.Module) -> None:
    """Recompute every rotary embedding's inverse frequencies from its config, in place.

    A random build gives buffers uninitialised memory (`to_empty`). On CPU that is zeroed pages, and transformers'
    `_init_weights` refills rotary buffers in the versions seen so far; on CUDA a reused allocator block holds old
    data, so a version whose `_init_weights` skips them would train on garbage frequencies (NaN losses). Computing
    them here does not depend on either."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for m in model.modules():
        inv_freq = getattr(m, "inv_freq", None)
        if not isinstance(inv_freq, torch.Tensor) or getattr(m, "config", None) is None:
            continue
        init = getattr(m, "rope_init_fn", None)  # older transformers keep the function on the module
        if init is None:
            kind = getattr(m, "rope_type", "default")
            init = m.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
        fresh, m.attention_scaling = init(m.config, device=torch.device("cpu"))
        inv_freq.copy_(fresh)
        if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
            m.original_inv_freq.copy_(fresh)


def pretrained_model(source: models.ModelSource, hf_cfg, cfg: RunConfig, device: torch.device):
    """Real weights via transformers (safetensors only, no remote code); 4-bit through BitsAndBytesConfig. An
    encoder loads as a sequence classifier: its checkpoint's weights, and a new classifier (seeded by cfg.seed)."""
    from transformers import AutoTokenizer

    path = str(models.weights_dir(source))
    encoder = models.is_encoder(hf_cfg)
    kwargs = dict(config=hf_cfg, dtype=model_dtype(cfg), use_safetensors=True, trust_remote_code=False,
                  attn_implementation=cfg.attention)
    if cfg.quantized:
        kwargs["quantization_config"] = quantize.bnb_config(cfg, keep=models.HEAD_LINEARS if encoder else None)
    if device.type == "cuda":
        kwargs["device_map"] = {"": device}
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if cfg.layers is not None or encoder:  # dropped layers' weights, a new head: listed one by one otherwise
        hf_logging.set_verbosity_error()
    try:
        model = models.model_class(hf_cfg).from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except OSError as e:
        raise ConfigError(f"cannot load model {source.name!r}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model, tokenizer


def add_lora(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Freeze the base and add LoRA adapters to cfg.lora_targets (resolved by preflight), in cfg.adapter_dtype."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    encoder = models.is_encoder(model.config)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
        # A classifier's new head is trained whole, beside the adapters (and saved with them).
        task_type="SEQ_CLS" if encoder else "CAUSAL_LM",
        modules_to_save=list(models.HEAD_MODULES) if encoder else None,
    )
    # autocast_adapter_dtype=False: peft would otherwise upcast bf16 adapters to fp32 behind our back; the
    # adapter_dtype setting decides instead (fp32 is PEFT's default; mixed keeps an fp32 master copy instead).
    model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    dtype = torch.float32 if cfg.adapter_dtype == "fp32" else model_dtype(cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))
