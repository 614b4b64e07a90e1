"""Estimate against measurement over a matrix of runs: per-category and peak errors, as records and a table.

Run: qlora-bench validate bench/plans/validation.toml --out reports/estimate-validation
Rows already measured in OUT/measured.jsonl (same config) are not measured again, so an interrupted run resumes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from bench.measuring import record
from bench.modelling.deepspeed_ref import zero_model_states
from bench.modelling.estimate import arch_of, estimate_bytes
from bench.modelling.records import estimate_record
from bench.render import validation
from bench.running.plan import load_plan
from bench.schema import CATEGORIES, run_key
from qlora.config import RunConfig

TOLERANCE = 0.05  # peak, relative to the measured peak (issue 4's target)


def compare(measured: dict, estimated: dict) -> dict:
    """Errors of one row: per category in bytes (estimate - measurement), the peak's relative error."""
    m, e = measured["bytes"], estimated["bytes"]
    return {
        "config": measured["config"],
        "source": measured["source"],
        "measured_id": measured["id"],
        "estimated_id": estimated["id"],
        "measured_peak": m["peak"],
        "estimated_peak": e["peak"],
        "peak_error": e["peak"] / m["peak"] - 1,
        "category_error_bytes": {c: e[c] - m[c] for c in CATEGORIES},
        "measured_phase": measured["peak_at"]["phase"],
        "estimated_phase": estimated["peak_at"]["phase"],
        **({"ranks": ranks(measured, estimated)} if measured.get("ranks") else {}),
    }


def ranks(measured: dict, estimated: dict) -> dict:
    """A sharded row, rank by rank: each rank's peak error against the estimate (rank 0's), and the largest
    difference in bytes between a rank's static bytes and the estimate's (zero: exact)."""
    static = estimated["sharding"]["static_per_rank"]
    return {"peak_errors": [estimated["bytes"]["peak"] / x["bytes"]["peak"] - 1 for x in measured["ranks"]],
            "static_error_bytes": max((static[c] - x["static"][c] for x in measured["ranks"] for c in x["static"]),
                                      key=abs)}


def run(plan: str | Path, out: str | Path, measure_fn) -> list[dict]:
    """Measure (skipping rows already in OUT/measured.jsonl) and estimate each row; write the comparison."""
    from bench.measuring.measure import check, measure

    configs = [check(cfg) for cfg in load_plan(plan)]  # every row checked before the first is measured
    out = Path(out)
    measured_file = out / "measured.jsonl"
    done = {run_key(r["config"]): r for r in record.read(measured_file)} if measured_file.exists() else {}
    rows, estimates = [], []
    for cfg in configs:
        m = done.get(run_key(cfg.to_dict()))
        if m is None:
            m = measure(cfg, run=measure_fn)
            record.append(measured_file, m)
        # The estimate is for the depth the measurement stands for: full depth when extrapolated.
        est_cfg = RunConfig.from_dict({**cfg.to_dict(), "layers": None})
        e = estimate_record(est_cfg)
        estimates.append(e)
        if m["status"] == "ok":
            rows.append(compare(m, e))
            if m.get("ranks"):  # DeepSpeed's own estimator beside the measured model states, where it imports
                states = zero_model_states(arch_of(est_cfg), cfg.world_size)
                if states is not None:
                    rows[-1]["deepspeed"] = {**states, "measured_static_bytes": max(
                        sum(x["static"].values()) for x in m["ranks"])}
            if m.get("measured_at"):  # the estimator at each depth measured, apart from the straight line through them
                rows[-1]["depth_errors"] = [
                    {"layers": d["layers"], "peak_error": estimate_bytes(replace(est_cfg, layers=d["layers"]))[
                        "bytes"]["peak"] / d["bytes"]["peak"] - 1} for d in m["measured_at"]]
    write(out, rows, estimates, plan)
    return rows


def write(out: Path, rows: list[dict], estimates: list[dict], plan: str | Path) -> None:
    record.write_atomic(out / "estimated.jsonl", "".join(json.dumps(e) + "\n" for e in estimates))
    record.write_atomic(out / "validation.json", json.dumps({"tolerance": TOLERANCE, "rows": rows}, indent=1) + "\n")
    record.write_atomic(out / "README.md", validation.markdown(rows, TOLERANCE, str(plan), str(out)))
