"""The estimator's figures as result records (source: estimated), so that reports read estimates like any other
record and never call the estimator themselves.

- `estimate_record(cfg)`: one configuration, with its fit on the cards reports show (`cards`). Every command that
  estimates (`estimate`, plans' [[estimate]] tables, `validate`) builds its records here.
- `derived(records)`: the estimates a report sets beside a set of records and does not find among them: each run at
  full depth, the peak-against-sequence curves and the longest sequence that fits each card (for the first
  estimate's setting), and each adapter estimate's longest sequence on an RTX 4090. The claims' variants (ranks,
  targets, lengths) are a claims plan's [[estimate]] tables, not derived here. Earlier derived records with the same
  figures are kept as they are (same id), so a report regenerated from the same records is identical.
"""

from __future__ import annotations

from dataclasses import replace

from bench.measuring import record
from bench.modelling import gpus
from bench.modelling.estimate import adamw_impl, arch_of, estimate_bytes, largest_fitting
from bench.schema import METHODS, fit_base, run_key
from qlora.config import ConfigError, RunConfig

CARDS = ("t4", "rtx4090", "a100-40gb", "a100-80gb", "h200")  # the cards reports and the claims show
CURVE_SEQ_LENS = (128, 256, 512, 1024, 2048, 4096)
NO_LIMIT = 131072  # longest sequence searched where a model states no maximum


def estimate_record(cfg: RunConfig, *, cards: tuple[str, ...] = CARDS, **extra) -> dict:
    """cfg's estimated bytes by category at its peak, where the peak falls, each candidate moment's peak, and its
    fit on `cards`. The environment is the machine that computed it; the device it is for is the config's."""
    arch = arch_of(cfg)
    est = estimate_bytes(cfg, arch)
    peak = est["bytes"]["peak"]
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    # which AdamW the estimate assumes: the config's, or what torch picks by default on that device
    impl = adamw_impl(cfg, device_type) if cfg.optimizer == "adamw" else "bitsandbytes"
    return record.make(cfg.to_dict(), source="estimated", status="ok", bytes_=est["bytes"],
                       env=record.environment("cpu"), layers=arch.layers, peak_at={"phase": est["phase"]},
                       moments=est["moments"], backward_start=est["backward_start"],
                       cards={g: gpus.on_card(gpus.CATALOG[g], peak) for g in cards}, optimizer_impl=impl,
                       **({"sharding": est["sharding"]} if "sharding" in est else {}), **extra)


def fit_on(gpu: gpus.GPU, cfg: RunConfig, peak_bytes: int, *, limits: bool = False,
           side_by_side: bool = False) -> dict:
    """Fit of one estimated run on `gpu`: needed bytes, headroom, and optionally the largest sequence length and
    batch that fit (`limits`) and how many runs fit side by side (`side_by_side`)."""
    arch = arch_of(cfg)
    out = {"gpu": gpu.name, "total_bytes": gpu.total_bytes, "needed_bytes": gpus.needed(peak_bytes),
           "headroom_bytes": gpus.headroom(gpu, peak_bytes)}
    out["fits"] = out["headroom_bytes"] >= 0
    if side_by_side:
        out["trials"] = gpus.trials(gpu, peak_bytes)
    if limits:
        def fits(peak):
            return gpus.headroom(gpu, peak) >= 0

        out["max_seq_len"] = largest_fitting(cfg, arch, "seq_len", fits, arch.max_positions or NO_LIMIT)
        out["max_batch_size"] = largest_fitting(cfg, arch, "batch_size", fits, 4096)
    return out


def longest_fitting(cfg: RunConfig, card: str) -> dict:
    """The longest sequence of cfg's setting that fits `card` (None: not even one token), as an estimate record of
    that sequence length with a `fit` field naming the card."""
    arch = arch_of(cfg)
    g = gpus.CATALOG[card]
    limit = arch.max_positions or NO_LIMIT
    best = largest_fitting(cfg, arch, "seq_len", lambda peak: gpus.headroom(g, peak) >= 0, limit)
    # base_seq_len: the setting searched from, which names the fit (its config holds the length found)
    fit = {"gpu": card, "varied": "seq_len", "largest": best, "upper": limit, "base_seq_len": cfg.seq_len}
    return estimate_record(replace(cfg, seq_len=best or 1), cards=(card,), fit=fit, purpose="fit")


