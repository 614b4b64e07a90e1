"""`qlora-bench compare BASELINE NEW`: match result records by config and report memory and time deltas.

Prints Markdown (fit for a CI job summary). A run regresses when its peak or any category grows by more than
`memory_threshold` of its baseline value (and by more than `floor_bytes`, so a few KiB on an empty category is not
a regression), when its step time grows by more than `time_threshold`, or when it no longer finishes (ok -> oom or
error). A baseline run that NEW lacks is a problem too: an empty or wrong file must not pass a CI gate by having
nothing to compare; runs only in NEW are listed, not judged. Step time is compared only between records from the
same device; for an extrapolated record, at the deeper of the two depths it measured. The CLI exits 3 when anything
regressed or is missing, 2 when either file is unreadable, is not result records, or holds none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.measuring import record
from bench.schema import CATEGORIES, GiB, MiB, device_name, label, run_key
from qlora.config import ConfigError


@dataclass
class Row:
    config: dict
    old: dict | None
    new: dict | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def missing(self) -> bool:
        return self.old is not None and self.new is None


def load(path: str | Path) -> dict[str, dict]:
    """Records of a JSONL file by config (the last record of a config wins), without the estimates derived for its
    runs (`purpose`, `fit`: the callback and `derive` write them beside the runs, under the same config). Raises
    ConfigError naming FILE:LINE when the file is unreadable or holds anything but result records, and when it
    holds none at all."""
    out = {}
    for n, r in record.read_numbered(path):
        if r.get("purpose") or r.get("fit"):
            continue
        try:
            out[run_key(r["config"])] = r
        except (ValueError, TypeError, AttributeError) as e:  # RunConfig's checks, and values of the wrong type
            raise ConfigError(f"{path}:{n}: config is not a run configuration ({e})") from None
    if not out:
        raise ConfigError(f"no result records in {path}")
    return out


def compare(baseline: dict[str, dict], new: dict[str, dict], *, memory_threshold: float = 0.02,
            time_threshold: float = 0.15, floor_bytes: int = MiB) -> list[Row]:
    rows = []
    for k in list(baseline) + [k for k in new if k not in baseline]:
        old, cur = baseline.get(k), new.get(k)
        row = Row((old or cur)["config"], old, cur)
        rows.append(row)
        if row.missing:
            row.problems.append("missing from new")
            continue
        if old is None or old["status"] != "ok":
            continue
        if cur["status"] != "ok":
            error = f": {cur['error']}" if cur.get("error") else ""
            row.problems.append(f"was ok, now {cur['status']}{error}")
            continue
        for c in (*CATEGORIES, "peak"):
            # A category one side did not record (an older harness, a run cut short) has nothing to compare.
            a, b = (old.get("bytes") or {}).get(c), (cur.get("bytes") or {}).get(c)
            if a is None or b is None:
                continue
            if b - a > max(memory_threshold * a, floor_bytes):
                row.problems.append(f"{c} +{(b - a) / MiB:,.1f} MiB ({(b - a) / a:+.1%})" if a else
                                    f"{c} +{(b - a) / MiB:,.1f} MiB (was 0)")
        if device_name(old) != device_name(cur):
            row.notes.append(f"step time not compared: {device_name(old)} vs {device_name(cur)}")
            continue
        (ta, where), (tb, _) = timed(old), timed(cur)
        if ta and tb and tb > ta * (1 + time_threshold):
            row.problems.append(f"step time{where} {tb / ta - 1:+.0%}")
    return rows


def timed(r: dict) -> tuple[float | None, str]:
    """The step time to compare, and where it was taken. An extrapolated record's full-depth time is a slope
    through two noisy timings; the deeper of its measured depths is a timing in its own right, so that is used."""
    if r["source"] == "extrapolated" and r.get("measured_at"):
        deepest = r["measured_at"][-1]
        return deepest.get("step_seconds"), f" (at {deepest['layers']} layers)"
    return r.get("step_seconds"), ""


def peak_of(r: dict) -> int | None:
    return (r.get("bytes") or {}).get("peak") if r["status"] == "ok" else None


def markdown(rows: list[Row], baseline: str, new: str) -> str:
    bad = [r for r in rows if r.problems]
    missing = [label(r.config) for r in rows if r.missing]
    only_new = sum(r.old is None for r in rows)
    lines = [f"## qlora-bench compare: {len(bad)} of {len(rows) - only_new} runs regressed or missing", "",
             f"Baseline `{baseline}`, new `{new}`."
             + (f" {only_new} run(s) only in new: listed, not compared." if only_new else ""), ""]
    if missing:
        lines += [f"**Missing from new** ({len(missing)}): " + "; ".join(missing) + ".", ""]
    lines += ["| run | peak GiB (baseline → new) | Δ peak | step s (baseline → new) | verdict |",
              "|---|---|---|---|---|"]
    for r in rows:
        if r.old is None or r.new is None:
            where = "new only" if r.old is None else "**missing from new**"
            lines.append(f"| {label(r.config)} | | | | {where} |")
            continue
        peaks = [peak_of(x) for x in (r.old, r.new)]
        peak = " → ".join("—" if p is None else f"{p / GiB:.3f}" for p in peaks)
        delta = f"{peaks[1] / peaks[0] - 1:+.2%}" if None not in peaks and peaks[0] else ""
        (ta, where), (tb, _) = timed(r.old), timed(r.new)
        times = " → ".join("—" if t is None else f"{t:.3f}" for t in (ta, tb)) + where
        verdict = "**regressed**: " + "; ".join(r.problems) if r.problems else "ok"
        if r.notes:
            verdict += " (" + "; ".join(r.notes) + ")"
        lines.append(f"| {label(r.config)} | {peak} | {delta} | {times} | {verdict} |")
    return "\n".join(lines) + "\n"
