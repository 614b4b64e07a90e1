"""`qlora-bench bench`: the main job. Pick the plan from the hardware, sweep it, estimate what it asks to have
estimated, and write a summary beside the results.

    no GPU  -> bench/plans/cpu-quick.toml   (about 15 minutes on 2 cores)
    CUDA    -> bench/plans/gpu-7b.toml      (about 30 minutes on an A100)

Output goes to results/PLAN/DEVICE/ by default, an untracked folder (results.jsonl, estimates.jsonl, summary.md,
quality/, and report/ with the tables, charts and claims of `qlora-bench report`); the committed references under
reports/bench/ are regenerated only with an explicit `--out`. Running again resumes: runs already recorded for the
same config and stack (libraries, device, git commit) are not measured again, runs that ended in error are
(`--fresh` sets the old results aside); a later commit measures again.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.measuring import record
from bench.modelling.records import estimate_record, reuse
from bench.render import summary
from bench.running import quality, quality_plan, reporting, sweep
from bench.running.plan import PLANS_DIR, read_plan
from bench.schema import device_name, run_key, slug
from qlora.config import ConfigError, RunConfig


def default_plan(device: str) -> Path:
    return PLANS_DIR / ("gpu-7b.toml" if device.startswith("cuda") else "cpu-quick.toml")


def resolve_plan(spec: str) -> Path:
    """A plan file path, or the name of a committed plan (`gpu-7b`). Raises ConfigError naming the bad value."""
    path = Path(spec)
    if path.is_file():
        return path
    named = PLANS_DIR / f"{spec}.toml"
    if "/" not in spec and named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in PLANS_DIR.glob("*.toml")))
    raise ConfigError(f"plan {spec!r} is neither a file nor a committed plan ({known})")


def default_out(plan: Path, device: str) -> Path:
    from bench.measuring.probes import device_info

    name = device_info(device)["name"] or device
    # An untracked folder (.gitignore): a user's run never replaces the committed reference results under
    # reports/bench/, which are regenerated only by an explicit --out.
    return Path("results") / plan.stem / slug(name)


def latest(records: list[dict]) -> list[dict]:
    """The last record of each run (config, device, budget), in the order runs first appeared: a run measured again
    at a later commit replaces its earlier record in the summary."""
    by_key = {}
    for r in records:
        by_key[run_key(r["config"], device=device_name(r), budget=r.get("budget_bytes"))] = r
    return list(by_key.values())


def run(plan_path: Path, out: Path, *, device: str, budget_gib: float | None = None, timeout_s: float | None = None,
        fresh: bool = False, dry_run: bool = False, estimates_only: bool = False, log=print) -> tuple[str, list[dict]]:
    """Sweep the plan into OUT/results.jsonl, write OUT/estimates.jsonl and OUT/summary.md; return the summary and
    the plan's run records as they stand (what the exit status is judged on). With `dry_run`, check everything and
    say what would run, and write nothing; with `estimates_only`, run nothing (no sweep, no quality runs) and write
    the rest from the runs OUT holds."""
    from qlora.assets import AssetError
    from qlora.preflight import preflight

    if fresh and estimates_only:
        raise ConfigError("--fresh measures every run again; --estimates-only measures none: choose one")
    plan = read_plan(plan_path, device)
    # Bad input fails here, before the first run: the runs, the estimates and the quality options.
    sweep.checked_runs(plan_path, device)
    for c in plan.estimates:
        preflight(c, device=False)
    qualities, skipped = [], []
    for spec in [] if estimates_only else plan.quality:
        try:
            qualities.append(quality_plan.prepare(spec, device))
        except AssetError as e:  # no network and no cached wheel (a lent GPU): measure what can be, say what not
            skipped.append(f"quality {spec.get('task') or spec.get('data') or 'sentiment'} on {spec['model']}: "
                           f"skipped, {e}")
            log(skipped[-1])
    log(f"plan {plan_path} on {device}; results in {out}/")
    if dry_run:
        sweep.run(plan_path, out, device=device, budget_gib=budget_gib, dry_run=True, log=log)
        log(f"would estimate {len(plan.estimates)} configuration(s) and run {len(qualities)} quality run(s)")
        return "", []
    results = out / "results.jsonl"
    if fresh and results.exists():
        kept = results.with_name(f"results-{record.now().replace(':', '')}.jsonl")
        results.rename(kept)
        log(f"--fresh: earlier results moved to {kept}")
    if estimates_only:
        if not results.exists():
            raise ConfigError(f"--estimates-only: {results} holds no runs to report beside the estimates")
        runs = []
    else:
        runs = sweep.run(plan_path, out, device=device, budget_gib=budget_gib, timeout_s=timeout_s, log=log)
    earlier = record.read(out / "estimates.jsonl") if (out / "estimates.jsonl").is_file() else []
    estimates = reuse(earlier, [estimate_record(RunConfig.from_dict({**c.to_dict(), "layers": None}))
                                for c in plan.estimates])
    record.write_atomic(out / "estimates.jsonl", "".join(json.dumps(e, allow_nan=False) + "\n" for e in estimates))
    scored = []
    if estimates_only and (out / "quality" / "results.jsonl").is_file():  # the quality results it holds, as they are
        scored = record.read(out / "quality" / "results.jsonl")
    for q in qualities:
        log(f"quality: {q.task.name}, {len(q.configs)} methods x {q.seeds} seed(s), "
            f"{q.eval_examples} held-out examples")
        scored += quality.run(q.configs, q.task, q.eval_examples, q.seeds, out / "quality", log=log,
                              lr_grid=q.lr_grid)
    if scored and not estimates_only:
        quality.save(out / "quality", scored)
    _, derived, _ = reporting.make(out, log=log)
    log(f"report (tables, charts, claims): {out / 'report'}/")
    text = summary.markdown(plan_path.name, latest(record.read(results)), estimates, scored, skipped, derived)
    record.write_atomic(out / "summary.md", text)
    return text, runs
