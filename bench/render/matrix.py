"""The memory claims about a 7B model, judged under each recipe (bench/recipes.toml): one row per claim, one cell
per recipe (and, for Full FT, per AdamW implementation), each cell judged on the figure measured first.

A cell's figure is the newest run of its setting (Llama-2-7B, batch 1 x 512 tokens, the recipe's configuration):
`measured (device)` at full depth, or `extrapolated (device; depths)` from reduced depths. Beside it stands the
CUDA estimate of the same setting (`estimated (CUDA ...)`) and the difference, estimate minus run, category by
category with its known causes. Where no run exists, the cell is judged on the estimate and says so. Each claim is
judged at the moment it is about: totals and their parts at the peak, "activations" as backward starts. Where
recipes straddle a claim, the row says "depends on recipe" and which way each goes. Rule: bench.render.fmt.

Every figure is a field of a cited record among the report's inputs (the variants, from a claims plan's
[[estimate]] tables: bench/plans/claims-7b.toml); nothing here estimates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench import recipes
from bench.render import fmt
from bench.render.select import recipe_name
from bench.schema import CATEGORIES, GB, device_name
from qlora.config import RunConfig

MODEL, SEQ = "llama-2-7b", 512
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COLUMNS = ("seed", "mixed", "peft")  # the matrix's columns: peft is peft-lora or peft-qlora, by method
SMALL = 5 * 10**6  # differences under 5 MB are not listed


def source_label(r: dict) -> str:
    """What a figure is, in words a reader cannot misread."""
    impl = r.get("optimizer_impl") or "default"
    opt = r["config"].get("optimizer", "adamw") if impl == "bitsandbytes" else f"AdamW {impl}"
    if r["source"] == "estimated":
        return f"estimated (CUDA, analytical; {opt})"
    where = device_name(r)
    if r["source"] == "extrapolated" and r.get("measured_at"):
        depths = ", ".join(str(m["layers"]) for m in r["measured_at"])
        return f"extrapolated ({where}; from {depths} layers to {r['layers']}; {opt})"
    return f"{r['source']} ({where}; {opt})"


def _targets(t) -> list:
    """LoRA targets as names: "all-linear" is Llama's seven projections."""
    return ALL7 if list(t) == ["all-linear"] else list(t)


def _value(config: dict, key: str):
    """A config's field, or RunConfig's default where a record predates the field (shard, world_size...)."""
    return config.get(key, getattr(RunConfig, key, None))


def _same(a, b) -> bool:
    return _targets(a) == _targets(b) if isinstance(b, (list, tuple)) and isinstance(a, (list, tuple)) else a == b


class Pool:
    """The report's records a claim can cite: runs (measured, extrapolated) and CUDA estimates, by setting."""

    def __init__(self, records: list[dict]):
        ok = [r for r in records if r["status"] == "ok" and r.get("bytes") and not r.get("quality")]
        self.runs = [r for r in ok if r["source"] != "estimated"]
        self.estimates = [r for r in ok if r["source"] == "estimated" and not r.get("fit")
                          and str(r["config"].get("device", "")).startswith("cuda")
                          and r["config"].get("layers") is None]
        self.fits = [r for r in records if r.get("fit") and r["status"] == "ok"]

    def find(self, kind: str, recipe: str, method: str, impl: str | None = None, **want) -> dict | None:
        """The newest run (kind "run") or CUDA estimate of `method` under `recipe` at the matrix's setting (LoRA
        r=16 on all seven projections, double quantisation, the recipe's checkpointing) with `want` changed; `impl`:
        that AdamW implementation only."""
        setting = {"model": MODEL, "batch_size": 1, "seq_len": SEQ, "method": method, "lora_r": 16,
                   "lora_targets": ALL7, "double_quant": True, "shard": "none", "world_size": 1,
                   "grad_checkpointing": recipes.get(recipe).settings.get("grad_checkpointing", False), **want}
        hits = [r for r in (self.runs if kind == "run" else self.estimates)
                if recipes.match(r["config"], ignoring=tuple(want)) == recipe
                and (impl is None or r.get("optimizer_impl") == impl)
                and all(_same(_value(r["config"], k), v) for k, v in setting.items())]
        # the newest; among estimates of a recipe, the one with torch's default AdamW unless `impl` says otherwise
        return max(hits, key=lambda r: (r["config"].get("adamw_impl", "default") == "default", r.get("created", "")),
                   default=None)

    def variants(self, method: str, recipe: str, **want) -> list[dict]:
        """Every CUDA estimate of `method` under `recipe` with `want`, whatever its rank, targets or length."""
        want = {"shard": "none", "world_size": 1, **want}  # one device's, unless asked
        return [r for r in self.estimates if r["config"]["method"] == method and r["config"]["model"] == MODEL
                and recipe_name(r["config"]) == recipe
                and all(_same(_value(r["config"], k), v) for k, v in want.items())]


