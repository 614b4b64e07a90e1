"""The memory-savers ladder: savers applied one on top of another, in a fixed, documented order, from the method as
people run it without any (`qlora-bench ladder`; README, "The memory-savers ladder").

    rung  saver                  what changes (RunConfig)
    0     baseline               full: precision mixed (fp32 masters and moments); lora: PEFT's fp32 adapters;
                                 qlora: prepare_model_for_kbit_training (fp32 embeddings, norms, head) + fp32 adapters
    1     bf16-params            full: precision bf16; lora: adapter_dtype model; qlora: kbit_prepare off too
    2     chunked-loss           loss_impl chunked
    3     ckpt-every-other       grad_checkpointing on, ckpt_every 2
    4     ckpt-every-layer       ckpt_every 1
    5     optimizer-in-backward  optimizer_in_backward
    6     8bit-adamw             optimizer adamw8bit (bitsandbytes)
    7     no-adapter-dropout     lora_dropout 0 (lora, qlora): the only rung that changes what is trained
    8     offload-activations    offload_activations (CUDA only: on a CPU it is estimated, never measured)

The order is torchtune's (its README's Llama-3.2-3B table: chunked cross-entropy, checkpointing, optimizer in
backward, offloading, 8-bit AdamW), with the parameter dtypes first, as the cheapest change, dropout after every
saver that leaves the training as it was, and offloading last, the only one a CPU cannot run. A rung that changes
nothing for a method (dropout under Full FT, or a base that already has the setting) is left out.

Records of a ladder carry `ladder`: its name, the rung and the saver, so a report draws them in order without
knowing how they were made.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qlora.config import RunConfig, pattern_depth_ok


@dataclass(frozen=True)
class Saver:
    key: str
    title: str  # how a table names the rung
    about: str
    changes: dict  # method -> RunConfig fields this rung sets (a method missing: every method, from "*")
    cuda_only: bool = False

    def apply(self, cfg: RunConfig) -> RunConfig:
        return replace(cfg, **self.changes.get(cfg.method, self.changes.get("*", {})))


SAVERS = (
    Saver("baseline", "baseline", "the method as commonly run, no saver",
          {"full": {"precision": "mixed"}, "lora": {"adapter_dtype": "fp32"},
           "qlora": {"kbit_prepare": True, "adapter_dtype": "fp32"}}),
    Saver("bf16-params", "bf16 parameters", "non-quantised parameters and adapters in bf16 instead of fp32",
          {"full": {"precision": "bf16"}, "lora": {"adapter_dtype": "model"},
           "qlora": {"kbit_prepare": False, "adapter_dtype": "model"}}),
    Saver("chunked-loss", "chunked cross-entropy", "the head and loss a chunk of tokens at a time",
          {"*": {"loss_impl": "chunked"}}),
    Saver("ckpt-every-other", "checkpoint every other layer", "activation checkpointing on layers 0, 2, 4...",
          {"*": {"grad_checkpointing": True, "ckpt_every": 2}}),
    Saver("ckpt-every-layer", "checkpoint every layer", "activation checkpointing on every layer",
          {"*": {"ckpt_every": 1}}),
    Saver("optimizer-in-backward", "optimizer step in backward", "each tensor stepped and its gradient freed in "
          "backward", {"*": {"optimizer_in_backward": True}}),
    Saver("8bit-adamw", "8-bit AdamW", "bitsandbytes' AdamW8bit: 8-bit moments", {"*": {"optimizer": "adamw8bit"}}),
    Saver("no-adapter-dropout", "no adapter dropout", "lora_dropout 0 (PEFT's own default; the recipe's 0.05 saves "
          "a mask and a dropped-out copy of each adapter's input): changes the training, not only its memory",
          {"lora": {"lora_dropout": 0.0}, "qlora": {"lora_dropout": 0.0}, "full": {}}),
    Saver("offload-activations", "activation offloading", "tensors saved for backward in pinned CPU memory",
          {"*": {"offload_activations": True}}, cuda_only=True),
)
KEYS = tuple(s.key for s in SAVERS)
# The settings the rungs own: a ladder starts from the base config with these at their defaults.
OWNED = ("precision", "adapter_dtype", "kbit_prepare", "loss_impl", "grad_checkpointing", "ckpt_every",
         "optimizer_in_backward", "optimizer", "adamw_impl", "offload_activations")


def rungs(base: RunConfig) -> list[tuple[Saver, RunConfig]]:
    """Every rung of the ladder from `base` (its model, method, shape and LoRA settings; the savers' own fields
    start from their defaults), each rung's config with every saver up to it applied."""
    defaults = RunConfig()
    cfg = replace(base, **{f: getattr(defaults, f) for f in OWNED})
    out = []
    for saver in SAVERS:
        if saver.cuda_only and not cfg.device.startswith("cuda"):
            cfg = replace(cfg, device="cuda")  # estimated only: the runner measures no CUDA rung on a CPU
        after = saver.apply(cfg)
        if out and after == cfg:
            continue
        cfg = after
        out.append((saver, with_depth(cfg, base.layers)))
    return out


def with_depth(cfg: RunConfig, layers: int | None) -> RunConfig:
    """cfg at `layers` (None: full depth), or deeper where its checkpointing pattern needs it (qlora.config.
    pattern_depth_ok: extrapolating measures layers/2 and layers, and each must hold whole runs of the pattern)."""
    if layers is not None and not pattern_depth_ok(cfg, layers):
        every = cfg.ckpt_every
        layers = 2 * every * -(-layers // (2 * every))
    return replace(cfg, layers=layers)


def name(cfg: RunConfig) -> str:
    """A ladder's name: model, method and shape (`llama-2-7b qlora 1x2048`)."""
    return f"{cfg.model} {cfg.method} {cfg.batch_size}x{cfg.seq_len}"


def tag(cfg: RunConfig, saver: Saver) -> dict:
    """The `ladder` field of a record of `saver`'s rung of the ladder of cfg."""
    return {"name": name(cfg), "rung": KEYS.index(saver.key), "saver": saver.key}


def by_key(key: str) -> Saver:
    return SAVERS[KEYS.index(key)]
