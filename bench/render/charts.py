"""The report's charts (matplotlib, PNG and SVG), drawn from result records; estimated curves and fits come from
estimate records (bench.modelling.records.derived) and are labelled estimated.

Every chart uses the same colour per memory category (COLOURS) and per method, GiB on its memory
axes, and a title that names the model, batch, sequence length and device. Output is deterministic for the same
records (no dates in the files, a fixed SVG hash salt), so a regenerated report diffs clean.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.modelling import gpus  # noqa: E402 - the card catalog (names and sizes), not the estimator
from bench.render.claims import FOLK_QUALITY  # noqa: E402
from bench.render.select import Estimates, method_groups, quality_sets, runs, template  # noqa: E402
from bench.schema import CATEGORIES, METHODS, GiB, device_name, slug  # noqa: E402

# One colour per category in every chart (colour-blind-safe Okabe-Ito order).
COLOURS = dict(zip(CATEGORIES, ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#999999"),
                   strict=True))
METHOD_COLOURS = {"full": "#D55E00", "lora": "#0072B2", "qlora": "#009E73"}
CARD_LINES = (24, 40, 80)  # GiB lines on the peak-against-sequence chart
FIT_CARDS = ("t4", "rtx4090", "a100-40gb", "a100-80gb", "h200")
plt.rcParams.update({"svg.hashsalt": "qlora-bench", "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False, "figure.dpi": 110})


def save(fig, out: Path, name: str) -> list[str]:
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", metadata={"Software": None})
    fig.savefig(out / f"{name}.svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return [f"{name}.png", f"{name}.svg"]


def _title(key: tuple, sources: set[str]) -> str:
    model, batch, seq, ckpt, precision, device = key
    return (f"{model}, batch {batch} x seq {seq}{', checkpointing' if ckpt else ''}, {precision}\n"
            f"on {device} ({' and '.join(sorted(sources))})")


def breakdown(records: list[dict], out: Path) -> list[str]:
    """1. Stacked bars: memory at the peak by category for each method."""
    files = []
    for key, rs in method_groups(records):
        fig, ax = plt.subplots(figsize=(5.2, 4.2))
        x = range(len(rs))
        bottom = [0.0] * len(rs)
        for cat in CATEGORIES:
            vals = [r["bytes"][cat] / GiB for r in rs]
            ax.bar(x, vals, bottom=bottom, color=COLOURS[cat], label=cat, width=0.6)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        for i, total in enumerate(bottom):
            ax.text(i, total, f"{total:.2f}", ha="center", va="bottom")
        ax.set_xticks(list(x), [r["config"]["method"] for r in rs])
        ax.set_ylabel("GiB at the peak")
        ax.set_title("Memory by category, " + _title(key, {r["source"] for r in rs}))
        ax.legend(frameon=False, fontsize=8, loc="upper right")
        ax.set_ylim(0, max(bottom) * 1.15)
        files += save(fig, out, f"breakdown-{slug('-'.join(map(str, key[:4])))}")
    return files


def peak_vs_seq(records: list[dict], out: Path) -> list[str]:
    """2. Peak against sequence length per method (estimated curves, measured points), with card sizes."""
    base = template(records)
    if base is None:
        return []
    base = {**base, "grad_checkpointing": False, "layers": None}
    estimates = Estimates(records)
    seqs = [128, 256, 512, 1024, 2048, 4096]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m in METHODS:
        for ckpt, style in ((False, "-"), (True, ":")):
            points = [(s, estimates.peak(base, method=m, grad_checkpointing=ckpt, seq_len=s)) for s in seqs]
            points = [(s, p / GiB) for s, p in points if p is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, color=METHOD_COLOURS[m],
                        label=f"{m}{' + checkpointing' if ckpt else ''}")
    for r in runs(records):
        c = r["config"]
        if c["model"] == base["model"] and c["batch_size"] == base["batch_size"]:
            ax.plot(c["seq_len"], r["bytes"]["peak"] / GiB, "o" if not c["grad_checkpointing"] else "s",
                    color=METHOD_COLOURS[c["method"]], markeredgecolor="black")
    for gib in CARD_LINES:
        ax.axhline(gib, color="grey", lw=0.8, ls="--")
        ax.text(seqs[0], gib, f" {gib} GiB", va="bottom", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqs, [str(s) for s in seqs])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak GiB")
    devices = sorted({device_name(r) for r in runs(records)})
    ax.set_title(f"Peak memory vs sequence length, {base['model']}, batch {base['batch_size']}, {base['precision']}\n"
                 f"lines: estimated for CUDA; markers: runs on {', '.join(devices) or '-'}\n"
                 "(circle: checkpointing off, square: on)", fontsize=8)
    ax.legend(frameon=False, fontsize=7, ncol=2)
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
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 2.8), sharey=True)
    uppers = {r["fit"]["upper"] for r in records if r.get("fit")}
    for ax, ckpt in zip(axes, (False, True), strict=True):
        grid = [[estimates.longest(base, name, method=m, grad_checkpointing=ckpt) for name in cards]
                for m in METHODS]
        shade = [[0 if v is None else min(v, 8192) for v in row] for row in grid]
        ax.imshow(shade, cmap="Greens", vmin=0, vmax=8192, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                top = v is not None and v in uppers
                text = "does not fit" if v is None else f"{v:,}" + (" (model max)" if top else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(cards)), [gpus.CATALOG[c].label.replace("NVIDIA ", "") for c in cards],
                      rotation=20, ha="right", fontsize=7)
        ax.set_yticks(range(len(METHODS)), METHODS)
        ax.set_title(f"checkpointing {'on' if ckpt else 'off'}")
    fig.suptitle(f"Longest sequence that fits (estimated), {base['model']}, batch {base['batch_size']}, "
                 f"{base['precision']}")
    return save(fig, out, f"fit-matrix-{slug(base['model'])}")


def quality(records: list[dict], out: Path) -> list[str]:
    """4. Relative quality with 95% intervals, per task and method (bases included)."""
    by_task = quality_sets(records)
    if not by_task:
        return []
    fig, axes = plt.subplots(1, len(by_task), figsize=(max(5.0, 3.8 * len(by_task)), 4.0), squeeze=False)
    for ax, ((task, _, _), rs) in zip(axes[0], by_task.items(), strict=True):
        q0 = rs[0]["quality"]
        entries = [(r["config"]["method"], r["quality"]["relative"], METHOD_COLOURS[r["config"]["method"]])
                   for r in rs]
        for name, label in (("base", "base"), ("base_4bit", "4-bit base")):
            if q0.get(name) and q0[name].get("relative"):
                entries.append((label, q0[name]["relative"], "#999999"))
        for i, (_, rel, colour) in enumerate(entries):
            ax.errorbar(i, rel["value"], yerr=[[rel["value"] - rel["ci_low"]], [rel["ci_high"] - rel["value"]]],
                        fmt="o", color=colour, capsize=4)
        ax.axhline(1.0, color="black", lw=0.8)
        for m, claimed in FOLK_QUALITY.items():
            ax.axhline(claimed, color=METHOD_COLOURS[m], lw=0.7, ls="--")
        ax.set_xticks(range(len(entries)), [e[0] for e in entries], rotation=15)
        ax.set_ylabel("score / Full FT's score")
        ax.set_title(f"{task} ({q0['metric']}), {rs[0]['config']['model']}\n{q0['eval_examples']} held-out, "
                     f"{len(q0['seeds'])} seed(s), on {device_name(rs[0])}", fontsize=8)
    fig.suptitle("Relative quality with 95% bootstrap intervals\n(dashed: the folk 97% for LoRA and 95% for QLoRA)",
                 fontsize=9)
    return save(fig, out, "quality")


def estimate_vs_measured(records: list[dict], out: Path) -> list[str]:
    """5. Estimated against measured peak, one point per run, with the 5% band."""
    estimates = Estimates(records)
    points = []
    for r in runs(records):
        if r.get("bytes"):
            est = estimates.beside(r)
            if est:
                points.append((r["bytes"]["peak"] / GiB, est / GiB, r["config"]["method"], r["source"]))
    if not points:
        return []
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    lo = min(min(p[0], p[1]) for p in points) * 0.8
    hi = max(max(p[0], p[1]) for p in points) * 1.25
    xs = [lo, hi]
    ax.fill_between(xs, [x * 0.95 for x in xs], [x * 1.05 for x in xs], color="#dddddd", label="±5%")
    ax.plot(xs, xs, color="black", lw=0.8)
    for m in METHODS:
        for source, marker in (("measured", "o"), ("extrapolated", "^")):
            pts = [p for p in points if p[2] == m and p[3] == source]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=METHOD_COLOURS[m], marker=marker,
                           label=f"{m} ({source})", s=18)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured peak GiB")
    ax.set_ylabel("estimated peak GiB")
    devices = sorted({device_name(r) for r in records if r["source"] != "estimated"})
    ax.set_title(f"Estimate vs measurement, {len(points)} runs\non {', '.join(devices)}")
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
            ax.stackplot(xs, [[t["bytes"][c][i] / GiB for i in keep] for c in CATEGORIES],
                         colors=[COLOURS[c] for c in CATEGORIES], labels=CATEGORIES)
            totals = [sum(t["bytes"][c][i] for c in CATEGORIES) / GiB for i in keep]
            i = max(range(len(totals)), key=totals.__getitem__)
            ax.plot(xs[i], totals[i], "v", color="black")
            ax.annotate(f"peak {totals[i]:.2f} GiB", (xs[i], totals[i]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
            for p in t["phases"]:
                if p["event"] >= e0 and p["phase"] in ("forward", "backward", "optimizer"):
                    x = (p["event"] - e0) / span
                    ax.axvline(x, color="black", lw=0.4, ls=":")
                    ax.text(x, 1.0, f" {p['phase']}", fontsize=6, ha="left", va="bottom",
                            transform=ax.get_xaxis_transform())
            depth = f" (at {r['timeline_layers']} layers)" if r.get("timeline_layers") else ""
            ax.set_title(f"{r['config']['method']}{depth}", pad=12)
            ax.set_xlabel("progress through the step")
            ax.set_ylabel("live GiB")
            ax.set_ylim(0, max(totals) * 1.2)
        axes[0][-1].legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle("Memory over one training step, " + _title(key, {r["source"] for r in rs}).replace("\n", " "),
                     fontsize=9)
        files += save(fig, out, f"timeline-{slug('-'.join(map(str, key[:4])))}")
    return files


ALL = (breakdown, peak_vs_seq, fit_matrix, quality, estimate_vs_measured, timeline)


def draw(records: list[dict], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return [f for chart in ALL for f in chart(records, out)]
