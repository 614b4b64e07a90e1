"""The runs table: one row per record, categories in GB (bench.render.fmt) with their share of the peak, device
figures, the estimate beside each run (from an estimate record), step time and quality. Written as CSV (pandas)
and Markdown."""

from __future__ import annotations

import pandas as pd

from bench.render.fmt import gb_number
from bench.render.select import Estimates, recipe_name
from bench.schema import CATEGORIES, DEVICE_FIGURES, device_name

COLUMNS = ["id", "model", "method", "recipe", "adamw_impl", "batch_size", "seq_len", "grad_checkpointing",
           "precision", "optimizer", "double_quant", "lora_r", "device", "source", "status", "peak_gb",
           *[f"{c}_gb" for c in CATEGORIES], *[f"{c}_share" for c in CATEGORIES], "peak_phase",
           *[f"{k}_gb" for k in DEVICE_FIGURES],
           "estimated_peak_gb", "estimate_error", "step_seconds", "tokens_per_second",
           "quality_task", "quality_metric", "quality_value", "relative_quality", "relative_ci_low",
           "relative_ci_high"]


def rows(records: list[dict], estimates: Estimates | None = None) -> list[dict]:
    """One row per record; the estimate beside each run is looked up in `estimates` (default: among `records`)."""
    out = []
    estimates = estimates or Estimates(records)
    for r in records:
        c, b, q = r["config"], r.get("bytes") or {}, r.get("quality") or {}
        est = estimates.beside(r) if r["source"] != "estimated" and b else None
        device = device_name(r) or ""
        rel = q.get("relative") or {}
        row = {"id": r["id"], "model": c["model"], "method": c["method"],
               "recipe": recipe_name(c), "adamw_impl": c.get("adamw_impl", "default"),
               "batch_size": c["batch_size"],
               "seq_len": c["seq_len"], "grad_checkpointing": c.get("grad_checkpointing"),
               "precision": c.get("precision"), "optimizer": c.get("optimizer"),
               "double_quant": c.get("double_quant") if c["method"] == "qlora" else "",
               "lora_r": c.get("lora_r") if c["method"] != "full" else "", "device": device,
               "source": r["source"], "status": r["status"], "peak_gb": gb_number(b.get("peak")),
               "peak_phase": (r.get("peak_at") or {}).get("phase", "")}
        for k in CATEGORIES:
            row[f"{k}_gb"] = gb_number(b.get(k))
            row[f"{k}_share"] = f"{b[k] / b['peak']:.3f}" if b.get("peak") else ""
        for k in DEVICE_FIGURES:
            row[f"{k}_gb"] = gb_number(r.get(k))
        row["estimated_peak_gb"] = gb_number(est)
        row["estimate_error"] = f"{est / b['peak'] - 1:+.4f}" if est and b.get("peak") else ""
        row["step_seconds"] = "" if r.get("step_seconds") is None else f"{r['step_seconds']:.4f}"
        row["tokens_per_second"] = "" if r.get("tokens_per_second") is None else f"{r['tokens_per_second']:.2f}"
        row["quality_task"], row["quality_metric"] = q.get("task", ""), q.get("metric", "")
        row["quality_value"] = "" if "value" not in q else f"{q['value']:.4f}"
        row["relative_quality"] = "" if "value" not in rel else f"{rel['value']:.4f}"
        row["relative_ci_low"] = "" if "ci_low" not in rel else f"{rel['ci_low']:.4f}"
        row["relative_ci_high"] = "" if "ci_high" not in rel else f"{rel['ci_high']:.4f}"
        out.append(row)
    return out


def to_csv(table: list[dict]) -> str:
    return pd.DataFrame(table, columns=COLUMNS).to_csv(index=False, lineterminator="\n")


def to_markdown(table: list[dict]) -> str:
    head = ["run", "device", "source", "status", "peak GB", *CATEGORIES, "peak in", "device figure GB",
            "estimate GB (error)", "step s", "tokens/s", "quality"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        run = f"{t['model']} {t['method']} {t['batch_size']}x{t['seq_len']}" + (" ckpt" if t["grad_checkpointing"]
                                                                                 else "")
        impl = "" if t["adamw_impl"] == "default" else f", {t['adamw_impl']} AdamW"
        run += f" [{t['recipe']}{impl}]"
        cats = [f"{t[f'{k}_gb']} ({float(t[f'{k}_share']):.0%})" if t[f"{k}_share"] else t[f"{k}_gb"]
                for k in CATEGORIES]
        dev = next((f"{t[k + '_gb']} {k.replace('_', ' ')}" for k in ("cuda_max_allocated", "rss_anon_peak")
                    if t[k + "_gb"]), "")
        est = f"{t['estimated_peak_gb']} ({float(t['estimate_error']):+.1%})" if t["estimate_error"] else ""
        quality = ""
        if t["quality_task"]:
            quality = f"{t['quality_task']} {t['quality_metric']} {float(t['quality_value']):.3f}"
            if t["relative_quality"]:
                quality += (f", relative {float(t['relative_quality']):.3f} [{float(t['relative_ci_low']):.3f}, "
                            f"{float(t['relative_ci_high']):.3f}]")
        lines.append("| " + " | ".join([run, t["device"] or "", t["source"], t["status"], t["peak_gb"], *cats,
                                          t["peak_phase"], dev, est, t["step_seconds"], t["tokens_per_second"],
                                          quality]) + " |")
    return "\n".join(lines) + "\n"

