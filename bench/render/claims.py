"""The folk claims, one verdict each, from result records only: the memory and card claims about a 7B model as a
claim x recipe matrix (bench.render.matrix, bench.render.cards: each cell the figure measured first, the CUDA
estimate beside it), and the quality claims against the 95% intervals of the quality records.

Claims are written in GB (10^9 bytes); so are our values here (the runs tables use GiB). One rule for "~" claims
(bench.render.fmt.RULE). Every figure quoted is a field of a record the row cites, among the report's inputs.
"""

from __future__ import annotations

from bench.render import cards, fmt, matrix
from bench.render.select import quality_sets

FOLK_QUALITY = {"lora": 0.97, "qlora": 0.95}  # the share of Full FT's quality each method is said to keep
COLUMN_TITLES = {"seed": "seed (pure bf16)", "mixed": "mixed (fp32 masters)", "peft": "peft-lora / peft-qlora"}


def gpu_measured(records: list[dict]) -> bool:
    """Whether any record was measured on a CUDA device."""
    return any(r.get("source") != "estimated" and ((r.get("env") or {}).get("device") or {}).get("type") == "cuda"
               for r in records)


def banner(records: list[dict]) -> str:
    """What a reader must know before any figure, where no GPU record exists ("" where one does)."""
    if gpu_measured(records):
        return ""
    return ("> **No figure in this report was measured on a GPU.** *Measured* and *extrapolated* figures are tensor "
            "bytes measured on a CPU (the same bytes a GPU allocates for the same tensors, except where a CUDA kernel "
            "allocates differently, listed cell by cell); every CUDA figure is an *estimate*, and the CUDA context "
            "and allocator reserve it adds on a card are assumptions, not measurements.")


def quality_claims(records: list[dict]) -> list[dict]:
    rows = []
    # Per task, the largest evaluation (held-out examples x seeds) is the one judged.
    by_task: dict[str, dict[str, dict]] = {}
    for (task, _, _), rs in quality_sets(records).items():
        q = rs[0]["quality"]
        size = q["eval_examples"] * len(q["seeds"])
        best = by_task.get(task)
        if best is None or size > best["full"]["quality"]["eval_examples"] * len(best["full"]["quality"]["seeds"]):
            if any(r["config"]["method"] == "full" for r in rs):
                by_task[task] = {r["config"]["method"]: r for r in rs}
    for task, rs in by_task.items():
        for method, claimed in FOLK_QUALITY.items():
            r = rs.get(method)
            if r is None:
                continue
            q = r["quality"]
            rel = q["relative"]
            inside = rel["ci_low"] <= claimed <= rel["ci_high"]
            err = rel["value"] / claimed - 1
            if inside:
                v = "holds (inside the 95% interval)"
            else:
                v = f"{'better' if rel['value'] > claimed else 'worse'} than claimed: {err:+.1%} (outside the interval)"
            rows.append({"id": f"quality-{method}-{task}",
                         "claim": f"{method} keeps ~{claimed:.0%} of Full FT's quality",
                         "setting": quality_setting(r), "claimed": f"{claimed:.2f}",
                         "ours": f"{rel['value']:.3f} [{rel['ci_low']:.3f}, {rel['ci_high']:.3f}]",
                         "error": round(err, 4), "source": "measured", "records": [r["id"], rs["full"]["id"]],
                         "also": q.get("caveat"), "verdict": v,
                         "true_when": "judged on this task, model and budget only; a small model on a short budget "
                                      "is not a 7B model on a long one"})
        if "lora" in rs and "qlora" in rs and rs["lora"]["quality"]["metric"] == "accuracy":
            gap = (rs["lora"]["quality"]["value"] - rs["qlora"]["quality"]["value"]) * 100
            # "Only ~2 points below" is a bound: a smaller gap (or none) supports it.
            err = gap / 2 - 1
            v = (f"holds ({gap:.1f} points, at most ~2)" if gap <= 2 * (1 + fmt.HOLDS)
                 else f"off by {err:+.0%} (QLoRA is {gap:.1f} points below LoRA)")
            rows.append({"id": f"quality-qlora-gap-{task}", "claim": "QLoRA is only ~2 points below LoRA",
                         "setting": quality_setting(rs["qlora"]), "claimed": "2 points",
                         "ours": f"{gap:+.1f} points (LoRA minus QLoRA, point estimate)",
                         "error": None if err is None else round(err, 4), "source": "measured",
                         "records": [rs["lora"]["id"], rs["qlora"]["id"]], "also": rs["qlora"]["quality"].get("caveat"),
                         "verdict": v, "true_when": "the intervals of both against Full FT are in the quality rows"})
    return rows


