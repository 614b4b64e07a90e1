"""The one run configuration: what gets trained, how, and on what.

`RunConfig` is frozen and validated on construction, so every other module can trust it; `asdict(cfg)` is what
goes into every result record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

Method = Literal["full", "lora", "qlora"]
QuantType = Literal["nf4", "fp4"]
DType = Literal["bf16", "fp16", "fp32"]
# paged_*: bitsandbytes' paged optimizers (state in CUDA unified memory; the QLoRA paper's paged 32-bit AdamW)
Optimizer = Literal["adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw32bit"]
# torch AdamW's implementation. default: torch's own choice (the for-loop on CPU, foreach on CUDA). foreach updates
# every tensor at once through temporaries as large as all of them; fused runs one kernel per tensor group in place;
# for-loop updates one tensor at a time. Their scratch memory differs, not their state.
AdamWImpl = Literal["default", "foreach", "fused", "for-loop"]
# bf16: everything (weights, gradients, optimizer moments) in bf16. mixed: bf16 model, fp32 master copy of the
# trainable parameters held by the optimizer. fp32: everything in fp32 (the CPU-friendly reference).
Precision = Literal["bf16", "mixed", "fp32"]
# The dtype LoRA adapters are stored and trained in. model: the model's (bf16, or fp32 under precision fp32).
# fp32: PEFT's default (get_peft_model's autocast_adapter_dtype upcasts bf16/fp16 adapters), so their gradients and
# AdamW moments are fp32 too.
AdapterDtype = Literal["model", "fp32"]
# transformers' attention implementations available without extra packages: sdpa (torch's fused kernels; the
# default) keeps O(seq) per head for backward, eager materialises the O(seq^2) attention matrix.
Attention = Literal["sdpa", "eager"]
# Data parallelism over world_size ranks, one device each. none: one process. fsdp: FSDP2 fully_shard per decoder
# layer and at the root: parameters, gradients and optimizer state sharded across ranks, each layer's parameters
# all-gathered for its forward and again for its backward (ZeRO-3's layout). fsdp-grad-op: the same, but a layer's
# gathered parameters stay from its forward to its backward (reshard_after_forward=False: FSDP1's SHARD_GRAD_OP).
# ddp: torch DistributedDataParallel, every rank holds everything plus gradient buckets.
Shard = Literal["none", "fsdp", "fsdp-grad-op", "ddp"]
# The causal-LM loss. standard: transformers' own (the whole sequence's logits, upcast to fp32, and their
# log-softmax saved for backward). chunked: qlora.savers' chunked cross-entropy, which computes the head and the
# loss a chunk of tokens at a time and recomputes each chunk in backward, so no full-sequence logits ever exist.
LossImpl = Literal["standard", "chunked"]

# All seven projections of a Llama/Mistral/Qwen2 block: the QLoRA paper's finding is that adapting every linear
# layer is what closes the gap to full fine-tuning.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The default targets, in PEFT's spelling: every Linear of the decoder layers (not lm_head), whatever the
# architecture calls them (Phi-3 fuses them: qkv_proj, gate_up_proj). Resolved per architecture before a run
# (`expand_targets`), and recorded as the resolved list; for Llama-family blocks it is LLAMA_TARGETS.
ALL_LINEAR = "all-linear"


class ConfigError(ValueError):
    """Bad user input. The CLI turns it into exit code 2 with its one-line message."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most `limit` characters: what a one-line error can quote."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _choice(name: str, value, literal) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _positive(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be an integer > 0, got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run. QLoRA is LoRA with a 4-bit base; Full FT is no adapter."""

    model: str = "tiny-llama"
    method: Method = "qlora"
    # 4-bit base (qlora only). transformers defaults to fp4 / no double quant / fp32 compute; QLoRA is these.
    quant_type: QuantType = "nf4"
    double_quant: bool = True
    compute_dtype: DType = "bf16"
    # LoRA (lora and qlora). alpha/r scales the update; r sets adapter memory linearly.
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = (ALL_LINEAR,)
    adapter_dtype: AdapterDtype = "model"
    # PEFT's prepare_model_for_kbit_training before the adapters (qlora only): every parameter that is not 4-bit
    # (embeddings, norms, lm_head) cast to fp32, which also carries the residual stream in fp32.
    kbit_prepare: bool = False
    optimizer: Optimizer = "adamw"
    adamw_impl: AdamWImpl = "default"  # optimizer adamw only
    lr: float | None = None  # None: the method's default (see default_lr)
    precision: Precision = "bf16"
    batch_size: int = 1
    seq_len: int = 512
    grad_checkpointing: bool = False
    # with grad_checkpointing: checkpoint every Nth decoder layer (1: every layer; 2: every other layer, the rest
    # keep their activations). transformers' every_n_layers: layers 0, N, 2N... are checkpointed.
    ckpt_every: int = 1
    loss_impl: LossImpl = "standard"
    # Each parameter's optimizer step runs in backward, as soon as its gradient is accumulated, and the gradient is
    # freed at once (torchtune's optimizer_in_bwd): no step holds every gradient. No gradient clipping or
    # accumulation across steps is possible then.
    optimizer_in_backward: bool = False
    # Tensors saved for backward (not parameters) are moved to pinned CPU memory in forward and back in backward
    # (torch.autograd.graph.save_on_cpu's hooks). CUDA only: on a CPU there is nowhere else to put them.
    offload_activations: bool = False
    attention: Attention = "sdpa"
    steps: int = 3
    seed: int = 0
    device: str = "cpu"
    layers: int | None = None  # reduced depth: build only this many decoder layers (same width)
    shard: Shard = "none"
    world_size: int = 1  # ranks (processes, one device each); batch_size is per rank

    def __post_init__(self) -> None:
        _choice("method", self.method, Method)
        _choice("quant_type", self.quant_type, QuantType)
        _choice("compute_dtype", self.compute_dtype, DType)
        _choice("optimizer", self.optimizer, Optimizer)
        _choice("adamw_impl", self.adamw_impl, AdamWImpl)
        _choice("precision", self.precision, Precision)
        _choice("attention", self.attention, Attention)
        _choice("adapter_dtype", self.adapter_dtype, AdapterDtype)
        _choice("shard", self.shard, Shard)
        _choice("loss_impl", self.loss_impl, LossImpl)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"model must be a non-empty name or path, got {self.model!r}")
        for name in ("lora_r", "lora_alpha", "batch_size", "seq_len", "steps"):
            _positive(name, getattr(self, name))
        _positive("layers", self.layers, allow_none=True)
        _positive("ckpt_every", self.ckpt_every)
        _positive("world_size", self.world_size)
        if self.world_size > 1 and self.shard == "none":
            raise ConfigError(f"world_size {self.world_size} needs a shard (fsdp, fsdp-grad-op or ddp); got none")
        # a plan's "yes" or 1 must not pass as a flag
        for name in ("double_quant", "grad_checkpointing", "kbit_prepare", "optimizer_in_backward",
                     "offload_activations"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        _number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if (isinstance(self.lora_targets, str) or not self.lora_targets
                or not all(isinstance(t, str) and t.strip() for t in self.lora_targets)):
            raise ConfigError(f"lora_targets must be a non-empty list of module names, got {self.lora_targets!r}")
        if self.lr is not None:
            _number("lr", self.lr)
            if not self.lr > 0:
                raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.device, str) or not (
                self.device in ("cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.adamw_impl != "default" and self.optimizer != "adamw":
            raise ConfigError(f"adamw_impl {self.adamw_impl} chooses torch's AdamW implementation; optimizer "
                              f"{self.optimizer} is bitsandbytes' own (use adamw_impl default)")
        if self.optimizer.startswith("paged_") and not self.device.startswith("cuda"):
            raise ConfigError(
                f"optimizer {self.optimizer} pages state through CUDA unified memory and needs a CUDA device; "
                f"got device {self.device!r}"
            )
        if self.adapter_dtype != "model" and not self.adapter:
            raise ConfigError(f"adapter_dtype {self.adapter_dtype} applies to lora and qlora; method {self.method} "
                              "has no adapters")
        if self.adapter_dtype == "fp32" and self.precision == "mixed":
            raise ConfigError("adapter_dtype fp32 with precision mixed: fp32 adapters need no fp32 master copy; "
                              "use precision bf16")
        if self.ckpt_every != 1 and not self.grad_checkpointing:
            raise ConfigError(f"ckpt_every {self.ckpt_every} chooses which layers checkpointing recomputes; "
                              "grad_checkpointing is off")
        if self.optimizer_in_backward and self.precision == "mixed":
            raise ConfigError("optimizer_in_backward with precision mixed: the fp32 master copy is updated from all "
                              "gradients at once; use precision bf16 or fp32")
        if self.optimizer_in_backward and self.shard != "none":
            raise ConfigError(f"optimizer_in_backward with shard {self.shard}: not supported (each rank's step "
                              "would run before its gradients are reduced)")
        if self.offload_activations and not self.device.startswith("cuda"):
            raise ConfigError(f"offload_activations moves saved activations from a CUDA device to CPU memory; on "
                              f"device {self.device!r} they are in CPU memory already (estimate it with --device "
                              "cuda)")
        if self.kbit_prepare and not self.quantized:
            raise ConfigError(f"kbit_prepare (PEFT's prepare_model_for_kbit_training) applies to qlora; got method "
                              f"{self.method}")

    @property
    def adapter(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def quantized(self) -> bool:
        return self.method == "qlora"

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.method)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        d = dict(d)
        if isinstance(d.get("lora_targets"), list):  # JSON and TOML give lists; anything else fails validation
            d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)


def expand_targets(targets: tuple[str, ...], linears: list[str], model: str) -> tuple[str, ...]:
    """`targets` with ALL_LINEAR replaced by `linears` (a decoder layer's Linear names, in module order); raises
    ConfigError naming any target the architecture does not have."""
    out = []
    for t in targets:
        out += linears if t == ALL_LINEAR else [t]
    missing = sorted(set(out) - set(linears))
    if missing:
        raise ConfigError(f"lora_targets {', '.join(missing)} not found in {model}; "
                          f"its decoder layers' Linear layers are: {', '.join(linears)} (or {ALL_LINEAR})")
    return tuple(dict.fromkeys(out))


def pattern_depth_ok(cfg: RunConfig, layers: int) -> bool:
    """Whether `layers` and layers // 2 (the two depths an extrapolation measures) each hold whole runs of cfg's
    every-Nth-layer checkpointing, so that what one more layer adds is the same at both."""
    every = cfg.ckpt_every if cfg.grad_checkpointing else 1
    return layers % every == 0 and (layers // 2) % every == 0


def default_lr(method: str) -> float:
    """Learning rates that work for short runs: adapters tolerate (and need) a much larger one than Full FT."""
    return {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}[method]


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])
