"""`qlora-bench ladder MODEL --method M [run options] --out DIR`: the memory-savers ladder (bench/ladder.py) of one
model, method and shape, measured rung by rung, with the estimates beside each rung.

    DIR/results.jsonl     one record per measured rung (measured, or extrapolated with --layers), each in its own
                          process through the sweep machinery: resumable, an out-of-memory rung is a result
    DIR/estimates.jsonl   each rung estimated at full depth on this device (to check the estimator against the
                          measurement) and on CUDA (the figure a GPU user plans with); a CUDA-only rung on a CPU
                          machine (activation offloading) has only its CUDA estimate
    DIR/report/           ladder.md (the table), the stacked chart per ladder, README.md

`--confirm` also measures the last measured rung at full depth (with --layers, the rest are extrapolated): the
figure a target is judged on. `--estimates-only` measures nothing and rewrites the estimates and the report.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from bench import ladder
from bench.measuring import record
from bench.measuring.measure import check
from bench.modelling.records import estimate_record, reuse
from bench.render import report
from bench.running import sweep
from bench.running.plan import PlannedRun
from bench.schema import run_key
from qlora.config import ConfigError, RunConfig


def planned(base: RunConfig, confirm: bool) -> tuple[list[tuple[ladder.Saver, RunConfig]], list[PlannedRun], dict]:
    """The ladder's rungs (checked), the runs to measure on base's device, and each run's `ladder` tag by key."""
    rungs = [(s, check(c) if c.device == base.device else c) for s, c in ladder.rungs(base)]
    here = [(s, c) for s, c in rungs if c.device == base.device]
    tags = {run_key(c.to_dict()): ladder.tag(c, s) for s, c in here}
    runs = [PlannedRun(c) for _, c in here]
    if confirm:
        if base.layers is None:
            raise ConfigError("--confirm measures the last rung again at full depth; the ladder is already measured "
                              "at full depth (no --layers)")
        saver, last = here[-1]
        full = replace(last, layers=None)
        tags[run_key(full.to_dict())] = {**ladder.tag(full, saver), "depth": "full"}
        runs.append(PlannedRun(full))
    return rungs, runs, tags


def estimates(rungs: list[tuple[ladder.Saver, RunConfig]], device: str) -> list[dict]:
    """Each rung at full depth, estimated on `device` (where it can run there) and on CUDA."""
    out = []
    for saver, cfg in rungs:
        full = replace(cfg, layers=None)
        for where in [full.device] + ([] if full.device.startswith("cuda") else ["cuda"]):
            c = replace(full, device=where)
            out.append(estimate_record(c, ladder=ladder.tag(c, saver)))
    return out


def run(base: RunConfig, out: Path, *, budget_gib: float | None = None, timeout_s: float | None = None,
        confirm: bool = False, estimates_only: bool = False, dry_run: bool = False, log=print) -> list[dict]:
    """Measure (unless estimates_only) and estimate every rung of base's ladder into OUT, then its report. Returns
    the measured rungs' records as they stand (what the exit status is judged on)."""
    rungs, runs, tags = planned(base, confirm)
    name = f"ladder {ladder.name(base)}"
    results = out / "results.jsonl"
    if estimates_only and not results.is_file():
        raise ConfigError(f"--estimates-only: {results} holds no rungs to report beside the estimates")
    made = []
    if not estimates_only:
        made = sweep.run(name, out, device=base.device, budget_gib=budget_gib, timeout_s=timeout_s,
                         dry_run=dry_run, log=log, runs=runs,
                         tag=lambda cfg: {"ladder": tags[run_key(cfg.to_dict())]})
    if dry_run:
        return []
    file = out / "estimates.jsonl"
    earlier = record.read(file) if file.is_file() else []
    fresh = reuse(earlier, estimates(rungs, base.device))
    record.write_atomic(file, "".join(json.dumps(e, allow_nan=False) + "\n" for e in fresh))
    report.build(report.load([str(out)]), out / "report", [str(out)])
    log(f"report: {out / 'report' / 'ladder.md'}")
    return made
