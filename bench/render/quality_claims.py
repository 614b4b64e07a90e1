"""The quality claims ("LoRA keeps ~97% of Full FT's quality", "QLoRA ~95%", "QLoRA is only ~2 points below
LoRA"), judged from the quality records' intervals, never from a point estimate.

Rule: a claim of "~c" holds when the whole 95% interval lies within c ± TOLERANCE (2 points of relative quality);
*better* or *worse than claimed* when the interval lies wholly beyond that band; otherwise *inconclusive at this
scale*, with the interval's half-width and about how many seeds the same design would need to narrow it to the
band (the interval narrows as one over the square root of the seeds). A single-seed run gets no verdict: its
interval resamples examples only, not training. Seeds whose run failed (below the untrained base, or a diverged
loss) are named, and the verdict is given again without them. Relative quality is what the claims are about; the
gain share (how much of Full FT's gain over the untrained base a method keeps) is shown beside it.
"""

from __future__ import annotations

import math

from bench.render.quality import edge
from bench.render.select import quality_sets

FOLK_QUALITY = {"lora": 0.97, "qlora": 0.95}  # the share of Full FT's quality each method is said to keep
TOLERANCE = 0.02  # relative quality: 2 points of Full FT's score
GAP_POINTS = 2.0  # "QLoRA is only ~2 points below LoRA"


def seeds_to_separate(half_width: float, n_seeds: int, target: float) -> int | None:
    """Seeds the same design would need for an interval of half-width `target`, from the observed one."""
    if half_width <= 0 or n_seeds < 1 or target <= 0:
        return None
    return max(n_seeds, math.ceil(n_seeds * (half_width / target) ** 2))


def judge(low: float, high: float, claimed: float, tolerance: float, n_seeds: int, unit: str = "") -> str:
    if n_seeds < 2:
        return "no verdict: one seed (its interval resamples held-out examples, not training)"
    if claimed - tolerance <= low and high <= claimed + tolerance:
        return "holds (the interval lies within the claim's band)"
    if low > claimed + tolerance:
        return "better than claimed (the interval lies above the band)"
    if high < claimed - tolerance:
        return "worse than claimed (the interval lies below the band)"
    hw = (high - low) / 2
    need = seeds_to_separate(hw, n_seeds, tolerance)
    more = f"; about {need} seeds would narrow it to ±{tolerance:g}{unit}" if need and need > n_seeds else ""
    return f"inconclusive at this scale (±{hw:.3g}{unit} with {n_seeds} seeds{more})"


def interval_text(x: dict | None, digits: int = 3) -> str:
    return "n/a" if not x else f"{x['value']:.{digits}f} [{x['ci_low']:.{digits}f}, {x['ci_high']:.{digits}f}]"


def failed_text(q: dict) -> str:
    own = [f"seed {f['seed']} {f['why']}" for f in q.get("collapsed") or []]
    elsewhere = q.get("collapsed_elsewhere") or []
    parts = own + ([f"seed(s) {', '.join(map(str, elsewhere))} of another method failed"] if elsewhere else [])
    return "; ".join(parts)


def setting(r: dict) -> str:
    q, c = r["quality"], r["config"]
    search = q.get("lr_search")
    chosen = ""
    if search:
        at = edge(search)
        chosen = (f", chosen on {search['validation_examples']} validation examples from "
                  f"{', '.join(f'{x:g}' for x in search['grid'])}" + (f", the grid's {at}" if at else ""))
    return (f"{c['model']}; task {q['task']} ({q['metric']}); {q['train']['steps']} steps x {q['train']['batch_size']};"
            f" {q['eval_examples']} held-out; seeds {q['seeds']}; {c['precision']}; LoRA r={c['lora_r']}; lr "
            f"{q['train']['lr']:g}{chosen} (measured)")


