"""The report's charts (matplotlib, PNG and SVG), drawn from result records; estimated curves and fits come from
estimate records (bench.modelling.records.derived) and are labelled estimated.

Every chart uses the same colour per memory category (COLOURS) and per method, GB (10^9 bytes, as the claims) on
its memory axes, and a title that names the model, batch, sequence length and device. Output is deterministic for
the same records (no dates in the files, a fixed SVG hash salt), so a regenerated report diffs clean.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.modelling import gpus  # noqa: E402 - the card catalog (names and sizes), not the estimator
from bench.render import fmt  # noqa: E402
from bench.render.quality_claims import FOLK_QUALITY  # noqa: E402
from bench.render.select import (  # noqa: E402
    Estimates,
    method_groups,
    quality_sets,
    recipe_name,
    recipe_text,
    runs,
    template,
)
from bench.schema import CATEGORIES, GB, METHODS, GiB, device_name, slug  # noqa: E402

# One colour per category in every chart (colour-blind-safe Okabe-Ito order).
COLOURS = dict(zip(CATEGORIES, ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#999999"),
                   strict=True))
METHOD_COLOURS = {"full": "#D55E00", "lora": "#0072B2", "qlora": "#009E73"}
CARD_LINES = ("rtx4090", "a100-40gb", "a100-80gb")  # cards drawn on the peak-against-sequence chart
FIT_CARDS = ("t4", "rtx4090", "a100-40gb", "a100-80gb", "h200")
plt.rcParams.update({"svg.hashsalt": "qlora-bench", "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False, "figure.dpi": 110})


def save(fig, out: Path, name: str, tight: bool = True) -> list[str]:
    if tight:
        fig.tight_layout()
    fig.savefig(out / f"{name}.png", metadata={"Software": None})
    fig.savefig(out / f"{name}.svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return [f"{name}.png", f"{name}.svg"]


def _title(key: tuple, sources: set[str]) -> str:
    model, batch, seq, ckpt, precision, device, shard, ranks = key
    per_rank = f", {shard} x{ranks} per rank" if shard != "none" else ""
    return (f"{model}, batch {batch} x seq {seq}{', checkpointing' if ckpt else ''}, {precision}{per_rank}\n"
            f"on {device} ({' and '.join(sorted(sources))})")


def _name(key: tuple) -> str:
    """A method group's file-name part: model, batch, sequence, checkpointing, and a sharding if any."""
    return slug("-".join(map(str, key[:4] + (key[6:] if key[6] != "none" else ()))))


def breakdown(records: list[dict], out: Path) -> list[str]:
    """1. Stacked bars: memory at the peak by category for each method."""
    files = []
    for key, rs in method_groups(records):
        fig, ax = plt.subplots(figsize=(5.2, 4.2))
        x = range(len(rs))
        bottom = [0.0] * len(rs)
        for cat in CATEGORIES:
            vals = [r["bytes"][cat] / GB for r in rs]
            ax.bar(x, vals, bottom=bottom, color=COLOURS[cat], label=cat, width=0.6)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        for i, r in enumerate(rs):
            ax.text(i, bottom[i], fmt.gb_number(r["bytes"]["peak"]), ha="center", va="bottom")
        ax.set_xticks(list(x), [f"{r['config']['method']}\n{recipe_text(r['config'])}, AdamW "
                                f"{r.get('optimizer_impl') or 'default'}" for r in rs], fontsize=7)
        ax.set_ylabel("GB at the peak (10^9 bytes)")
        ax.set_title("Memory by category, " + _title(key, {r["source"] for r in rs}))
        ax.legend(frameon=False, fontsize=8, loc="upper right")
        ax.set_ylim(0, max(bottom) * 1.15)
        files += save(fig, out, f"breakdown-{_name(key)}")
    return files


