"""The quality runs as Markdown: per task, the bases and every method's held-out metric, relative quality to Full FT
with its 95% interval, and whether the intervals can separate a 2-point difference. Reads quality records only."""

from __future__ import annotations

from bench.render.fmt import gb_number


def _interval(x: dict | None, fmt: str) -> str:
    if x is None:
        return "—"
    return f"{x['value']:{fmt}} [{x['ci_low']:{fmt}}, {x['ci_high']:{fmt}}]"


def markdown(records: list[dict]) -> str:
    """Per task: the bases and every method's held-out metric, relative quality to Full FT with its 95% interval."""
    lines = ["# qlora-bench quality", "",
             "Relative quality = score / Full FT's score, where the score is accuracy (choice tasks) or exp(-loss) "
             "on the held-out targets (1/perplexity); intervals: 95% percentile bootstrap over seeds and held-out "
             "examples together. *Difference*: method minus Full FT (accuracy points, or score). *Gain share*: "
             "(method - untrained base) / (Full FT - untrained base), the share of Full FT's gain a method keeps. "
             "*Failed*: a seed whose score ends below the untrained base's, or whose training loss diverged.", ""]
    tasks_seen = []
    for r in records:
        t = (r["config"]["model"], r["quality"]["task"], r["quality"]["heldout_digest"])
        if t not in tasks_seen:
            tasks_seen.append(t)
    for model, task, digest in tasks_seen:
        rs = [r for r in records
              if (r["config"]["model"], r["quality"]["task"], r["quality"]["heldout_digest"]) == (model, task, digest)]
        q0, c0 = rs[0]["quality"], rs[0]["config"]
        acc = q0["metric"] == "accuracy"
        lines += [f"## {task}, {model} ({q0['source']})", "",
                  f"{c0['model']}; {q0['eval_examples']} held-out examples; seeds {q0['seeds']}; "
                  f"{q0['train']['steps']} steps of {q0['train']['batch_size']} examples "
                  f"({q0['train']['tokens']:,} tokens per method and seed) at seq_len ≤ {c0['seq_len']}; "
                  f"precision {c0['precision']}; LoRA r={c0['lora_r']} on {len(c0['lora_targets'])} projections.",
                  ""]
        if q0.get("caveat"):
            lines += [f"Caveat: {q0['caveat']}.", ""]
        if q0.get("head"):
            lines += [f"Head: {q0['head']}.", ""]
        if q0.get("task_note"):
            lines += [f"Note: {q0['task_note']}.", ""]
        searched = [r for r in rs if r["quality"].get("lr_search")]
        if searched:
            s0 = searched[0]["quality"]["lr_search"]
            lines += [f"Learning rates chosen on {s0['validation_examples']} validation examples carved from the "
                      f"training set (seed {s0['seed']}, never the held-out examples; score: "
                      f"{'accuracy' if s0['metric'] == 'accuracy' else 'exp(-loss)'}): " + "; ".join(
                          f"{r['config']['method']} {r['quality']['lr_search']['chosen']:g}{_edge(r)} (" + ", ".join(
                              f"{lr:g}: {sc:.4f}" for lr, sc in zip(r["quality"]["lr_search"]["grid"],
                                                                     r["quality"]["lr_search"]["scores"], strict=True))
                          + ")" for r in searched) + ".", ""]
        head = "| model | lr | " + ("accuracy | " if acc else "") + "loss | perplexity | relative quality [95% CI] | " \
               "difference [95% CI] | gain share [95% CI] | failed seeds | peak GB | step s |"
        lines += [head, "|---|---|" + ("---|" if acc else "") + "---|---|---|---|---|---|---|---|"]
        for name, label in (("base", "base (untrained)"), ("base_4bit", "4-bit base (untrained, NF4)")):
            b = q0.get(name)
            if b:
                share = _interval(b.get("gain_share"), ".3f") if name != "base" else "0 (by definition)"
                lines.append(f"| {label} | — | " + (f"{b['accuracy']:.3f} | " if acc else "") +
                             f"{b['loss']:.4f} | {b['perplexity']:.3f} | {_interval(b['relative'], '.3f')} | "
                             f"{_interval(b['difference'], '+.2f' if acc else '+.4f')} | "
                             f"{share} | | | |")
        for r in rs:
            q, c = r["quality"], r["config"]
            peak = "—" if not r.get("bytes") else gb_number(r['bytes']['peak'])
            lines.append(f"| {c['method']} | {q['train']['lr']:g} | " + (f"{q['accuracy']:.3f} | " if acc else "") +
                         f"{q['loss']:.4f} | {q['perplexity']:.3f} | {_interval(q['relative'], '.3f')} | "
                         f"{_interval(q['difference'], '+.2f' if acc else '+.4f')} | "
                         f"{_interval(q.get('gain_share'), '.3f')} | {_failed(q)} | {peak} | {r['step_seconds']:.3f} |")
        without = [r for r in rs if (r["quality"].get("without_collapsed") or {}).get("relative")]
        if without:
            kept = without[0]["quality"]["without_collapsed"]["seeds"]
            lines += ["", f"Without the failed seeds (seeds {kept}, every method): " + "; ".join(
                f"{r['config']['method']} relative {_interval(r['quality']['without_collapsed']['relative'], '.3f')}, "
                f"gain share {_interval(r['quality']['without_collapsed'].get('gain_share'), '.3f')}"
                for r in without) + "."]
        if acc:
            lines += ["", _resolution(rs), "",
                      "Loss is the cross-entropy of the right class (a classifier's perplexity is exp of it)."
                      if q0.get("head") else
                      "Loss and perplexity are on the answer and the end-of-sequence token after it, as trained; the "
                      "untrained bases do not expect the answer to end there, hence their large loss."]
        lines.append("")
    return "\n".join(lines)


def _failed(q: dict) -> str:
    own = [f"{f['seed']} ({f['why']})" for f in q.get("collapsed") or []]
    return "; ".join(own) or ("—" if "collapsed" in q else "not checked")


def edge(search: dict) -> str | None:
    """"lowest" or "highest" when a learning-rate search chose an end of its grid, else None."""
    if search["chosen"] == min(search["grid"]):
        return "lowest"
    return "highest" if search["chosen"] == max(search["grid"]) else None


def _edge(r: dict) -> str:
    """A chosen rate at an end of its grid, said: a rate beyond the grid might have done better."""
    at = edge(r["quality"]["lr_search"])
    return f", the grid's {at}: a rate beyond it might do better" if at else ""


def _resolution(rs: list[dict]) -> str:
    """Whether the intervals can separate a 2-point difference from Full FT."""
    widths = {r["config"]["method"]: (r["quality"]["difference"]["ci_high"] - r["quality"]["difference"]["ci_low"]) / 2
              for r in rs if r["quality"].get("difference") and r["config"]["method"] != "full"}
    if not widths:
        return "No Full FT run: no relative quality."
    parts = [f"{m} ±{w:.1f} points" for m, w in widths.items()]
    can = all(w < 2 for w in widths.values())
    return (f"Interval half-widths of the difference from Full FT: {', '.join(parts)}: "
            + ("these runs can separate a 2-point difference." if can else
               "these runs cannot separate a 2-point difference; more seeds or held-out examples would."))