def judged_sets(records: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """Per (model, task), the largest evaluation (held-out examples x seeds) with a Full FT record."""
    by_task: dict[tuple[str, str], dict[str, dict]] = {}
    for (model, task, _, _), rs in quality_sets(records).items():
        if not any(r["config"]["method"] == "full" for r in rs):
            continue
        q = rs[0]["quality"]
        size = q["eval_examples"] * len(q["seeds"])
        best = by_task.get((model, task))
        if best is None or size > best["full"]["quality"]["eval_examples"] * len(best["full"]["quality"]["seeds"]):
            by_task[(model, task)] = {r["config"]["method"]: r for r in rs}
    return by_task


def weights_note(q: dict) -> str | None:
    """What the model's weights are: the Q4_1 caveat, or a genuine-precision classifier's head."""
    if q.get("caveat"):
        return "twice quantised: " + q["caveat"]
    if q.get("head"):
        return "genuine fp32 weights, so NF4 is a first quantisation; " + q["head"]
    return None


def rows(records: list[dict]) -> list[dict]:
    out = []
    for (model, task), rs in judged_sets(records).items():
        for method, claimed in FOLK_QUALITY.items():
            r = rs.get(method)
            if r is None or not r["quality"].get("relative"):
                continue
            q, rel = r["quality"], r["quality"]["relative"]
            n = len(q["seeds"])
            verdict = judge(rel["ci_low"], rel["ci_high"], claimed, TOLERANCE, n) + without_failed(
                q, "relative", lambda w, k, c=claimed: judge(w["ci_low"], w["ci_high"], c, TOLERANCE, k))
            out.append({"id": f"quality-{method}-{task}-{model}", "where": f"{model}, {task}",
                        "claim": f"{method} keeps ~{claimed:.0%} of Full FT's quality",
                        "setting": setting(r), "claimed": f"{claimed:.2f}",
                        "ours": f"relative {interval_text(rel)}; gain share {interval_text(q.get('gain_share'))}",
                        "error": round(rel["value"] / claimed - 1, 4), "source": "measured",
                        "records": [r["id"], rs["full"]["id"]], "verdict": verdict,
                        "also": also_text(q),
                        "true_when": "judged on relative quality (score over Full FT's) on this task, model and budget "
                                     "only; the gain share is the share of Full FT's gain over the untrained base"})
        qlora = rs.get("qlora")
        gap = (qlora or {}).get("quality", {}).get("gap_to_lora")
        if gap and gap.get("unit") == "accuracy points":
            q = qlora["quality"]
            # a collapsed seed of either method moves the paired gap too: it is given again without them
            verdict = gap_verdict(gap, len(q["seeds"])) + without_failed(q, "gap_to_lora", gap_verdict, 1, " points")
            out.append({"id": f"quality-qlora-gap-{task}-{model}", "where": f"{model}, {task}",
                        "claim": "QLoRA is only ~2 points below LoRA",
                        "setting": setting(qlora), "claimed": "2 points",
                        "ours": f"{interval_text(gap, 1)} points (LoRA minus QLoRA, paired)", "error": None,
                        "source": "measured", "records": [rs["lora"]["id"], qlora["id"]], "verdict": verdict,
                        "also": also_text(q),
                        "true_when": "a bound: an interval wholly at or below 2 points supports it"})
    return out


def without_failed(q: dict, key: str, verdict_of, digits: int = 3, unit: str = "") -> str:
    """"; without the failed seed(s) (k seeds): INTERVAL, VERDICT" for q's figure `key` recomputed without the failed
    seeds of any method, or "" when no seed failed."""
    without = q.get("without_collapsed") or {}
    if not failed_text(q) or not without.get(key):
        return ""
    w, k = without[key], len(without["seeds"])
    return f"; without the failed seed(s) ({k} seeds): {interval_text(w, digits)}{unit}, {verdict_of(w, k)}"


def also_text(q: dict) -> str | None:
    """What a quality claim's reader must also know: failed runs, what the weights are, the task's note."""
    failed = failed_text(q)
    return "; ".join(x for x in (("failed runs: " + failed) if failed else "", weights_note(q), q.get("task_note"))
                     if x) or None


def gap_verdict(gap: dict, n: int) -> str:
    """The verdict on "QLoRA is only ~2 points below LoRA" from the paired gap's interval over n seeds."""
    if n < 2:
        return "no verdict: one seed (its interval resamples held-out examples, not training)"
    if gap["ci_high"] <= GAP_POINTS:
        return "holds (the interval lies at or below 2 points)"
    if gap["ci_low"] > GAP_POINTS:
        return "refuted (the interval lies above 2 points)"
    hw = (gap["ci_high"] - gap["ci_low"]) / 2
    need = seeds_to_separate(hw, n, GAP_POINTS / 2)
    more = f"; about {need} seeds would narrow it to ±1 point" if need and need > n else ""
    return f"inconclusive at this scale (±{hw:.2g} points with {n} seeds{more})"


def nf4_cost_lines(records: list[dict]) -> list[str]:
    """The table of what NF4 costs each model before training (the `nf4_cost` records), or nothing."""
    costs = [r for r in records if r.get("nf4_cost")]
    if not costs:
        return []
    lines = ["## NF4 before training", "",
             "What NF4 (double quantisation, bf16 compute: QLoRA's base) costs each model's own weights before any "
             "training, against the checkpoint in fp32, measured the same way on every model; bf16 rounding (LoRA's "
             "base) beside it for scale. *Values per block*: the median number of distinct values among 32 "
             "consecutive weights of the quantised layers: 32 for weights never quantised, at most 16 for weights "
             "on a 4-bit grid (GGUF Q4_1's blocks are 32).", "",
             "| model | quantised layers | values per block | weight error NF4 (bf16) | last hidden state error NF4 "
             "(bf16) | next-token loss fp32 → NF4 | prompts | record |", "|---|---|---|---|---|---|---|---|"]
    for r in costs:
        c = r["nf4_cost"]
        w, h = c["weight_error"], c["hidden_error"]
        loss = (f"{c['loss']['fp32']:.3f} → {c['loss']['nf4']:.3f} nats (+{c['loss']['nf4_increase']:.3f})"
                if "loss" in c else "n/a (an encoder: no language-model head)")
        lines.append(f"| {r['config']['model']} | {c['quantised_layers']} ({c['quantised_parameters']:,} weights) | "
                     f"{c['grid_levels']:g} of {c['grid_block']} | {w['nf4']:.2%} ({w['bf16']:.2%}) | "
                     f"{h['nf4']:.2%} ({h['bf16']:.2%}) | {loss} | {c['examples']} held-out {c['task']} "
                     f"({c['tokens']:,} tokens) | {r['id']} |")
    return lines + ["", "Errors are relative Frobenius norms, ||x - x_fp32|| / ||x_fp32||, over all quantised layers "
                    "(weights) or every real token (hidden states). Measured on CPU (`qlora-bench nf4-cost`).", ""]