def peak_vs_seq(records: list[dict], out: Path) -> list[str]:
    """2. Peak against sequence length per method (estimated curves, measured points), with card sizes."""
    base = template(records)
    if base is None:
        return []
    base = {**base, "grad_checkpointing": False, "layers": None}
    estimates = Estimates(records)
    seqs = [128, 256, 512, 1024, 2048, 4096]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    for m in METHODS:
        for ckpt, style in ((False, "-"), (True, ":")):
            points = [(s, estimates.peak(base, method=m, grad_checkpointing=ckpt, seq_len=s)) for s in seqs]
            points = [(s, p / GB) for s, p in points if p is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, color=METHOD_COLOURS[m],
                        label=f"{m}{' + checkpointing' if ckpt else ''}")
    shown = set()
    for r in runs(records):
        c = r["config"]
        if c["model"] == base["model"] and c["batch_size"] == base["batch_size"] and recipe_name(c) == "seed":
            impl = c.get("adamw_impl", "default")
            what = (f"{c['method']} run ({r['source']}, checkpointing {'on' if c['grad_checkpointing'] else 'off'}"
                    + (f", {impl} AdamW)" if impl != "default" else ")"))
            ax.plot(c["seq_len"], r["bytes"]["peak"] / GB, "D" if impl == "fused" else "s" if c["grad_checkpointing"]
                    else "o",
                    color=METHOD_COLOURS[c["method"]], markeredgecolor="black", ls="none",
                    label=None if what in shown else what)
            shown.add(what)
    for card in CARD_LINES:
        g = gpus.CATALOG[card]
        usable = (g.total_bytes - gpus.CUDA_CONTEXT_BYTES) / (1 + gpus.ALLOCATOR_RESERVE) / GB
        ax.axhline(usable, color="grey", lw=0.8, ls="--")
        ax.text(seqs[0], usable, f" {g.label.replace('NVIDIA ', '')}: {usable:.1f} GB for tensors", va="bottom",
                color="dimgrey", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqs, [str(s) for s in seqs])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak GB (tensors)")
    devices = sorted({device_name(r) for r in runs(records)})
    ax.set_title(f"Peak memory vs sequence length, {base['model']}, batch {base['batch_size']}, seed recipe\n"
                 f"lines: estimated for CUDA; markers: runs on {', '.join(devices) or '-'}; dashed: what a card "
                 f"leaves for tensors\n(its total less {gpus.CUDA_CONTEXT_BYTES / GiB:.1f} GiB CUDA context and a "
                 f"{gpus.ALLOCATOR_RESERVE:.0%} allocator reserve, both assumed)", fontsize=7)
    ax.legend(frameon=False, fontsize=6.5, ncol=2, loc="upper left", bbox_to_anchor=(0.0, -0.16))
    return save(fig, out, f"peak-vs-seq-{slug(base['model'])}")


