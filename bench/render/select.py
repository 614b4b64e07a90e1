"""Which records a table, chart or verdict reads: lookups over a list of result records, nothing computed anew."""

from __future__ import annotations

from bench import recipes
from bench.schema import METHODS, device_name, fit_base, run_key


class Estimates:
    """The estimate records among `records`, found by the setting they stand for (schema.run_key of the config)."""

    def __init__(self, records: list[dict]):
        self.by_key: dict[str, dict] = {}
        self.fits: dict[tuple, int | None] = {}
        for r in records:
            if r["source"] != "estimated" or r["status"] != "ok":
                continue
            fit = r.get("fit")
            if fit:  # by the whole setting searched from (recipe fields included), and the card
                self.fits[(run_key(fit_base(r)), fit["gpu"])] = fit["largest"]
            else:  # the first of a setting, unless a later one holds `backward_start` and it does not (older)
                key = run_key(r["config"])
                if key not in self.by_key or ("backward_start" in r and "backward_start" not in self.by_key[key]):
                    self.by_key[key] = r

    def of(self, config: dict, **changes) -> dict | None:
        """The estimate record of `config` with `changes` applied (None when there is none)."""
        try:
            return self.by_key.get(run_key({**config, **changes}))
        except ValueError:  # a config this version cannot read names no estimate
            return None

    def peak(self, config: dict, **changes) -> int | None:
        r = self.of(config, **changes)
        return None if r is None else r["bytes"]["peak"]

    def beside(self, r: dict) -> int | None:
        """The estimated peak of a run's config at the depth its figures stand for (full depth)."""
        return self.peak(r["config"], layers=None)

    def longest(self, config: dict, card: str, **changes) -> int | None:
        """The longest sequence of config's setting that fits `card`, from a fit record (None: not even one token,
        or no such record: see `has_fit`)."""
        return self.fits.get(self._fit_key(config, card, changes))

    def has_fit(self, config: dict, card: str, **changes) -> bool:
        return self._fit_key(config, card, changes) in self.fits

    @staticmethod
    def _fit_key(config: dict, card: str, changes: dict) -> tuple:
        try:
            return run_key({**config, **changes}), card
        except ValueError:  # a config this version cannot read has no fit
            return "", card


def template(records: list[dict]) -> dict | None:
    """The setting the curves and the fit matrix are drawn for: the first estimate's (not a derived fit)."""
    return next((r["config"] for r in records if r["source"] == "estimated" and not r.get("fit")
                 and not r.get("purpose") and r["config"].get("shard", "none") == "none"), None)


def runs(records: list[dict]) -> list[dict]:
    """Measured and extrapolated memory runs that finished (quality runs and NF4-cost records aside)."""
    return [r for r in records if r["source"] != "estimated" and r["status"] == "ok" and not r.get("quality")
            and not r.get("nf4_cost")]


def method_groups(records: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """Runs that differ only in method, two methods or more: one group per model and device (the first group, in
    input order, with the most methods)."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in runs(records):
        c = r["config"]
        key = (c["model"], c["batch_size"], c["seq_len"], c["grad_checkpointing"], c["precision"], device_name(r),
               c.get("shard", "none"), c.get("world_size", 1))  # a rank's bytes are not a single device's
        out.setdefault(key, {})[c["method"]] = r
    found = [(k, [v[m] for m in METHODS if m in v]) for k, v in out.items() if len(v) >= 2]
    best: dict[tuple, tuple] = {}
    for k, rs in found:
        place = (k[0], k[5])
        if place not in best or len(rs) > len(best[place][1]):
            best[place] = (k, rs)
    return list(best.values())


def quality_sets(records: list[dict]) -> dict[tuple, list[dict]]:
    """Quality records with a relative figure, by (model, task, held-out set, seeds): one panel, one judgement
    each (two models on one task's held-out set are two sets: each method's record is relative to its own Full FT)."""
    out: dict[tuple, list[dict]] = {}
    for r in records:
        q = r.get("quality")
        if q and q.get("relative"):
            out.setdefault((r["config"]["model"], q["task"], q["heldout_digest"], len(q["seeds"])), []).append(r)
    return out


def recipe_name(config: dict) -> str:
    """The recipe a config is (bench/recipes.toml), or "custom"."""
    return recipes.match(config) or "custom"


def recipe_text(config: dict) -> str:
    """recipe_name, with a chosen AdamW implementation."""
    impl = config.get("adamw_impl", "default")
    return recipe_name(config) if impl == "default" else f"{recipe_name(config)}, {impl} AdamW"
