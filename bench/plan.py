"""Plans: TOML files of run matrices. Each [[group]] maps RunConfig fields to lists; every combination is a run.

    [[group]]
    model = ["llama-2-7b"]
    method = ["lora", "qlora"]
    seq_len = [512, 2048]
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import tomllib

from qlora.config import ConfigError, RunConfig


def load_plan(path: str | Path, device: str = "cpu") -> list[RunConfig]:
    """The RunConfigs of a plan file (`device` unless a group sets one). Raises ConfigError naming the file and
    the bad key or value."""
    path = Path(path)
    try:
        plan = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = sorted(set(plan) - {"group"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; a plan holds [[group]] tables")
    groups = plan.get("group")
    if not groups:
        raise ConfigError(f"{path}: no [[group]] tables")
    configs = []
    for i, group in enumerate(groups):
        keys = sorted(group)
        for k in keys:
            if not isinstance(group[k], list) or not group[k]:
                raise ConfigError(f"{path}: group {i + 1} key {k!r} must be a non-empty list")
        for values in itertools.product(*(group[k] for k in keys)):
            try:
                configs.append(RunConfig.from_dict({"device": device, **dict(zip(keys, values, strict=True))}))
            except ConfigError as e:
                raise ConfigError(f"{path}: group {i + 1}: {e}") from None
    return configs


def key(config: dict) -> str:
    """Identity of a run: the full config, defaults filled in, so records from before a new field still match."""
    return json.dumps(RunConfig.from_dict(config).to_dict(), sort_keys=True)