def fit_matrix(records: list[dict], out: Path) -> list[str]:
    """3. Method x GPU: the longest sequence that fits (estimated, batch of the estimate records)."""
    base = template(records)
    estimates = Estimates(records)
    cards = FIT_CARDS
    if base is None or not estimates.has_fit({**base, "layers": None}, cards[0], method=METHODS[0],
                                              grad_checkpointing=False):
        return []
    base = {**base, "layers": None}
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), sharey=True)
    fig.subplots_adjust(top=0.78, bottom=0.22, left=0.07, right=0.86, wspace=0.08)
    uppers = {r["fit"]["upper"] for r in records if r.get("fit")}
    top = max(uppers, default=8192)
    for ax, ckpt in zip(axes, (False, True), strict=True):
        grid = [[estimates.longest(base, name, method=m, grad_checkpointing=ckpt)
                 if estimates.has_fit(base, name, method=m, grad_checkpointing=ckpt) else "n/a" for name in cards]
                for m in METHODS]
        shade = [[0 if v is None or v == "n/a" else min(v, top) for v in row] for row in grid]
        image = ax.imshow(shade, cmap="Greens", vmin=0, vmax=top * 1.6, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                capped = v is not None and v in uppers
                text = "no fit" if v is None else v if v == "n/a" else f"{v:,}" + ("\n(cap)" if capped else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=7.5, color="black",
                        fontweight="bold" if capped else "normal")
        ax.set_xticks(range(len(cards)), [gpus.CATALOG[c].label.replace("NVIDIA ", "").replace("GeForce ", "")
                                          for c in cards], rotation=20, ha="right", fontsize=7)
        ax.set_yticks(range(len(METHODS)), METHODS)
        ax.set_title(f"checkpointing {'on' if ckpt else 'off'}", fontsize=8)
    bar = fig.colorbar(image, ax=list(axes), fraction=0.03, pad=0.02)
    bar.set_label("longest sequence that fits (tokens)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"Longest sequence that fits one card (estimated for CUDA), {base['model']}, batch "
                 f"{base['batch_size']}, seed recipe\n\"no fit\": not even one token; \"(cap)\": the model's maximum "
                 f"length ({top:,}), a length limit, not memory: longer would fit", fontsize=8)
    return save(fig, out, f"fit-matrix-{slug(base['model'])}", tight=False)


def quality(records: list[dict], out: Path) -> list[str]:
    """4. Relative quality with 95% intervals, per task and method (bases included)."""
    by_task = quality_sets(records)
    if not by_task:
        return []
    cols = min(3, len(by_task))
    rows_ = -(-len(by_task) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(max(5.0, 3.8 * cols), 4.0 * rows_), squeeze=False, sharey=True)
    for ax in axes.flat[len(by_task):]:
        ax.set_visible(False)
    for ax, ((_, task, _, _), rs) in zip(axes.flat, by_task.items(), strict=False):
        q0 = rs[0]["quality"]
        entries = [(r["config"]["method"], r["quality"]["relative"], METHOD_COLOURS[r["config"]["method"]])
                   for r in rs]
        bases = (("base", "untrained\nhead"), ("base_4bit", "4-bit,\nuntrained head")) if q0.get("head") else (
            ("base", "base"), ("base_4bit", "4-bit base"))
        for name, label in bases:
            if q0.get(name) and q0[name].get("relative"):
                entries.append((label, q0[name]["relative"], "#999999"))
        full = next((r for r in rs if r["config"]["method"] == "full"), None)
        for i, (_, rel, colour) in enumerate(entries):
            ax.errorbar(i, rel["value"], yerr=[[rel["value"] - rel["ci_low"]], [rel["ci_high"] - rel["value"]]],
                        fmt="o", color=colour, capsize=4)
        for i, r in enumerate(rs):  # each seed against Full FT's same seed: small dots beside the interval
            ours, theirs = r["quality"].get("per_seed") or [], (full or {"quality": {}})["quality"].get("per_seed")
            if theirs and len(ours) == len(theirs) > 1:
                ys = [a["value"] / b["value"] for a, b in zip(ours, theirs, strict=True) if b["value"]]
                ax.plot([i + 0.18] * len(ys), ys, ".", color=entries[i][2], alpha=0.6, ms=4)
        ax.axhline(1.0, color="black", lw=0.8)
        for m, claimed in FOLK_QUALITY.items():
            ax.axhline(claimed, color=METHOD_COLOURS[m], lw=0.7, ls="--")
        ax.set_xticks(range(len(entries)), [e[0] for e in entries], rotation=15)
        ax.set_ylabel("score / Full FT's score")
        ax.set_title(f"{task} ({q0['metric']}), {rs[0]['config']['model']}\n{q0['eval_examples']} held-out, "
                     f"{len(q0['seeds'])} seed(s), on {device_name(rs[0])}", fontsize=8)
    fig.suptitle("Relative quality with 95% bootstrap intervals, one scale for every task (dots: each seed against "
                 "Full FT's same seed)\n(dashed: the folk 97% for LoRA and 95% for QLoRA; grey: the base model "
                 "untuned)", fontsize=8)
    return save(fig, out, "quality")


def estimate_vs_measured(records: list[dict], out: Path) -> list[str]:
    """5. The estimate's error on each run's peak, in percent, with the ±5% band: every run with an estimate beside
    it, none left off (a symmetric-log axis keeps the band readable beside the runs far outside it)."""
    estimates = Estimates(records)
    points = []
    for r in runs(records):
        est = estimates.beside(r) if r.get("bytes") else None
        if est:
            points.append((r["bytes"]["peak"] / GB, (est / r["bytes"]["peak"] - 1) * 100, r["config"]["method"],
                           r["source"]))
    if not points:
        return []
    without = sum(1 for r in runs(records) if r.get("bytes")) - len(points)
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    ax.axhspan(-5, 5, color="#dddddd", label="±5%")
    ax.axhline(0, color="black", lw=0.8)
    for m in METHODS:
        for source, marker in (("measured", "o"), ("extrapolated", "^")):
            pts = [p for p in points if p[2] == m and p[3] == source]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=METHOD_COLOURS[m], marker=marker,
                           label=f"{m} ({source}, {len(pts)})", s=18)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=10)
    low, high = min(-10.0, min(p[1] for p in points) * 1.3), max(10.0, max(p[1] for p in points) * 1.3)
    ax.set_ylim(low, high)
    ticks = [t for t in (-1000, -100, -50, -10, -5, 0, 5, 10, 50, 100, 1000) if low <= t <= high]
    ax.set_yticks(ticks, [f"{t:+d}%" if t else "0" for t in ticks])
    ax.set_xlabel("measured peak GB (log)")
    ax.set_ylabel("estimate error, % of the measured peak")
    inside = sum(abs(p[1]) <= 5 for p in points)
    devices = sorted({device_name(r) for r in records if r["source"] != "estimated"})
    ax.set_title(f"Estimate error per run: {inside} of {len(points)} within ±5%"
                 + (f" ({without} runs have no estimate beside them)" if without else "")
                 + f"\nruns on {', '.join(devices)}; linear within ±10%, logarithmic beyond", fontsize=8)
    ax.legend(frameon=False, fontsize=7)
    return save(fig, out, "estimate-vs-measured")


