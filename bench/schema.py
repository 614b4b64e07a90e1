"""The result record's vocabulary, defined once (DESIGN.md, "Result record"): every module that writes, reads,
resumes or renders records takes these names from here, so a category, method or unit is never spelled twice.

    SCHEMA          the record format's version (a reader refuses newer ones)
    CATEGORIES      the memory categories, in bytes, which sum to `peak` at the peak (STATIC: those a model and
                    optimizer hold between steps)
    METHODS         full, lora, qlora: the engine's own choice list (qlora.config.Method), not a copy
    SOURCES         measured | extrapolated | estimated: the three kinds of number
    STATUSES        ok | oom | error
    DEVICE_FIGURES  the device's own figures, beside the categories and never mixed into them
    MiB, GiB, GB    display units: 2^20, 2^30 (the tables) and 10^9 bytes (the folk claims are written in GB)
    run_key         a run's identity for resuming and matching, everywhere
    label           a run's short name in logs and tables
    device_name     the device a record ran on
    fit_base        the setting an estimate (or a fit record) stands for
"""

from __future__ import annotations

import json
import re
from typing import get_args

from qlora.config import Method, RunConfig

SCHEMA = 1
CATEGORIES = ("weights", "quant_state", "adapter", "gradients", "optimizer", "activations", "other")
STATIC = CATEGORIES[:5]  # held between steps: what a model and its optimizer are, before any batch
METHODS: tuple[str, ...] = get_args(Method)
SOURCES = ("measured", "extrapolated", "estimated")
STATUSES = ("ok", "oom", "error")
DEVICE_FIGURES = ("cuda_max_allocated", "cuda_max_reserved", "nvml_used", "rss_anon_peak")
# What every consumer indexes directly; the other contract fields are read with defaults.
REQUIRED = ("schema", "id", "source", "config", "status")

MiB, GiB, GB = 2**20, 2**30, 10**9


def run_key(config: dict, **context) -> str:
    """A run's identity: its config with every default filled in (so a record written before a field existed still
    matches), plus what else the caller resumes under (`stack=`, `budget=`, `task=`...). One string, comparable."""
    return json.dumps({"config": RunConfig.from_dict(config).to_dict(), **context}, sort_keys=True)


def label(config: dict) -> str:
    """A run's short name: `llama-2-7b qlora 1x512 ckpt at 2 layers [peft-qlora]`: checkpointing (`ckpt/2`: every
    other layer) and the memory savers on, the recipe its config is (if any) in brackets, a chosen AdamW
    implementation, and a sharding (`fsdp x2`: per rank, batch per rank)."""
    from bench.recipes import match

    recipe = match(config)
    every = config.get("ckpt_every", 1)
    ckpt = (" ckpt" + (f"/{every}" if every != 1 else "")) if config.get("grad_checkpointing") else ""
    on = (("loss_impl", "chunked-loss"), ("optimizer_in_backward", "opt-in-bwd"), ("offload_activations", "offload"))
    savers = "".join(f" {name}" for key, name in on if config.get(key) not in (None, False, "standard"))
    depth = f" at {config['layers']} layers" if config.get("layers") is not None else ""
    impl = f" {config['adamw_impl']} adamw" if config.get("adamw_impl", "default") != "default" else ""
    tag = f" [{recipe}]" if recipe else ""
    shard = f" {config['shard']} x{config.get('world_size', 1)}" if config.get("shard", "none") != "none" else ""
    return (f"{config['model']} {config['method']} {config['batch_size']}x{config['seq_len']}{ckpt}{savers}{depth}"
            f"{impl}{shard}{tag}")


def device_name(r: dict) -> str:
    """The device a record is about: the one a run ran on, from its environment; for an estimate, the device it
    estimates for (its config's: `cuda`), whatever machine computed it; a run without an environment, its config's."""
    ran_on = None if r["source"] == "estimated" else ((r.get("env") or {}).get("device") or {}).get("name")
    return ran_on or r["config"].get("device", "")


def fit_base(r: dict) -> dict:
    """The setting an estimate stands for: its config, or for a fit record the config it was searched from."""
    return {**r["config"], "seq_len": r["fit"]["base_seq_len"]} if r.get("fit") else r["config"]


def slug(text: str) -> str:
    """A file- and folder-safe name: `NVIDIA A100 80GB` -> `nvidia-a100-80gb`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"
