"""Plans: TOML files of run matrices. Each [[group]] maps RunConfig fields to lists; every combination is a run.

    [[group]]
    model = ["llama-2-7b"]
    method = ["full", "lora", "qlora"]
    seq_len = [512, 2048]
    oom_fallback_layers = 2     # optional: a full-depth run that is oom is measured again at 2 layers, extrapolated
    recipe = ["seed", "peft-qlora"]  # optional: named settings (bench/recipes.toml), crossed with the methods
                                     # each is for; the group's other keys override a recipe's settings

    [[estimate]]                # optional: analytical estimates the report sets beside the runs (no run)
    model = ["llama-2-7b"]
    method = ["full", "lora", "qlora"]
    seq_len = [512]

    [[quality]]                 # optional: same-budget fine-tunes scored on held-out data (`qlora-bench quality`)
    model = "smollm2-135m-instruct"
    task = "sentiment"
    setting = "quick"
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import tomllib

from bench import recipes
from qlora.config import ConfigError, RunConfig

PLANS_DIR = Path(__file__).resolve().parents[1] / "plans"  # the committed plans: bench/plans/
TABLES = ("group", "estimate", "quality")
# The keys of a [[quality]] table, the options of `qlora-bench quality` (`methods` is its --method).
SPEC_KEYS = ("model", "methods", "task", "data", "eval_data", "setting", "steps", "seeds", "eval_examples",
             "batch_size", "seq_len", "lr", "lr_grid", "precision", "lora_r", "seed")
FALLBACK_KEY = "oom_fallback_layers"


@dataclass(frozen=True)
class PlannedRun:
    config: RunConfig
    fallback_layers: int | None = None  # measure again at this depth (extrapolated) when full depth is oom


@dataclass(frozen=True)
class Plan:
    path: Path
    runs: list[PlannedRun]
    estimates: list[RunConfig]
    quality: list[dict]  # `qlora-bench quality` options, checked for names here and in full when run

    @property
    def configs(self) -> list[RunConfig]:
        return [r.config for r in self.runs]


def _matrix(path: Path, table: str, i: int, group: dict, device: str) -> list[RunConfig]:
    where = f"{path}: {table} {i + 1}"
    if "model" not in group:  # an empty table would silently be one run of the defaults (the tiny test model)
        raise ConfigError(f"{where} has no 'model' key" + (" (the table is empty)" if not group else ""))
    keys = sorted(group)
    for k in keys:
        if not isinstance(group[k], list) or not group[k]:
            raise ConfigError(f"{where} key {k!r} must be a non-empty list")
    configs = []
    for values in itertools.product(*(group[k] for k in keys)):
        setting = {"device": device, **dict(zip(keys, values, strict=True))}
        recipe = setting.pop("recipe", None)
        try:
            if recipe is None:
                configs.append(RunConfig.from_dict(setting))
                continue
            method = setting.pop("method", None)
            if method is not None and method not in recipes.get(recipe).methods:
                continue  # a recipe is for some methods: the matrix crosses only those
            configs += [RunConfig.from_dict(d)
                        for d in recipes.configure(recipe, setting, None if method is None else [method])]
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if not configs:
        raise ConfigError(f"{where}: no run: none of its methods is one its recipes are for")
    return configs


def read_plan(path: str | Path, device: str = "cpu") -> Plan:
    """A plan file's runs (`device` unless a group sets one) and estimates. Raises ConfigError naming the file and
    the bad key or value."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = sorted(set(raw) - set(TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; a plan holds [[group]] "
                          "and [[estimate]] tables")
    for table in TABLES:
        if table in raw and not (isinstance(raw[table], list) and all(isinstance(g, dict) for g in raw[table])):
            raise ConfigError(f"{path}: {table!r} must be an array of tables ([[{table}]])")
    if not raw.get("group"):
        raise ConfigError(f"{path}: no [[group]] tables")
    runs = []
    for i, group in enumerate(raw["group"]):
        group = dict(group)
        fallback = group.pop(FALLBACK_KEY, None)
        if fallback is not None and (type(fallback) is not int or fallback < 2):
            raise ConfigError(f"{path}: group {i + 1} key {FALLBACK_KEY!r} must be an integer >= 2 (two depths "
                              f"are fitted), got {fallback!r}")
        for cfg in _matrix(path, "group", i, group, device):
            if fallback is not None and cfg.layers is not None:
                raise ConfigError(f"{path}: group {i + 1} sets both 'layers' and {FALLBACK_KEY!r}; the fallback "
                                  "applies to full-depth runs")
            runs.append(PlannedRun(cfg, fallback))
    estimates = [c for i, g in enumerate(raw.get("estimate", [])) for c in _matrix(path, "estimate", i, g, device)]
    for i, spec in enumerate(raw.get("quality", [])):
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown or "model" not in spec:
            what = f"unknown key(s) {', '.join(unknown)}" if unknown else "no 'model'"
            raise ConfigError(f"{path}: quality {i + 1}: {what}; keys: {', '.join(SPEC_KEYS)}")
    return Plan(path, runs, estimates, list(raw.get("quality", [])))


def load_plan(path: str | Path, device: str = "cpu") -> list[RunConfig]:
    """The RunConfigs of a plan file's [[group]] tables (see read_plan)."""
    return read_plan(path, device).configs