def timeline(records: list[dict], out: Path) -> list[str]:
    """6. Live memory over one training step by category, per method, the peak marked."""
    files = []
    for key, rs in method_groups(records):
        rs = [r for r in rs if r.get("timeline")]
        if not rs:
            continue
        fig, axes = plt.subplots(1, len(rs), figsize=(4 * len(rs), 3.4), squeeze=False, sharey=False)
        for ax, r in zip(axes[0], rs, strict=True):
            t = r["timeline"]
            # From the forward pass on: before it the ledger is only registering what already exists.
            e0 = next((p["event"] for p in t["phases"] if p["phase"] == "forward"), 0)
            keep = [i for i, e in enumerate(t["event"]) if e >= e0]
            span = max(t["event"][-1] - e0, 1)
            xs = [(t["event"][i] - e0) / span for i in keep]
            ax.stackplot(xs, [[t["bytes"][c][i] / GB for i in keep] for c in CATEGORIES],
                         colors=[COLOURS[c] for c in CATEGORIES], labels=CATEGORIES)
            totals = [sum(t["bytes"][c][i] for c in CATEGORIES) / GB for i in keep]
            i = max(range(len(totals)), key=totals.__getitem__)
            ax.plot(xs[i], totals[i], "v", color="black")
            ax.annotate(f"peak {totals[i]:.2f} GB", (xs[i], totals[i]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
            for p in t["phases"]:
                if p["event"] >= e0 and p["phase"] in ("forward", "backward", "optimizer"):
                    x = (p["event"] - e0) / span
                    ax.axvline(x, color="black", lw=0.4, ls=":")
                    ax.text(x, 1.0, f" {p['phase']}", fontsize=6, ha="left", va="bottom",
                            transform=ax.get_xaxis_transform())
            depth = r.get("timeline_layers")
            ax.set_title(f"{r['config']['method']}" + (f", measured at {depth} of {r['layers']} layers" if depth
                                                        and depth != r.get("layers") else ", measured"), pad=12,
                         fontsize=8)
            ax.set_xlabel("progress through the step (allocation events)")
            ax.set_ylabel("live GB" + (f" at {depth} layers" if depth and depth != r.get("layers") else ""))
            ax.set_ylim(0, max(totals) * 1.2)
        axes[0][-1].legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        model, batch, seq, ckpt, precision, device, shard, ranks = key
        per_rank = f", {shard} x{ranks}, one rank" if shard != "none" else ""
        fig.suptitle(f"Live memory through one training step, as the ledger recorded it: {model}, batch {batch} x "
                     f"seq {seq}{', checkpointing' if ckpt else ''}, {precision}{per_rank}, on {device}\n(the run "
                     "itself, not scaled: reduced-depth runs show their measured depth; the tables give the "
                     "extrapolation)",
                     fontsize=8)
        files += save(fig, out, f"timeline-{_name(key)}")
    return files


TOTALS = ("full-7b-total", "lora-7b-total", "qlora-7b-total")


def judged(records: list[dict], verdicts: list[dict], out: Path) -> list[str]:
    """0. The totals claims as judged: memory by category of each recipe's judged record (run, else estimate) at the
    claims' setting, in GB, with the claimed total drawn across each panel."""
    by_id = {r["id"]: r for r in records}
    rows = [v for v in verdicts if v["id"] in TOTALS and any(c.get("record") in by_id for c in v["cells"])]
    if not rows:
        return []
    fig, axes = plt.subplots(1, len(rows), figsize=(3.3 * len(rows) + 1.6, 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": [max(2, len(v["cells"])) for v in rows]})
    for ax, v in zip(axes[0], rows, strict=True):
        cells = [c for c in v["cells"] if c.get("record") in by_id]
        bottom = [0.0] * len(cells)
        for cat in CATEGORIES:
            vals = [by_id[c["record"]]["bytes"][cat] / GB for c in cells]
            ax.bar(range(len(cells)), vals, bottom=bottom, color=COLOURS[cat], width=0.65,
                   label=cat if ax is axes[0][-1] else None)
            bottom = [b + x for b, x in zip(bottom, vals, strict=True)]
        for i, c in enumerate(cells):
            ax.text(i, bottom[i], fmt.gb_number(by_id[c["record"]]["bytes"]["peak"]), ha="center", va="bottom",
                    fontsize=7)
        claimed = float(v["claimed"].split()[0])
        ax.axhline(claimed, color="black", ls="--", lw=1)
        ax.text(len(cells) - 0.5, claimed, f"claimed ~{claimed:g} GB", ha="right", va="bottom", fontsize=7)
        ax.set_xticks(range(len(cells)), [c["recipe"].replace(" (", "\n(").replace(" AdamW", "") + "\n"
                                          + c["source"].split(" (")[0] for c in cells], fontsize=6.5)
        ax.set_ylim(0, max(max(bottom), claimed) * 1.18)
        ax.set_title(v["claim"], fontsize=8)
        ax.set_ylabel("GB at the peak (10^9 bytes)")
    axes[0][-1].legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    devices = sorted({device_name(by_id[c["record"]]) for v in rows for c in v["cells"]
                      if c.get("record") in by_id and by_id[c["record"]]["source"] != "estimated"})
    fig.suptitle("The folk totals for a 7B model, judged at batch 1 x 512 tokens under each recipe (Llama-2-7B)\n"
                 f"each bar: the run of that setting (extrapolated: measured on {', '.join(devices) or '-'} at "
                 "reduced depth, scaled to 32 layers), else the CUDA estimate, as labelled", fontsize=8)
    return save(fig, out, "claims-7b-totals")


ALL = (breakdown, peak_vs_seq, fit_matrix, quality, estimate_vs_measured, timeline)


def draw(records: list[dict], out: Path, verdicts: list[dict] = ()) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return judged(records, list(verdicts), out) + [f for chart in ALL for f in chart(records, out)]