@dataclass(frozen=True)
class Case:
    recipe: str
    impl: str | None = None  # Full FT: the AdamW implementation

    @property
    def label(self) -> str:
        return self.recipe + (f" ({self.impl} AdamW)" if self.impl else "")

    @property
    def column(self) -> str:
        return "peft" if self.recipe.startswith("peft") else self.recipe


FULL = (Case("seed", "foreach"), Case("seed", "fused"), Case("mixed", "foreach"), Case("mixed", "fused"))
LORA = (Case("seed"), Case("mixed"), Case("peft-lora"))
QLORA = (Case("seed"), Case("mixed"), Case("peft-qlora"))


def at_peak(category: str) -> Callable[[dict], int | None]:
    return lambda r: r["bytes"].get(category)


def backward_start(category: str) -> Callable[[dict], int | None]:
    return lambda r: (r.get("backward_start") or {}).get(category)


def base_bytes(r: dict) -> int:
    return r["bytes"]["weights"] + r["bytes"]["quant_state"]


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    method: str
    claimed: float  # bytes
    unit: str  # GB or MB
    value: Callable[[dict], int | None]
    moment: str
    cases: tuple[Case, ...]
    note: str = ""
    categories: tuple[str, ...] = ()  # the categories the figure is made of (none: all, a total)


CLAIMS = (
    Claim("full-7b-total", "7B Full FT needs ~64 GB", "full", 64e9, "GB", at_peak("peak"), "at the peak", FULL,
          "with foreach AdamW the peak is the optimizer step, where one copy of every gradient (13.5 GB of scratch) "
          "stands where the freed activations stood: the seed's 'holds' rests on that scratch; fused AdamW has none "
          "and peaks in backward; up to 2048 tokens the peak does not depend on sequence length"),
    Claim("full-7b-weights", "of which 14 GB weights", "full", 14e9, "GB", at_peak("weights"), "at the peak", FULL,
          "bf16 weights, 2 bytes a parameter (mixed precision keeps its fp32 masters in the optimizer)", ("weights",)),
    Claim("full-7b-gradients", "of which 14 GB gradients", "full", 14e9, "GB", at_peak("gradients"), "at the peak",
          FULL, "bf16 gradients, 2 bytes a parameter", ("gradients",)),
    Claim("full-7b-optimizer", "of which 28 GB optimizer state", "full", 28e9, "GB", at_peak("optimizer"),
          "at the peak", FULL, "bf16 moments are 4 bytes a parameter; mixed precision's fp32 moments and masters 12",
          ("optimizer",)),
    Claim("full-7b-activations", "of which ~8 GB activations", "full", 8e9, "GB", backward_start("activations"),
          "as backward starts", FULL, "what one batch keeps for backward, freed before the optimizer step",
          ("activations",)),
    Claim("lora-7b-total", "7B LoRA needs ~18 GB", "lora", 18e9, "GB", at_peak("peak"), "at the peak", LORA,
          "a bf16 base of 13.5 GB plus activations, which grow with batch x sequence"),
    Claim("lora-7b-adapters", "LoRA adapters ~50 MB", "lora", 50e6, "MB", at_peak("adapter"), "at the peak", LORA,
          "r=16 on all seven projections; PEFT keeps them in fp32 (twice the bytes)", ("adapter",)),
    Claim("lora-7b-optimizer", "LoRA optimizer state ~0.2 GB", "lora", 0.2e9, "GB", at_peak("optimizer"),
          "at the peak", LORA, "the adapters' AdamW state: bf16 moments (seed), fp32 moments and masters (mixed), "
          "fp32 moments of fp32 adapters (PEFT)", ("optimizer",)),
    Claim("qlora-7b-total", "7B QLoRA needs ~8 GB", "qlora", 8e9, "GB", at_peak("peak"), "at the peak", QLORA,
          "NF4 base with double quantisation, bf16 compute"),
    Claim("qlora-7b-base", "with a 3.5 GB 4-bit base", "qlora", 3.5e9, "GB", base_bytes, "at the peak", QLORA,
          "the packed 4-bit weights are 3.24 GB; what stays unquantised (embeddings, norms, lm_head) is bf16, or "
          "fp32 after prepare_model_for_kbit_training (peft-qlora), and the block constants add 0.1 GB",
          ("weights", "quant_state")),
)


