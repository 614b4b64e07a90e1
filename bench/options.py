"""The command line's options, declared once: the run options come from `RunConfig`'s fields (name, type, choices,
default), so a new config field is a new option of every command that runs a model; the option groups of the
commands that run a plan (`sweep`, `bench`) and the checks of their values live here too.

RunConfig itself validates every value; a bad one is a one-line error naming it (exit 2).
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import fields
from pathlib import Path

from bench import recipes
from bench.schema import METHODS
from qlora.config import ALL_LINEAR, ConfigError, RunConfig

# What each RunConfig field means on the command line (the config's comments say why the defaults are what they are).
HELP = {
    "method": "full, lora or qlora",
    "quant_type": "4-bit data type of the base (qlora)",
    "compute_dtype": "dtype the 4-bit weights are dequantised to for each matmul (qlora)",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout",
    "lora_targets": f"comma-separated Linear names to adapt ({ALL_LINEAR}: every Linear of the decoder layers, the "
                    "seven projections of a Llama-family block)",
    "optimizer": "optimizer (paged ones need CUDA)",
    "adapter_dtype": "dtype of the LoRA adapters, their gradients and moments: model (the model's) or fp32 (PEFT's "
                     "default)",
    "adamw_impl": "torch AdamW's implementation (default: torch's choice, for-loop on CPU and foreach on CUDA); "
                  "their scratch memory in the optimizer step differs",
    "lr": "learning rate (default: 2e-5 full, 2e-4 lora/qlora)",
    "precision": "bf16 (pure), mixed (bf16 model + fp32 master weights) or fp32",
    "batch_size": "sequences per step",
    "seq_len": "tokens per sequence (default: 512, or the model's maximum if that is shorter)",
    "attention": "attention kernel: sdpa, or eager (materialises seq x seq)",
    "steps": "training steps", "seed": "random seed",
    "device": "cpu, cuda or cuda:N (default: cuda if available, else cpu)",
    "layers": "build only N decoder layers (reduced depth; measure extrapolates from N/2 and N)",
    "shard": "data parallelism across ranks (FSDP2 fully_shard per decoder layer; fsdp-grad-op keeps a layer "
             "gathered from forward to backward; ddp replicates; bytes are per rank)",
    "ckpt_every": "with --grad-checkpointing, checkpoint every Nth decoder layer (2: every other layer; the rest "
                  "keep their activations)",
    "loss_impl": "causal-LM loss: standard (transformers': full-sequence fp32 logits) or chunked (head and loss a "
                 "chunk of tokens at a time, recomputed in backward)",
    "world_size": "ranks, one device each (default: 1; more than 1 means --shard fsdp unless given): estimate per "
                  "rank, or measure under torchrun with one process per rank (gloo on CPU, NCCL on CUDA)",
}
# Other spellings of a field's option: DESIGN.md's `--gpus N` (estimates) and `--nproc N` (measured under torchrun).
ALIASES = {"world_size": ("--gpus", "--nproc")}
# Booleans are flags that flip their default.
FLAGS = {"double_quant": ("--no-double-quant", "store the 4-bit block constants in fp32 instead of 8 bit (qlora)"),
         "grad_checkpointing": ("--grad-checkpointing", "recompute activations in backward"),
         "kbit_prepare": ("--kbit-prepare", "PEFT's prepare_model_for_kbit_training first: every parameter that is "
                          "not 4-bit in fp32 (qlora)"),
         "optimizer_in_backward": ("--optimizer-in-backward", "run each parameter's optimizer step in backward and "
                                   "free its gradient at once"),
         "offload_activations": ("--offload-activations", "move tensors saved for backward to pinned CPU memory "
                                 "(CUDA; estimates on a CPU machine)")}
NO_DEFAULT_SHOWN = ("lr", "seq_len", "device", "layers")  # their help says what None means


class BadInput(ConfigError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2 (no usage dump)."""

    def error(self, message: str):
        raise BadInput(message)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _value_type(hint) -> type:
    """int, float or str for an annotation (`int | None` is int; a Literal of strings is str)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return type(args[0])
    if args and typing.get_origin(hint) is not tuple:
        return _value_type(args[0])
    return hint if hint in (int, float, str) else str


def add_run_options(p: argparse.ArgumentParser, *, method_all: bool) -> None:
    """MODEL and one option per RunConfig field (`lora_r` is --lora-r); every default is the config's own."""
    defaults, hints = RunConfig(), typing.get_type_hints(RunConfig)
    p.add_argument("model", help="bundled name (see `qlora-bench models`), a directory, or a hub id")
    p.add_argument("--recipe", help=f"a named setting ({', '.join(recipes.load())}; bench/recipes.toml); explicit "
                   "options override it")
    for f in fields(RunConfig):
        if f.name == "model":
            continue
        default = getattr(defaults, f.name)
        if f.name in FLAGS:
            flag, text = FLAGS[f.name]
            # None unless given, so a --recipe's setting stands where the flag was not used
            p.add_argument(flag, dest=f.name, action="store_const", const=not default, default=None, help=text)
            continue
        hint = hints[f.name]
        text = HELP[f.name]
        if typing.get_origin(hint) is typing.Literal and f.name != "method":
            text += f": {', '.join(typing.get_args(hint))}"
        if f.name == "method" and method_all:
            text += ", or all"
        if f.name not in NO_DEFAULT_SHOWN:
            shown = ",".join(default) if isinstance(default, tuple) else default
            text += f" (default: {shown})"
        p.add_argument("--" + f.name.replace("_", "-"), *ALIASES.get(f.name, ()), dest=f.name,
                       type=_value_type(hint), default=None, help=text)