# ---- what a report needs beside its records -----------------------------------------------------------------------


def _full_depth(config: dict) -> RunConfig:
    return RunConfig.from_dict({**config, "layers": None})


def wanted(records: list[dict]) -> list[tuple[str, RunConfig, str | None]]:
    """(purpose, config, card) of every estimate a report of `records` sets beside them; card for fits only."""
    out = []
    for r in records:  # each run, at the depth its figures stand for
        if r["source"] != "estimated" and r["status"] == "ok" and r.get("bytes"):
            out.append(("beside a run", _full_depth(r["config"]), None))
    estimates = [r for r in records if r["source"] == "estimated" and not r.get("fit") and not r.get("purpose")]
    if estimates:  # the curves and the fit matrix, for the first estimate's setting
        template = _full_depth({**estimates[0]["config"], "grad_checkpointing": False})
        for method in METHODS:
            for ckpt in (False, True):
                cfg = replace(template, method=method, grad_checkpointing=ckpt)
                out += [("curve", replace(cfg, seq_len=s), None) for s in CURVE_SEQ_LENS]
                out += [("fit", cfg, card) for card in CARDS]
    for r in estimates:  # the longest sequence of each adapter setting on a 24 GB card (the card claims quote it)
        cfg = _full_depth(r["config"])
        if cfg.method in ("lora", "qlora"):
            out.append(("fit", cfg, "rtx4090"))
    return out


def _key(config: dict, card: str | None) -> str:
    return run_key(config, fit=card)


def derived(records: list[dict], previous: list[dict] = (), log=lambda line: None) -> list[dict]:
    """The estimates `wanted` for `records` that they do not hold, each once: an earlier derived record with the same
    figures (from `previous`) is reused as it is; configurations the estimator cannot take are left out."""
    # An estimate record written before `backward_start` existed is made again beside it (Estimates prefers the
    # newer one), so every claim can read the moment it is about.
    have = {_key(r["config"], None) for r in records
            if r["source"] == "estimated" and not r.get("fit") and "backward_start" in r}
    have |= {_key(fit_base(r), r["fit"]["gpu"]) for r in records if r.get("fit")}
    old = {}
    for r in previous:
        old.setdefault(_key(fit_base(r), (r.get("fit") or {}).get("gpu")), r)
    out, seen = [], set()
    for purpose, cfg, card in wanted(records):
        k = _key(cfg.to_dict(), card)
        if k in have or k in seen:
            continue
        seen.add(k)
        try:
            new = longest_fitting(cfg, card) if card else estimate_record(cfg, purpose=purpose)
        except (ConfigError, ValueError, KeyError) as e:  # a model the estimator cannot read: no estimate beside it
            log(f"no estimate for {cfg.model} {cfg.method}: {e}")
            continue
        before = old.get(k)
        out.append(before if before is not None and _same(before, new) else new)
    return out


def reuse(previous: list[dict], new: list[dict]) -> list[dict]:
    """`new` estimates, each replaced by its earlier record (same setting, same figures) where `previous` holds one:
    estimating again after an unrelated change renumbers nothing a report cites."""
    old = {run_key(r["config"]): r for r in previous if r.get("source") == "estimated"}
    return [old[k] if (k := run_key(e["config"])) in old and _same(old[k], e) else e for e in new]


def _same(a: dict, b: dict) -> bool:
    """The same estimate: the same setting (configs compared with defaults filled in, so a record written before a
    config field existed still matches) and the same figures."""
    fields = ("bytes", "peak_at", "cards", "fit", "purpose", "backward_start", "sharding", "moments", "optimizer_impl",
              "ladder")
    return run_key(a["config"]) == run_key(b["config"]) and all(a.get(f) == b.get(f) for f in fields)