def differences(claim: Claim, run: dict, est: dict) -> str:
    """Estimate minus run, category by category (the claim's own categories, at its moment), with the causes the
    records show for the categories that differ."""
    if claim.moment == "at the peak":
        a, b = run["bytes"], est["bytes"]
    else:
        a, b = run.get("backward_start") or {}, est.get("backward_start") or {}
    cats = claim.categories or CATEGORIES
    differ = [k for k in cats if abs(b.get(k, 0) - a.get(k, 0)) >= SMALL]
    if not differ:
        return "none over 5 MB"
    diffs = [f"{k} {'+' if b.get(k, 0) >= a.get(k, 0) else ''}{fmt.gb(b.get(k, 0) - a.get(k, 0))}" for k in differ]
    why = []
    in_step = "optimizer" in ((run.get("peak_at") or {}).get("phase"), (est.get("peak_at") or {}).get("phase"))
    if {"optimizer", "other"} & set(differ) and claim.moment == "at the peak" and in_step:
        if est.get("optimizer_impl") == "bitsandbytes":
            why.append(f"{est['config']['optimizer']} on CUDA, torch's {run.get('optimizer_impl')} AdamW in the run")
        elif run.get("optimizer_impl") != est.get("optimizer_impl"):
            why.append(f"AdamW {est.get('optimizer_impl')} on CUDA, {run.get('optimizer_impl')} in the run")
    if ("activations" in differ and b.get("activations", 0) < a.get("activations", 0) and claim.method != "full"
            and run["config"].get("lora_dropout", 0) > 0 and not run["config"].get("grad_checkpointing")):
        why.append("mostly dropout masks: 1-byte bool on CUDA, the input's dtype on CPU")
    if not why:
        why.append("not attributed: the two peak at different moments or the model does not cover a kernel's "
                   "allocation")
    return ", ".join(diffs) + f" ({'; '.join(why)})"


def cell(claim: Claim, case: Case, pool: Pool) -> dict:
    run = pool.find("run", case.recipe, claim.method, case.impl)
    est = pool.find("estimate", case.recipe, claim.method, case.impl)
    run_v, est_v = (None if r is None else claim.value(r) for r in (run, est))
    judged, rec = (run_v, run) if run_v is not None else (est_v, est)
    out = {"recipe": case.label, "column": case.column}
    if judged is None:
        return {**out, "verdict": "no record", "class": None, "records": []}
    text, err = fmt.verdict(claim.claimed, judged)
    out.update(ours=fmt.amount(judged, claim.unit), source=source_label(rec), record=rec["id"], verdict=text,
               error=round(err, 4), **{"class": fmt.classify(claim.claimed, judged)[0]},
               records=[x["id"] for x in (run, est) if x is not None])
    if est_v is not None and rec is not est:
        out.update(estimate=fmt.amount(est_v, claim.unit), estimate_source=source_label(est),
                   estimate_record=est["id"], estimate_verdict=fmt.verdict(claim.claimed, est_v)[0],
                   estimate_class=fmt.classify(claim.claimed, est_v)[0], difference=differences(claim, run, est))
    return out


