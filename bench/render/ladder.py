"""The memory-savers ladder in a report (records with a `ladder` field, made by `qlora-bench ladder`): per ladder, a
table of its rungs (the peak and each category in GiB, the saving against the rung before, step time and its cost,
the estimate on this device with its error, and the CUDA estimate) and a stacked chart of the categories per rung,
measured beside estimated for CUDA. Records only: the rungs come in the order their records say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from bench.ladder import by_key
from bench.measuring.record import write_atomic
from bench.render.charts import COLOURS, save
from bench.schema import CATEGORIES, GiB, device_name, slug


@dataclass
class Rung:
    index: int
    saver: str
    run: dict | None = None  # measured or extrapolated here
    confirmed: dict | None = None  # the same at full depth (`ladder --confirm`)
    here: dict | None = None  # estimated for the device the run ran on
    cuda: dict | None = None  # estimated for CUDA


def ladders(records: list[dict]) -> dict[str, list[Rung]]:
    """Each ladder's rungs in order, by ladder name; of several records of one kind for a rung, the last."""
    out: dict[str, dict[int, Rung]] = {}
    for r in records:
        tag = r.get("ladder")
        if not tag:
            continue
        rung = out.setdefault(tag["name"], {}).setdefault(tag["rung"], Rung(tag["rung"], tag["saver"]))
        if r["source"] != "estimated":
            setattr(rung, "confirmed" if tag.get("depth") == "full" else "run", r)
        elif r["config"]["device"].startswith("cuda"):
            rung.cuda = r
        else:
            rung.here = r
    return {name: [rungs[i] for i in sorted(rungs)] for name, rungs in sorted(out.items())}


def _estimate_here(g: Rung) -> dict | None:
    """The estimate for the device the rung ran on: on a CUDA run, the CUDA estimate is that one."""
    if g.here is None and g.run is not None and g.run["config"]["device"].startswith("cuda"):
        return g.cuda
    return g.here


def _peak(r: dict | None) -> int | None:
    return r["bytes"]["peak"] if r and r.get("status") == "ok" and r.get("bytes") else None


def _gib(n: float | None) -> str:
    return "" if n is None else f"{n / GiB:.3f}"


def _saving(now: int | None, before: int | None) -> str:
    if now is None or before is None:
        return ""
    return f"{(now - before) / GiB:+.3f} ({now / before - 1:+.1%})"


def _seconds(r: dict | None) -> float | None:
    return r.get("step_seconds") if r and r.get("status") == "ok" else None


