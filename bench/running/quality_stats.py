"""The statistics of a quality comparison, from per-example scores of every (method, seed) and the untrained bases.

- `bootstrap`: relative quality (score / Full FT's), the difference from Full FT, and the **gain share**
  ((method - base) / (Full FT - base): how much of Full FT's gain over the untrained base a method keeps, the figure
  that moves where the base already scores close to Full FT), each with a percentile interval from one paired
  resampling of seeds and held-out examples; and the LoRA - QLoRA gap, paired the same way.
- `collapsed`: the seeds of a method whose run failed (a score below the untrained base, or a training loss that
  diverged), so every summary can flag them and give its verdict with and without them.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_SAMPLES = 4000
LEVEL = 0.95


def quality_score(scores: list[dict], metric: str, seed_w: np.ndarray, ex_w: np.ndarray) -> np.ndarray:
    """Score (accuracy, or exp(-loss)) under resampling weights: seed_w (B, K) counts over seeds, ex_w (B, N) counts
    over examples. scores: one dict per seed, each with per-example lists."""
    if metric == "accuracy":
        c = np.array([s["correct"] for s in scores], dtype=float)  # (K, N)
        return np.einsum("bk,kn,bn->b", seed_w, c, ex_w) / (seed_w.sum(1) * ex_w.sum(1))
    nll = np.array([s["nll"] for s in scores], dtype=float)
    tok = np.array([s["tokens"] for s in scores], dtype=float)
    return np.exp(-np.einsum("bk,kn,bn->b", seed_w, nll, ex_w) / np.einsum("bk,kn,bn->b", seed_w, tok, ex_w))


def _interval(point: float, boot: np.ndarray, scale: float = 1.0, **extra) -> dict:
    lo, hi = (1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100
    finite = boot[np.isfinite(boot)]
    return {"value": float(point * scale), "ci_low": float(np.percentile(finite, lo) * scale),
            "ci_high": float(np.percentile(finite, hi) * scale), "level": LEVEL, **extra}


def bootstrap(method_scores: dict[str, list[dict]], metric: str, reference: str = "full", base: str = "base",
              samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, dict]:
    """Relative quality, difference and (with a `base` entry) gain share for every entry, and `gap` (LoRA minus
    QLoRA, where both are present), with percentile intervals from one paired resampling of seeds and held-out
    examples. Entries with fewer seeds (the bases, evaluated once) resample examples only."""
    rng = np.random.default_rng(seed)
    n = len(method_scores[reference][0]["nll"])
    ex_w = rng.multinomial(n, np.full(n, 1 / n), size=samples).astype(float)
    seed_ws = {k: rng.multinomial(k, np.full(k, 1 / k), size=samples).astype(float)
               for k in sorted({len(v) for v in method_scores.values()})}
    ones = {k: np.ones((1, k)) for k in seed_ws}

    def both(name):
        scores = method_scores[name]
        k = len(scores)
        return quality_score(scores, metric, ones[k], np.ones((1, n)))[0], quality_score(scores, metric, seed_ws[k],
                                                                                           ex_w)
    ref_point, ref = both(reference)
    base_point, base_boot = both(base) if base in method_scores else (None, None)
    scale = 100 if metric == "accuracy" else 1  # accuracy differences in points
    unit = "accuracy points" if metric == "accuracy" else "score (exp(-loss))"
    out = {}
    for name in method_scores:
        point, boot = both(name)
        with np.errstate(divide="ignore", invalid="ignore"):  # a resample where Full FT scores 0: left out
            relative = boot / ref
        out[name] = {"score": float(point), "relative": _interval(point / ref_point, relative),
                     "difference": _interval(point - ref_point, boot - ref, scale, unit=unit)}
        if base_boot is not None and name != base and ref_point != base_point:
            with np.errstate(divide="ignore", invalid="ignore"):
                share = (boot - base_boot) / (ref - base_boot)
            out[name]["gain_share"] = _interval((point - base_point) / (ref_point - base_point), share)
    if "lora" in method_scores and "qlora" in method_scores and len(method_scores["lora"]) == len(
            method_scores["qlora"]):
        (lp, lb), (qp, qb) = both("lora"), both("qlora")
        out["gap"] = _interval(lp - qp, lb - qb, scale, unit=unit, what="LoRA minus QLoRA")
    return out


DIVERGED_RISE = 1.10  # the last quarter's mean loss this far above the first quarter's: the loss went up, not down


def diverged(losses: list[float]) -> bool:
    """A training loss that is not finite, or whose last quarter of steps averages more than 10% above its first
    quarter (one step's loss is one batch's, too noisy to compare alone)."""
    if not losses or any(not math.isfinite(x) for x in losses):
        return True
    q = max(1, len(losses) // 4)
    return sum(losses[-q:]) / q > DIVERGED_RISE * sum(losses[:q]) / q


def collapsed(runs: list[dict], base: dict | None, metric: str, summary_of) -> list[dict]:
    """The runs (one per seed) that failed: a held-out score below the untrained base's (accuracy, or for text
    tasks a perplexity above it), or a diverged training loss. `base` and `summary_of(run)` are summaries
    (qlora.scoring.summarise); returns [{seed, why}]."""
    out = []
    for r in runs:
        why, s = [], summary_of(r)
        if base is not None:
            if metric == "accuracy" and s["accuracy"] < base["accuracy"]:
                why.append(f"accuracy {s['accuracy']:.4f}, below the untrained base's {base['accuracy']:.4f}")
            elif metric != "accuracy" and s["loss"] > base["loss"]:
                why.append(f"perplexity {s['perplexity']:.3f}, above the untrained base's {base['perplexity']:.3f}")
        if diverged(r.get("train_losses") or []):
            why.append("its training loss diverged")
        if why:
            out.append({"seed": r["config"]["seed"], "why": "; ".join(why)})
    return out
