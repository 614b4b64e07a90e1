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
from bench.measuring.ledger import CATEGORIES
from bench.running import quality, sweep
from bench.running.plan import PLANS_DIR, Plan, read_plan
from qlora.config import ConfigError, RunConfig

GiB = 2**30
SUMMARY_GPUS = ("rtx4090", "a100-40gb", "a100-80gb")  # the cards the folk answers are about


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
    from bench.render.report import slug

    name = device_info(device)["name"] or device
    # An untracked folder (.gitignore): a user's run never replaces the committed reference results under
    # reports/bench/, which are regenerated only by an explicit --out.
    return Path("results") / plan.stem / slug(name)


def estimate_for(cfg: RunConfig) -> dict:
    """The analytical estimate of cfg at full depth, with its fit on the summary's cards."""
    from bench.modelling import gpus
    from bench.modelling.estimate import estimate_bytes
    from bench.render.report import arch_of

    full = RunConfig.from_dict({**cfg.to_dict(), "layers": None})
    arch = arch_of(full)
    est = estimate_bytes(full, arch)
    fit = {g: gpus.headroom(gpus.CATALOG[g], est["bytes"]["peak"]) for g in SUMMARY_GPUS}
    return record.make(full.to_dict(), source="estimated", status="ok", bytes_=est["bytes"],
                       peak_at={"phase": est["phase"]}, layers=arch.layers, headroom_bytes=fit)


def latest(records: list[dict]) -> list[dict]:
    """The last record of each run (config, device, budget), in the order runs first appeared: a run measured again
    at a later commit replaces its earlier record in the summary."""
    from bench.running.plan import key

    by_key = {}
    for r in records:
        by_key[(key(r["config"]), r["env"]["device"]["name"], r.get("budget_bytes"))] = r
    return list(by_key.values())


def run(plan_path: Path, out: Path, *, device: str, budget_gib: float | None = None, timeout_s: float | None = None,
        fresh: bool = False, dry_run: bool = False, log=print) -> tuple[str, list[dict]]:
    """Sweep the plan into OUT/results.jsonl, write OUT/estimates.jsonl and OUT/summary.md; return the summary and
    the plan's run records as they stand (what the exit status is judged on). With `dry_run`, check everything and
    say what would run, and write nothing."""
    from qlora.assets import AssetError
    from qlora.preflight import preflight

    plan = read_plan(plan_path, device)
    # Bad input fails here, before the first run: the runs, the estimates and the quality options.
    sweep.checked_runs(plan_path, device)
    for c in plan.estimates:
        preflight(c, device=False)
    qualities, skipped = [], []
    for spec in plan.quality:
        try:
            qualities.append(quality.prepare(spec, device))
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
    runs = sweep.run(plan_path, out, device=device, budget_gib=budget_gib, timeout_s=timeout_s, log=log)
    estimates = [estimate_for(c) for c in plan.estimates]
    record.write_atomic(out / "estimates.jsonl", "".join(json.dumps(e, allow_nan=False) + "\n" for e in estimates))
    scored = []
    for q in qualities:
        log(f"quality: {q.task.name}, {len(q.configs)} methods x {q.seeds} seed(s), "
            f"{q.eval_examples} held-out examples")
        scored += quality.run(q.configs, q.task, q.eval_examples, q.seeds, out / "quality", log=log)
    if scored:
        quality.save(out / "quality", scored)
    text = summary(plan, latest(record.read(results)), estimates, scored, skipped)
    record.write_atomic(out / "summary.md", text)
    from bench.render import report

    report.build(report.load([out]), out / "report", [str(out)])
    log(f"report (tables, charts, claims): {out / 'report'}/")
    return text, runs


def _gib(n) -> str:
    return "—" if n is None else f"{n / GiB:.3f}"


def _shape(c: dict) -> str:
    return f"{c['batch_size']} x {c['seq_len']}"


def _source(r: dict) -> str:
    if r["source"] == "extrapolated" and r.get("measured_at"):
        depths = " and ".join(str(m["layers"]) for m in r["measured_at"])
        return f"extrapolated from {depths} layers"
    return r["source"]