def quality_setting(r: dict) -> str:
    q, c = r["quality"], r["config"]
    return (f"{c['model']}; task {q['task']} ({q['metric']}); {q['train']['steps']} steps x {q['train']['batch_size']};"
            f" {q['eval_examples']} held-out; seeds {q['seeds']}; {c['precision']}; LoRA r={c['lora_r']}; lr full "
            f"2e-5, adapters {q['train']['lr']:g} (measured)")


def evaluate(records: list[dict]) -> list[dict]:
    return matrix.memory_rows(records) + cards.card_rows(matrix.Pool(records)) + quality_claims(records)


def cell_text(c: dict) -> str:
    if not c.get("class"):
        return "no record"
    text = f"{c['ours']}: **{c['verdict']}**" if "ours" in c and len(c["ours"]) < 24 else f"**{c['verdict']}**"
    if c.get("estimate_class") and c["estimate_class"] != c["class"]:
        text += f" (CUDA estimate {c['estimate']}: {c['estimate_verdict']})"
    return text


def markdown(rows: list[dict], records: list[dict] = ()) -> str:
    matrix_rows = [r for r in rows if "cells" in r]
    lines = ["# Claims verdicts", ""]
    if banner(records):
        lines += [banner(records), ""]
    lines += ["Generated by `qlora-bench report` from result records. GB = 10^9 bytes, as the claims are written. "
              f"Verdicts: {fmt.RULE}; quality claims against the 95% bootstrap interval. Each memory cell is "
              "judged on the run of its setting where one exists (*measured* at full depth or *extrapolated* from "
              "reduced depths, on the device named), else on the CUDA *estimate*, and names which.", ""]
    if matrix_rows:
        lines += ["## Llama-2-7B at batch 1 x 512 tokens, by recipe", "",
                  "Recipes: [bench/recipes.toml](../../bench/recipes.toml) (the README's \"Recipes\" table says what "
                  "each sets and why). Full FT cells list CUDA's default AdamW (foreach) and fused.", "",
                  "| claim | claimed | " + " | ".join(COLUMN_TITLES.values()) + " | verdict |",
                  "|---|---|" + "---|" * len(COLUMN_TITLES) + "---|"]
        for r in matrix_rows:
            cols = []
            for col in COLUMN_TITLES:
                cs = [c for c in r["cells"] if c["column"] == col]
                cols.append("<br>".join((f"{c['recipe'].split(' (')[1].rstrip(')')}: " if " (" in c["recipe"] else "")
                                        + cell_text(c) for c in cs) or "not applicable")
            lines.append(f"| {r['claim']} | {r['claimed']} | " + " | ".join(cols) + f" | **{r['verdict']}** |")
        lines += ["", "## Each cell, with its records", ""]
        for r in matrix_rows:
            lines += [f"### {r['claim']} (`{r['id']}`, {r['moment']})", "",
                      "| recipe | ours | source | CUDA estimate | estimate minus ours | verdict | records |",
                      "|---|---|---|---|---|---|---|"]
            for c in r["cells"]:
                if not c.get("class"):
                    lines.append(f"| {c['recipe']} | no record | | | | | |")
                    continue
                est = (f"{c['estimate']}: {c['estimate_verdict']}; {c['estimate_source']}" if "estimate" in c
                       else "")
                extra = f"; run: {c['run_peak']}" if c.get("run_peak") else ""
                lines.append(f"| {c['recipe']} | {c['ours']}{extra} | {c['source']} | {est} | "
                             f"{c.get('difference', '')} | {c['verdict']} | {', '.join(c['records'])} |")
            lines += ["", f"Notes: {r['true_when'].rstrip('.')}.", ""]
    quality_rows = [r for r in rows if "cells" not in r]
    if quality_rows:
        lines += ["## Quality", "", "| claim | setting | claimed | ours | verdict | true when | source (records) |",
                  "|---|---|---|---|---|---|---|"]
        for r in quality_rows:
            also = f" Also: {r['also']}." if r.get("also") else ""
            lines.append(f"| {r['claim']} | {r['setting']} | {r['claimed']} | {r['ours']} | **{r['verdict']}** | "
                         f"{r['true_when'].rstrip('.')}.{also} | {r['source']} ({', '.join(r['records'])}) |")
    return "\n".join(lines) + "\n"


def summary_lines(rows: list[dict]) -> list[str]:
    """One line a claim, for a README: the claim, the figure judged (the seed's, or the only one) and the verdict."""
    out = []
    for r in rows:
        if "cells" in r:
            first = next((c for c in r["cells"] if c.get("class")), None)
            short = first is not None and len(first.get("ours", "")) <= 24
            ours = f", ours {first['ours']} ({first['recipe']}, {first['source'].split(' (')[0]})" if short else ""
            out.append(f"- {r['claim']}: claimed {r['claimed']}{ours}: **{r['verdict']}**")
        else:
            out.append(f"- {r['claim']} ({r['id'].rsplit('-', 1)[-1]}): claimed {r['claimed']}, ours {r['ours']}: "
                       f"**{r['verdict']}**")
    return out