def table(name: str, rungs: list[Rung]) -> str:
    runs = [g.run for g in rungs if g.run]
    where = device_name(runs[0]) if runs else "no device"
    sources = sorted({r["source"] for r in runs})
    lines = [f"## {name}", "",
             f"Measured on {where} ({' and '.join(sources) or 'nothing measured'}; *extrapolated*: measured "
             "at two reduced depths and scaled to full depth); estimates at full depth. GiB = 2^30 bytes. "
             "*Saving*: against the rung above. *At backward start*: what the step holds as backward starts, "
             "activations all saved (a saver that targets activations shrinks it even where the peak falls "
             "elsewhere). *Step*: median seconds per step on this device (extrapolated with the bytes), and its "
             "change against the rung above.", "",
             "| # | saver | source | peak (GiB) | saving | " + " | ".join(CATEGORIES) + " | peak falls in | at "
             "backward start (GiB) | step (s) | step change | estimate here (GiB) | error | CUDA estimate (GiB) | "
             "CUDA saving |",
             "|---|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|---|---|---|---|---|"]
    before = before_cuda = before_s = None
    for g in rungs:
        run, peak, cuda = g.run, _peak(g.run), _peak(g.cuda)
        here = _peak(_estimate_here(g))
        s = _seconds(run)
        phase = start = ""
        cats = [""] * len(CATEGORIES)
        if run is None:
            cells = ["estimated only (CUDA)" if by_key(g.saver).cuda_only else "not measured", "", ""]
        elif peak is None:
            cells = [run["source"], f"{run['status']}: {run.get('error', '')}"[:80], ""]
        else:
            cells = [run["source"], _gib(peak), _saving(peak, before)]
            cats = [_gib(run["bytes"][c]) for c in CATEGORIES]
            phase = (run.get("peak_at") or {}).get("phase", "")
            start = _gib((run.get("backward_start") or {}).get("total"))
        err = f"{here / peak - 1:+.1%}" if here is not None and peak else ""
        change = f"{s / before_s - 1:+.0%}" if s and before_s else ""
        lines.append(f"| {g.index} | {by_key(g.saver).title} | " + " | ".join(cells + cats) +
                     f" | {phase} | {start} | {'' if s is None else f'{s:.2f}'} | {change} | {_gib(here)} | {err} | "
                     f"{_gib(cuda)} | {_saving(cuda, before_cuda)} |")
        before = peak if peak is not None else before
        before_cuda = cuda if cuda is not None else before_cuda
        before_s = s if s is not None else before_s
    confirmed = [g for g in rungs if g.confirmed]
    for g in confirmed:
        c = g.confirmed
        lines += ["", f"Rung {g.index} ({by_key(g.saver).title}) measured again at full depth: "
                  + (f"**{_gib(_peak(c))} GiB** at the peak (measured; extrapolated {_gib(_peak(g.run))} GiB, "
                     f"estimated {_gib(_peak(_estimate_here(g)))} GiB), step {c.get('step_seconds') or 0:.1f} s."
                     if _peak(c) else f"{c['status']}: {c.get('error', '')}")]
    lines += ["", "Rungs: " + "; ".join(f"{g.index} {by_key(g.saver).key}: {by_key(g.saver).about}" for g in rungs)
              + ".", ""]
    return "\n".join(lines)


def chart(name: str, rungs: list[Rung], out: Path) -> list[str]:
    """Stacked bars of the categories at each rung's peak: measured here (solid) beside the CUDA estimate
    (hatched)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(rungs) + 2), 4.6))
    width = 0.38
    top = 0.0
    for offset, kind in ((-width / 2, "run"), (width / 2, "cuda")):
        for i, g in enumerate(rungs):
            r = getattr(g, kind)
            if _peak(r) is None:
                continue
            bottom = 0.0
            for cat in CATEGORIES:
                v = r["bytes"][cat] / GiB
                ax.bar(i + offset, v, width, bottom=bottom, color=COLOURS[cat], hatch="//" if kind == "cuda" else None,
                       edgecolor="white", linewidth=0.4, label=cat if (i, kind) == (0, "run") else None)
                bottom += v
            ax.text(i + offset, bottom, f"{bottom:.2f}", ha="center", va="bottom", fontsize=6)
            top = max(top, bottom)
    ax.set_xticks(range(len(rungs)), [by_key(g.saver).title.replace(" ", "\n", 1) for g in rungs], fontsize=7)
    ax.set_ylabel("GiB at the peak (2^30 bytes)")
    runs = [g.run for g in rungs if g.run]
    where = device_name(runs[0]) if runs else "no device"
    ax.set_title(f"Memory-savers ladder, {name}\nleft: {where} ({', '.join(sorted({r['source'] for r in runs}))}); "
                 "right, hatched: CUDA estimate", fontsize=9)
    ax.set_ylim(0, top * 1.12 if top else 1)
    ax.legend(frameon=False, fontsize=7, loc="upper right")
    return save(fig, out, f"ladder-{slug(name)}")


def render(records: list[dict], out: Path) -> list[str]:
    """ladder.md and one chart per ladder into `out`; the files written (none when no record is of a ladder)."""
    found = ladders(records)
    if not found:
        return []
    files, parts = [], ["# Memory-savers ladders", "",
                        "Savers applied cumulatively, in the order of `bench/ladder.py` (`qlora-bench ladder`).", ""]
    for name, rungs in found.items():
        pictures = chart(name, rungs, out)
        files += pictures
        parts += [table(name, rungs), f"![ladder {name}]({pictures[0]})", ""]
    write_atomic(out / "ladder.md", "\n".join(parts))
    return ["ladder.md", *files]