def row_verdict(cells: list[dict]) -> str:
    """One verdict for a claim across recipes: the common class, or "depends on recipe" and which way each goes;
    then where a cell's CUDA estimate falls in another class than its run, and which cells have no record."""
    judged = [c for c in cells if c.get("class")]
    if not judged:
        return "no record"
    by = "recipe and AdamW implementation" if any(" AdamW)" in c["recipe"] for c in judged) else "recipe"
    classes = [c["class"] for c in judged]
    if len(set(classes)) == 1:
        text = classes[0] + (" under every recipe" if len(judged) == len(cells) > 1 else
                             f" under {', '.join(c['recipe'] for c in judged)}")
    else:
        parts = []
        for cls in fmt.CLASSES:
            names = [c["recipe"] for c in judged if c["class"] == cls]
            if names:
                parts.append(f"{cls} under {', '.join(names)}")
        text = f"depends on {by}: " + "; ".join(parts)
    other: dict[str, list[str]] = {}
    for c in judged:
        if c.get("estimate_class") and c["estimate_class"] != c["class"]:
            other.setdefault(c["estimate_class"], []).append(c["recipe"])
    if other:
        text += " (by the CUDA estimate: " + "; ".join(f"{k} under {', '.join(v)}" for k, v in other.items()) + ")"
    missing = [c["recipe"] for c in cells if not c.get("class")]
    if missing and judged:
        text += f"; not judged under {', '.join(missing)} (no record)"
    return text


def row(claim: Claim, pool: Pool, extra: tuple[str, list[str]] = ("", [])) -> dict:
    cells = [cell(claim, case, pool) for case in claim.cases]
    ids = [i for c in cells for i in c["records"]] + extra[1]
    return {"id": claim.id, "claim": claim.text, "claimed": fmt.amount(claim.claimed, claim.unit),
            "moment": claim.moment, "cells": cells, "verdict": row_verdict(cells),
            "true_when": claim.note + (f"; {extra[0]}" if extra[0] else ""), "records": list(dict.fromkeys(ids))}


# ---- what makes a claim true: the plan's variants -----------------------------------------------------------------


def activations_reach(pool: Pool, threshold: float = 8e9) -> tuple[str, list[str]]:
    """The batch x sequence where Full FT's activations (as backward starts) cross `threshold`, from the seed's
    estimates at several lengths."""
    points = sorted(((r["config"]["seq_len"], r) for r in pool.variants("full", "seed", batch_size=1,
                                                                         grad_checkpointing=False)
                     if "backward_start" in r and r.get("optimizer_impl") == "foreach"), key=lambda p: p[0])
    below = [p for p in points if p[1]["backward_start"]["activations"] < threshold]
    above = [p for p in points if p[1]["backward_start"]["activations"] >= threshold]
    if not below or not above:
        return "", []
    (s0, r0), (s1, r1) = below[-1], above[0]
    return ((f"Full FT's activations reach {threshold / GB:.0f} GB between batch 1 x {s0:,} "
            f"({fmt.gb(r0['backward_start']['activations'])}, record {r0['id']}) and 1 x {s1:,} tokens "
            f"({fmt.gb(r1['backward_start']['activations'])}, record {r1['id']}; estimated, CUDA)"),
            [r0["id"], r1["id"]])


def targets_text(targets: list[str]) -> str:
    return "all seven projections" if _targets(targets) == ALL7 else ",".join(t.removesuffix("_proj") for t in targets)


def adapter_variants(pool: Pool, claimed: float, value: Callable[[dict], int], unit: str) -> tuple[str, list[str]]:
    """Which rank, targets and adapter dtype make an adapter claim hold, from the plan's LoRA variants."""
    found = []
    seen = set()
    for recipe in ("seed", "peft-lora"):
        for r in pool.variants("lora", recipe, seq_len=SEQ, batch_size=1):
            c = r["config"]
            if c["lora_r"] == 16 and _targets(c["lora_targets"]) == ALL7:
                continue  # the matrix's own setting, judged in the cells
            text = (f"r={c['lora_r']} on {targets_text(c['lora_targets'])} under {recipe}: "
                    f"{fmt.amount(value(r), unit)} (record {r['id']})")
            if text not in seen:  # the same adapters with checkpointing on or off
                seen.add(text)
                found.append((abs(value(r) / claimed - 1), text, r["id"]))
    if not found:
        return "", []
    found.sort()
    holding = [f for f in found if f[0] <= fmt.HOLDS]
    shown = holding or found[:3]
    lead = "it holds for " if holding else f"none of the {len(found)} other settings planned holds; the nearest: "
    return lead + "; ".join(t for _, t, _ in shown) + " (estimated, CUDA)", [i for _, _, i in shown]


def extras(pool: Pool) -> dict[str, tuple[str, list[str]]]:
    return {"full-7b-activations": activations_reach(pool),
            "lora-7b-adapters": adapter_variants(pool, 50e6, at_peak("adapter"), "MB"),
            "lora-7b-optimizer": adapter_variants(pool, 0.2e9, at_peak("optimizer"), "GB")}


