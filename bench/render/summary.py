"""The main job's summary.md: every run's categories at its peak with the estimate beside it, the plan's estimates
with their headroom on the cards the folk answers are about, what was skipped, and the quality runs. Reads records
only (the estimates beside the runs are estimate records: bench.modelling.records.derived)."""

from __future__ import annotations

from bench.render import quality
from bench.render.fmt import gb_number
from bench.render.select import Estimates, recipe_text
from bench.schema import CATEGORIES, GB, STATUSES

SUMMARY_GPUS = ("rtx4090", "a100-40gb", "a100-80gb")  # the cards the folk answers are about


def gb_text(n) -> str:
    return "—" if n is None else gb_number(n)


def _shape(c: dict) -> str:
    """Batch x sequence, and for a sharded run or estimate the sharding (its bytes are one rank's)."""
    shard = c.get("shard", "none")
    return f"{c['batch_size']} x {c['seq_len']}" + ("" if shard == "none" else f", {shard} x{c['world_size']} per rank")


def _source(r: dict) -> str:
    if r["source"] == "extrapolated" and r.get("measured_at"):
        depths = " and ".join(str(m["layers"]) for m in r["measured_at"])
        return f"extrapolated from {depths} layers"
    return r["source"]


def markdown(plan_name: str, runs: list[dict], estimates: list[dict], scored: list[dict] | None = None,
             skipped: list[str] = (), derived: list[dict] = ()) -> str:
    """A Markdown summary: every run's categories at its peak, with the estimate beside it (looked up among
    `estimates` and `derived`), then the plan's estimates."""
    beside = Estimates([*estimates, *derived])
    envs = [r["env"] for r in runs if r.get("env")]
    lines = [f"# qlora-bench: `{plan_name}`", ""]
    if envs:
        env = envs[-1]
        pk = env["packages"]
        commits = sorted({(e.get("git_commit") or "unknown")[:10] + (" (dirty)" if e.get("git_dirty") else "")
                          for e in envs})
        lines += [f"Device: {env['device']['name']} ({env['device']['type']}). Stack: torch {pk['torch']}, "
                  f"transformers {pk['transformers']}, peft {pk['peft']}, bitsandbytes {pk['bitsandbytes']}. "
                  f"Commit: {', '.join(commits)}.", ""]
    counts = {s: sum(r["status"] == s for r in runs) for s in STATUSES}
    lines += [f"{len(runs)} runs: {counts['ok']} ok, {counts['oom']} oom, {counts['error']} error. Bytes in GB "
              "(10^9) at each run's peak (live tensors, from the ledger); *measured* at full depth, *extrapolated* to "
              "full depth from two reduced depths, *estimated* by the analytical model with no run.", ""]
    lines += ["## Runs", "",
              "| model | method | recipe | batch x seq | ckpt | source | status | peak | " + " | ".join(CATEGORIES)
              + " | peak in | estimate (Δ) | step s | tokens/s |",
              "|---|---|---|---|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|---|"]
    for r in runs:
        lines.append(_run_row(r, beside))
    if estimates:
        lines += ["", "## Estimates (no run)", "",
                  "Headroom (GB): card total less the estimated peak, 5% allocator reserve and 0.5 GiB CUDA "
                  "context, both assumed (negative: does not fit).", "",
                  "| model | method | recipe | batch x seq | ckpt | peak | " + " | ".join(CATEGORIES) + " | peak in | "
                  + " | ".join(f"{g} headroom" for g in SUMMARY_GPUS) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|" + "---|" * len(SUMMARY_GPUS)]
        for e in estimates:
            c, b = e["config"], e["bytes"]
            room = " | ".join(f"{e['cards'][g]['headroom_bytes'] / GB:+.3f}" for g in SUMMARY_GPUS)
            lines.append(f"| {c['model']} | {c['method']} | {recipe_text(c)} | {_shape(c)} | "
                         f"{'on' if c['grad_checkpointing'] else 'off'}"
                         f" | {gb_text(b['peak'])} | " + " | ".join(gb_text(b[k]) for k in CATEGORIES)
                         + f" | {e['peak_at']['phase']} | {room} |")
    if skipped:
        lines += ["", "## Skipped", "", *(f"- {line}" for line in skipped)]
    if scored:
        body = quality.markdown(scored).split("\n", 1)[1].replace("\n## ", "\n### ")
        lines += ["", "## Quality (same-budget fine-tunes, held-out examples)", body.rstrip()]
    lines.append("")
    return "\n".join(lines)


def _run_row(r: dict, beside: Estimates) -> str:
    c = r["config"]
    head = (f"| {c['model']} | {c['method']} | {recipe_text(c)} | {_shape(c)} | "
            f"{'on' if c['grad_checkpointing'] else 'off'} | ")
    head += f"{_source(r)} | {r['status']} | "
    if r["status"] != "ok":
        reached = f"over {gb_text(r['oom_bytes'])}" if r.get("oom_bytes") else "—"
        budget = f" (budget {gb_text(r['budget_bytes'])})" if r.get("budget_bytes") else ""
        message = (r["error"] or "").replace("|", "/")
        return head + f"{reached}{budget} | " + " | ".join("" for _ in CATEGORIES) + f" | {message} | | | |"
    b = r["bytes"]
    est = beside.beside(r)
    versus = "—" if est is None else f"{gb_text(est)} ({est / b['peak'] - 1:+.1%})"
    step = "—" if r["step_seconds"] is None else f"{r['step_seconds']:.3f}"
    tps = r["tokens_per_second"]
    tps = "—" if tps is None else f"{tps:,.0f}" if tps >= 100 else f"{tps:.2f}"
    return (head + f"{gb_text(b['peak'])} | " + " | ".join(gb_text(b[k]) for k in CATEGORIES)
            + f" | {r['peak_at']['phase']} | {versus} | {step} | {tps} |")
