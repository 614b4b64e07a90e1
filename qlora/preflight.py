"""The one place a RunConfig is checked against its model and machine before any work starts.

RunConfig validates what it can alone (types, ranges, choices). What needs the architecture or the hardware is
checked here, in seconds, without building the model: the model resolves and its config is sane, the sequence fits
its positions, the LoRA targets exist (ALL_LINEAR resolved to the architecture's own names), the rank fits the
narrowest targeted layer, and the device exists. Every command that runs or estimates a model calls `preflight`
first, so a bad value is one line and exit 2 before minutes of building or training, never a traceback after them.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

from qlora import models
from qlora.config import ConfigError, RunConfig, expand_targets


@cache
def decoder_linears(model: str) -> tuple[tuple[str, int], ...]:
    """(name, narrower of in/out features) of every Linear in one block (decoder or encoder layer) of `model`, in
    module order, by leaf name (q_proj; a decoder's experts share theirs). An encoder's leaves repeat with different
    roles (a BERT layer's three `dense`), so there a repeated leaf is named by its path in the block
    (attention.output.dense, intermediate.dense, output.dense): PEFT matches either as a suffix of a module's name.

    Built on the meta device at one layer deep: shapes only, under a second even for 70B."""
    from torch import nn

    hf = models.hf_config(models.resolve(model), layers=1)
    try:
        meta = models.meta_model(hf)
        layer = models.layers_of(meta)[0]
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers rejects the config in its own words
        raise ConfigError(f"model {model!r}: transformers cannot build it: {str(e).splitlines()[0]}") from None
    linears = [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    leaves = [name.rsplit(".", 1)[-1] for name, _ in linears]
    seen: dict[str, int] = {}
    for (name, m), leaf in zip(linears, leaves, strict=True):
        key = name if models.is_encoder(hf) and leaves.count(leaf) > 1 else leaf
        seen[key] = min(seen.get(key, m.in_features), m.in_features, m.out_features)
    return tuple(seen.items())


def check_device(device: str) -> None:
    """The device exists on this machine. Raises ConfigError naming it."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
        raise ConfigError(f"device {device!r} requested but no CUDA device is available here ({build}); "
                          "use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")


def preflight(cfg: RunConfig, *, device: bool = True, classifier: bool = False) -> RunConfig:
    """cfg checked against its model (and, with `device`, this machine), with lora_targets resolved.

    Raises ConfigError naming the bad value. `device=False` for estimates, which describe a device without using it.
    `classifier=True` where a sequence classifier (an encoder) may run: quality runs and the builder; memory runs,
    sweeps and estimates measure language models on text.
    """
    source = models.resolve(cfg.model)
    hf = models.hf_config(source, cfg.layers)
    if models.is_encoder(hf) and not classifier:
        raise ConfigError(f"model {cfg.model!r} is a sequence classifier ({hf.model_type} encoder); memory runs, "
                          "sweeps and estimates measure language models: run it with `qlora-bench quality` on a "
                          "choice task")
    limit = getattr(hf, "max_position_embeddings", None)
    if limit is not None and cfg.seq_len > limit:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's maximum of {limit} positions")
    widths = dict(decoder_linears(cfg.model))
    targets = expand_targets(cfg.lora_targets, list(widths), cfg.model)
    if cfg.adapter:
        narrowest = min(widths[t] for t in targets)
        if cfg.lora_r > narrowest:
            raise ConfigError(f"lora_r {cfg.lora_r} exceeds the narrowest targeted layer's width of {narrowest}")
    if device:
        check_device(cfg.device)
    return replace(cfg, lora_targets=targets)