# ---- claims about two settings: a ratio, a saving -------------------------------------------------------------------


def pair_cell(label: str, column: str, claimed: float, unit: str, a: tuple, b: tuple,
              combine: Callable[[dict, dict], float]) -> dict:
    """A cell judged on combine(a, b) of two settings, each (run, estimate): the runs where both exist, else the
    estimates."""
    out = {"recipe": label, "column": column}
    pick = [(x, y) for x, y in ((a[0], b[0]), (a[1], b[1])) if x is not None and y is not None]
    if not pick:
        return {**out, "verdict": "no record", "class": None, "records": []}
    (x, y), est = pick[0], (a[1], b[1]) if all(e is not None for e in (a[1], b[1])) else None
    ours = combine(x, y)
    text, err = fmt.verdict(claimed, ours)
    used = [x, y, *(est or ())]
    out.update(ours=fmt.amount(ours, unit), source=source_label(x), record=x["id"], verdict=text,
               error=round(err, 4), **{"class": fmt.classify(claimed, ours)[0]},
               records=list(dict.fromkeys(r["id"] for r in used)))
    if est is not None and x is not est[0]:
        v = combine(*est)
        out.update(estimate=fmt.amount(v, unit), estimate_source=source_label(est[0]), estimate_record=est[0]["id"],
                   estimate_verdict=fmt.verdict(claimed, v)[0], estimate_class=fmt.classify(claimed, v)[0],
                   difference=f"{fmt.amount(v - ours, unit)} "
                   "(estimate minus run)" if unit != "x" else f"{v - ours:+.3f}x (estimate minus run)")
    return out


def both(pool: Pool, recipe: str, method: str, **want) -> tuple:
    return pool.find("run", recipe, method, **want), pool.find("estimate", recipe, method, **want)


def pair_rows(pool: Pool) -> list[dict]:
    half = [pair_cell(q, Case(q).column, 0.5, "x", both(pool, q, "qlora"), both(pool, lo, "lora"),
                      lambda x, y: x["bytes"]["peak"] / y["bytes"]["peak"])
            for q, lo in (("seed", "seed"), ("mixed", "mixed"), ("peft-qlora", "peft-lora"))]
    for c in half:
        c["recipe"] = {"peft-qlora": "peft-qlora / peft-lora"}.get(c["recipe"], c["recipe"])
    dq = [pair_cell(r, Case(r).column, 0.4e9, "GB", both(pool, r, "qlora", double_quant=False),
                    both(pool, r, "qlora"), lambda x, y: x["bytes"]["quant_state"] - y["bytes"]["quant_state"])
          for r in ("seed", "peft-qlora")]
    rows = []
    for cid, text, claimed, cells, note in (
        ("qlora-half-of-lora", "QLoRA cuts memory roughly in half compared with LoRA", "0.5x", half,
         "the peak of QLoRA over LoRA's under the same recipe, at 512 tokens; it grows with sequence length as "
         "activations (the same for both under seed and mixed) come to dominate; under the PEFT recipes QLoRA's "
         "activations are larger (prepare_model_for_kbit_training keeps norms and embeddings in fp32)"),
        ("double-quant-saving", "double quantisation saves ~0.4 GB on a 7B model", "0.4 GB", dq,
         "quant_state without double quantisation minus with it: 0.373 bits a quantised parameter (fp32 block "
         "constants per 64 weights become 8-bit, plus one fp32 per 256 blocks), so 0.4 GB needs about 8.6B "
         "quantised parameters; Llama-2-7B quantises 6.48B"),
    ):
        ids = [i for c in cells for i in c["records"]]
        rows.append({"id": cid, "claim": text, "claimed": claimed, "moment": "at the peak", "cells": cells,
                     "verdict": row_verdict(cells), "true_when": note, "records": list(dict.fromkeys(ids))})
    return rows


def memory_rows(records: list[dict]) -> list[dict]:
    pool = Pool(records)
    more = extras(pool)
    rows = [row(c, pool, more.get(c.id, ("", []))) for c in CLAIMS] + pair_rows(pool)
    return [r for r in rows if any(c.get("class") for c in r["cells"])]
