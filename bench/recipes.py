"""Recipes (bench/recipes.toml): named settings people run. A recipe sets RunConfig fields; explicit flags override
them; a config *is* a recipe when it has every field the recipe sets (for its device), whoever set them.

    get(name)                        the recipe, or ConfigError naming the bad name and the good ones
    configure(name, given, methods)  one config dict per method: the recipe's settings under the given values
    match(config)                    the recipe a config is, or None
    markdown()                       one table of what each recipe sets and why
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from pathlib import Path

import tomllib

from qlora.config import ConfigError, RunConfig

RECIPES_FILE = Path(__file__).with_name("recipes.toml")


@dataclass(frozen=True)
class Recipe:
    name: str
    about: str
    methods: tuple[str, ...]
    settings: dict  # RunConfig field -> value
    on_cpu: dict  # what changes where CUDA is missing
    why: dict  # RunConfig field -> why the recipe sets it

    def settings_for(self, device: str) -> dict:
        return {**self.settings, **({} if device.startswith("cuda") else self.on_cpu)}


@functools.cache
def load(path: Path = RECIPES_FILE) -> dict[str, Recipe]:
    raw = tomllib.loads(path.read_text())
    known = {f.name for f in fields(RunConfig)}
    out = {}
    for name, table in raw.items():
        for part in ("set", "on_cpu", "why"):
            bad = sorted(set(table.get(part, {})) - known)
            if bad:
                raise ConfigError(f"{path}: recipe {name!r} [{part}] names no config field: {', '.join(bad)}")
        out[name] = Recipe(name, table["about"], tuple(table["methods"]), dict(table.get("set", {})),
                           dict(table.get("on_cpu", {})), dict(table.get("why", {})))
    return out


def get(name: str) -> Recipe:
    recipes = load()
    if name not in recipes:
        raise ConfigError(f"unknown recipe {name!r}; recipes: {', '.join(recipes)} (bench/recipes.toml)")
    return recipes[name]


def configure(name: str, given: dict, methods: list[str] | None) -> list[dict]:
    """Config dicts for recipe `name` under the explicitly `given` fields (they win), one per method: `methods`
    (each must be one the recipe is for), or None for the recipe's own."""
    recipe = get(name)
    if methods is None:
        methods = list(recipe.methods)
    wrong = [m for m in methods if m not in recipe.methods]
    if wrong:
        raise ConfigError(f"recipe {name} is for method {', '.join(recipe.methods)}; got method {', '.join(wrong)}")
    device = given.get("device", RunConfig.device)
    return [{**recipe.settings_for(device), **given, "method": m} for m in methods]


def match(config: dict, ignoring: tuple[str, ...] = ()) -> str | None:
    """The recipe whose every setting (for the config's device) the config has, for a method it is for; None if
    none does, or if this version cannot read the config. Configs written before a field existed read as its
    default (RunConfig.from_dict). `ignoring`: fields a variant of a recipe changes on purpose (a recipe with double
    quantisation turned off is still that recipe's variant)."""
    try:
        cfg = RunConfig.from_dict(config).to_dict()
    except ConfigError:  # a config this version cannot read is no recipe of its
        return None
    for recipe in load().values():
        if cfg["method"] in recipe.methods and all(
                cfg[k] == v for k, v in recipe.settings_for(cfg["device"]).items() if k not in ignoring):
            return recipe.name
    return None


def markdown() -> str:
    """What each recipe sets, and why: a table per recipe."""
    out = []
    for r in load().values():
        out += [f"**`{r.name}`** ({', '.join(r.methods)}): {r.about}", "", "| setting | value | why |",
                "|---|---|---|"]
        for k in dict.fromkeys([*r.settings, *r.on_cpu]):
            v = r.settings.get(k)
            shown = "(unset)" if k not in r.settings else f"`{str(v).lower() if isinstance(v, bool) else v}`"
            cpu = f" (on CPU: `{r.on_cpu[k]}`)" if k in r.on_cpu else ""
            out.append(f"| `{k}` | {shown}{cpu} | {r.why.get(k, '')} |")
        out.append("")
    return "\n".join(out)