def summary(plan: Plan, runs: list[dict], estimates: list[dict], scored: list[dict] | None = None,
            skipped: list[str] = ()) -> str:
    """A Markdown summary: every run's categories at its peak, with the estimate beside it, then the estimates."""
    envs = [r["env"] for r in runs if r.get("env")]
    lines = [f"# qlora-bench: `{plan.path.name}`", ""]
    if envs:
        env = envs[-1]
        pk = env["packages"]
        commits = sorted({(e.get("git_commit") or "unknown")[:10] + (" (dirty)" if e.get("git_dirty") else "")
                          for e in envs})
        lines += [f"Device: {env['device']['name']} ({env['device']['type']}). Stack: torch {pk['torch']}, "
                  f"transformers {pk['transformers']}, peft {pk['peft']}, bitsandbytes {pk['bitsandbytes']}. "
                  f"Commit: {', '.join(commits)}.", ""]
    counts = {s: sum(r["status"] == s for r in runs) for s in record.STATUSES}
    lines += [f"{len(runs)} runs: {counts['ok']} ok, {counts['oom']} oom, {counts['error']} error. Bytes in GiB "
              "at each run's peak (live tensors, from the ledger); *measured* at full depth, *extrapolated* to full "
              "depth from two reduced depths, *estimated* by the analytical model with no run.", ""]
    lines += ["## Runs", "",
              "| model | method | batch x seq | ckpt | source | status | peak | " + " | ".join(CATEGORIES)
              + " | peak in | estimate (Δ) | step s | tokens/s |",
              "|---|---|---|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|---|"]
    for r in runs:
        lines.append(_run_row(r))
    if estimates:
        lines += ["", "## Estimates (no run)", "",
                  "Headroom: card total less the estimated peak, 5% allocator reserve and 0.5 GiB CUDA context "
                  "(negative: does not fit).", "",
                  "| model | method | batch x seq | ckpt | peak | " + " | ".join(CATEGORIES) + " | peak in | "
                  + " | ".join(f"{g} headroom" for g in SUMMARY_GPUS) + " |",
                  "|---|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|" + "---|" * len(SUMMARY_GPUS)]
        for e in estimates:
            c, b = e["config"], e["bytes"]
            room = " | ".join(f"{e['headroom_bytes'][g] / GiB:+.2f}" for g in SUMMARY_GPUS)
            lines.append(f"| {c['model']} | {c['method']} | {_shape(c)} | {'on' if c['grad_checkpointing'] else 'off'}"
                         f" | {_gib(b['peak'])} | " + " | ".join(_gib(b[k]) for k in CATEGORIES)
                         + f" | {e['peak_at']['phase']} | {room} |")
    if skipped:
        lines += ["", "## Skipped", "", *(f"- {line}" for line in skipped)]
    if scored:
        body = quality.markdown(scored).split("\n", 1)[1].replace("\n## ", "\n### ")
        lines += ["", "## Quality (same-budget fine-tunes, held-out examples)", body.rstrip()]
    lines.append("")
    return "\n".join(lines)


def _run_row(r: dict) -> str:
    c = r["config"]
    head = f"| {c['model']} | {c['method']} | {_shape(c)} | {'on' if c['grad_checkpointing'] else 'off'} | "
    head += f"{_source(r)} | {r['status']} | "
    if r["status"] != "ok":
        reached = f"over {_gib(r['oom_bytes'])}" if r.get("oom_bytes") else "—"
        budget = f" (budget {_gib(r['budget_bytes'])})" if r.get("budget_bytes") else ""
        message = (r["error"] or "").replace("|", "/")
        return head + f"{reached}{budget} | " + " | ".join("" for _ in CATEGORIES) + f" | {message} | | | |"
    b = r["bytes"]
    try:
        est = estimate_for(RunConfig.from_dict(c))["bytes"]["peak"]
        versus = f"{_gib(est)} ({est / b['peak'] - 1:+.1%})"
    except (ConfigError, ValueError):
        versus = "—"
    step = "—" if r["step_seconds"] is None else f"{r['step_seconds']:.3f}"
    tps = r["tokens_per_second"]
    tps = "—" if tps is None else f"{tps:,.0f}" if tps >= 100 else f"{tps:.2f}"
    return (head + f"{_gib(b['peak'])} | " + " | ".join(_gib(b[k]) for k in CATEGORIES)
            + f" | {r['peak_at']['phase']} | {versus} | {step} | {tps} |")