def configs_from_args(args, default_device_name: str | None = None, *, device_check: bool = True
                      ) -> list[RunConfig]:
    """The RunConfigs the run options ask for (one per method; `--method all` is every method), checked against
    the model and (device_check) this machine before any work starts (qlora.preflight)."""
    from qlora import models
    from qlora.preflight import preflight

    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name, None) is not None}
    recipe = getattr(args, "recipe", None)
    if recipe is not None:  # a recipe is for some methods: `all`, or no --method, means those
        recipes.get(recipe)
        methods = None if given.get("method") in (None, "all") else [given["method"]]
    else:
        methods = list(METHODS) if given.get("method") == "all" else [given.get("method", RunConfig.method)]
    if "lora_targets" in given:
        given["lora_targets"] = tuple(t.strip() for t in given["lora_targets"].split(",") if t.strip())
    if "seq_len" not in given:  # the default, within what the model can take (tiny-llama has 256 positions)
        limit = getattr(models.hf_config(models.resolve(args.model), given.get("layers")),
                        "max_position_embeddings", None)
        given["seq_len"] = min(RunConfig.seq_len, limit or RunConfig.seq_len)
    given["device"] = given.get("device") or default_device_name or default_device()
    if given.get("world_size", 1) > 1 and "shard" not in given:
        given["shard"] = "fsdp"
    given.pop("method", None)
    if recipe is not None:
        configs = [RunConfig(**d) for d in recipes.configure(recipe, given, methods)]
    else:
        configs = [RunConfig(**given, method=m) for m in methods]
    return [preflight(c, device=device_check) for c in configs]


def check_out_file(path: str | None) -> None:
    """An --out that names a JSONL file: refuse a directory, or a file where a folder must go, before any run."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise BadInput(f"--out {path!r} is a directory; give a file to append records to, e.g. {p / 'results.jsonl'}")
    if any(a.exists() and not a.is_dir() for a in p.parents):
        raise BadInput(f"--out {path!r}: a parent of it is a file, not a directory")


def check_out_dir(path: str | None) -> None:
    """An --out that names a folder: refuse an existing file (or a file among its parents) before any run."""
    if path is None:
        return
    p = Path(path)
    if any(a.exists() and not a.is_dir() for a in (p, *p.parents)):
        raise BadInput(f"--out {path!r} is a file (or lies under one); give a directory")


def add_quiet(p: argparse.ArgumentParser) -> None:
    """--quiet, for every command that can run longer than a few seconds (bench.progress draws its bars)."""
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr (they are drawn only when stderr "
                   "is a terminal anyway)")


def add_sweep_options(p: argparse.ArgumentParser, device: bool = True) -> None:
    """Options of the commands that run a plan's matrix (`sweep`, `bench`, and `ladder`, whose run options have
    their own --device)."""
    add_quiet(p)
    p.add_argument("--budget-gib", type=float, help="treat this many GiB as the device's capacity: beyond it, oom")
    p.add_argument("--timeout-s", type=float, help="time limit in seconds for each run's process (recorded as an "
                   "error, and run again on the next resume)")
    if device:
        p.add_argument("--device", help="device for groups that do not set one (default: cuda if available, else cpu)")
    p.add_argument("--dry-run", action="store_true", help="check the plan and list the runs still to do; run nothing")


def check_sweep_options(args) -> None:
    for name, most in (("budget_gib", 1_048_576), ("timeout_s", 10_000_000)):  # 1 PiB; 115 days
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and 0 < value <= most):
            raise BadInput(f"--{name.replace('_', '-')} must be a number > 0 and at most {most:,}, got {value}")
    check_out_dir(args.out)
