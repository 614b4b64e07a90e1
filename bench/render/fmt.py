"""The one formatter of the reports: every figure claims.md, claims.json, the report README, summary.md and the
runs tables print goes through these, from the record's own bytes (rounded once, here), so one fact reads the same
on every page: GB (10^9 bytes, as the folk numbers are written) with three decimals.

Verdicts on "~X" claims follow one rule (`verdict`): within HOLDS of the claim it holds; from there to BORDER it
is borderline (said with its sign, so a reader sees which way it leans); up to FAR off by that much; beyond,
refuted. A figure cannot flip from "holds" to "off" on a fraction of a point: the borderline band lies between.
"""

from __future__ import annotations

from bench.schema import GB

HOLDS, BORDER, FAR = 0.075, 0.125, 0.50
CLASSES = ("holds", "borderline", "off", "refuted")


def gb_number(n: float | None) -> str:
    """Bytes as GB with three decimals (MB resolution), the precision of every report; "" for none."""
    return "" if n is None else f"{n / GB:.3f}"


def gb(n: float | None) -> str:
    return "n/a" if n is None else f"{gb_number(n)} GB"


def mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.0f} MB"


def pct(err: float) -> str:
    return f"{err:+.1%}"


def amount(n: float, unit: str) -> str:
    """A claim's figure in the claim's own unit: GB, MB, x (a ratio)."""
    return {"GB": gb, "MB": mb}[unit](n) if unit in ("GB", "MB") else f"{n:.2f}x"


def classify(claimed: float, ours: float) -> tuple[str, float]:
    """(class, relative error) of `ours` against a "~claimed" claim: one of CLASSES."""
    err = ours / claimed - 1
    a = abs(err)
    cls = "holds" if a <= HOLDS else "borderline" if a <= BORDER else "off" if a <= FAR else "refuted"
    return cls, err


def verdict(claimed: float, ours: float) -> tuple[str, float]:
    """A "~claimed" claim's verdict text and relative error."""
    cls, err = classify(claimed, ours)
    text = {"holds": "holds", "borderline": "borderline", "off": "off by", "refuted": "refuted"}[cls]
    return (f"{text} {pct(err)}" if cls == "off" else f"{text} ({pct(err)})"), err


RULE = (f"*holds* within ±{HOLDS:.1%} of the claim; *borderline* from there to ±{BORDER:.1%} (signed, so the "
        f"lean shows); *off by X%* up to ±{FAR:.0%}; *refuted* beyond (or a yes/no claim that is false)")
