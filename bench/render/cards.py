"""The claims about cards, judged under each recipe: how many GPUs a 7B fine-tune needs, the longest sequence that
fits an RTX 4090, and whether QLoRA buys more hyper-parameter search per card.

A card's need is the CUDA estimate's (`cards` of an estimate record: peak tensor bytes plus the allocator reserve
and CUDA context that bench.modelling.gpus assumes; no GPU has measured them yet), the run's measured peak beside
it. "More trials" is judged on cost, not memory alone: trials per card (estimated) times each trial's throughput
(tokens/s of the recipe's run, on the device it ran on).
"""

from __future__ import annotations

from bench.modelling import gpus  # the card catalog (names, sizes, assumed context and reserve), not the estimator
from bench.render import fmt
from bench.render.matrix import FULL, LORA, QLORA, SEQ, Case, Pool, source_label
from bench.schema import GiB, fit_base, run_key

GPU_CLAIMS = (("lora", "LoRA of 7B needs 1x A100", ("a100-40gb", "a100-80gb"), 1, LORA),
              ("qlora", "QLoRA of 7B fits 1x RTX 4090 (24 GB)", ("rtx4090",), 1, QLORA))
TRIAL_CARDS = ("rtx4090", "a100-80gb")
ASSUMED = (f"card needs are estimated: tensor peak + {gpus.ALLOCATOR_RESERVE:.0%} allocator reserve + "
           f"{gpus.CUDA_CONTEXT_BYTES / GiB:.1f} GiB CUDA context, both assumed")


def short(card: str) -> str:
    return gpus.CATALOG[card].label.replace("NVIDIA ", "").replace("GeForce ", "")


def longest(pool: Pool, est: dict, card: str) -> tuple[str, str | None]:
    """The longest sequence of an estimate's setting that fits `card`, from a fit record searched from it."""
    key = run_key(est["config"])
    for f in pool.fits:
        if f["fit"]["gpu"] == card and run_key(fit_base(f)) == key:
            n = f["fit"]["largest"]
            cap = " (the model's length cap, not memory)" if n is not None and n == f["fit"].get("upper") else ""
            return ("no length" if n is None else f"{n:,} tokens{cap}"), f["id"]
    return "", None


def card_cell(pool: Pool, method: str, case: Case, cards: tuple[str, ...], want: int) -> dict:
    est = pool.find("estimate", case.recipe, method, case.impl)
    run = pool.find("run", case.recipe, method, case.impl)
    out = {"recipe": case.label, "column": case.column}
    if est is None or "cards" not in est or not all(c in est["cards"] for c in cards):
        return {**out, "verdict": "no record", "class": None, "records": []}
    parts, holds, ids = [], [], [est["id"]]
    for card in cards:
        fit = est["cards"][card]
        n = fit["cards_needed"]
        room = fit["headroom_bytes"]
        parts.append(f"{short(card)}: {'fits one' if n == 1 else f'{n} cards, sharded'} "
                     f"({'+' if room >= 0 else ''}{fmt.gb(room)} headroom on one)")
        holds.append(n <= want if want == 1 else n == want)
    also = ""
    if method != "full":  # the 24 GB card an adapter claim is measured against, and how far it goes
        text, fid = longest(pool, est, "rtx4090")
        if fid:
            fits = est["cards"].get("rtx4090", {}).get("cards_needed") == 1
            ids.append(fid)
            if "rtx4090" in cards:
                parts[cards.index("rtx4090")] += f"; the longest sequence that fits: {text}"
            else:
                parts.append(f"{short('rtx4090')}: {'fits one' if fits else 'does not fit'} at {SEQ} tokens; the "
                             f"longest sequence that fits: {text}")
                also = f" (one {short('rtx4090')} also fits it)" if fits else ""
    verdict = ("holds" if all(holds) else "refuted" if not any(holds) else "holds for " + ", ".join(
        short(c) for c, h in zip(cards, holds, strict=True) if h) + " only") + also
    out.update(ours="; ".join(parts), source=source_label(est), record=est["id"], verdict=verdict,
               **{"class": "holds" if all(holds) else "refuted" if not any(holds) else "partly"},
               records=ids + ([run["id"]] if run else []))
    if run is not None:
        out["run_peak"] = f"{fmt.gb(run['bytes']['peak'])} tensor peak, {source_label(run)}"
    return out


def trials_cell(pool: Pool, recipe_of: dict[str, str], column: str) -> dict:
    """Trials per card and tokens/s per card of each method under one column's recipes."""
    found = {m: (pool.find("estimate", r, m, "foreach" if m == "full" else None),
                 pool.find("run", r, m, "foreach" if m == "full" else None)) for m, r in recipe_of.items()}
    out = {"recipe": " / ".join(dict.fromkeys(recipe_of.values())), "column": column}
    if any(e is None or "cards" not in e for e, _ in found.values()):
        return {**out, "verdict": "no record", "class": None, "records": []}
    parts, more_trials, more_tokens = [], True, True
    for card in TRIAL_CARDS:
        n = {m: e["cards"][card]["trials"] for m, (e, _) in found.items()}
        tps = {m: (run or {}).get("tokens_per_second") for m, (_, run) in found.items()}
        per_card = {m: None if tps[m] is None else n[m] * tps[m] for m in n}
        parts.append(f"{short(card)}: trials " + ", ".join(f"{m} {n[m]}" for m in n)
                     + "; tokens/s per card (an upper bound) " + ", ".join(f"{m} {'n/a' if v is None else f'{v:.1f}'}"
                                                         for m, v in per_card.items()))
        more_trials &= n["qlora"] > n["lora"]
        if None in (per_card["qlora"], per_card["lora"]):
            more_tokens = None
        elif more_tokens is not None:
            more_tokens &= per_card["qlora"] > per_card["lora"]
    on_gpu = any(((run or {}).get("env") or {}).get("device", {}).get("type") == "cuda" for _, run in found.values())
    if not more_trials:
        verdict, cls = "refuted on memory (no more trials per card)", "refuted"
    elif more_tokens is None or not on_gpu:
        # CPU step times (extrapolated from reduced depth) say nothing of a GPU's, and trials sharing a card do not
        # scale its throughput linearly: cost is judged only on a GPU's measured tokens/s.
        verdict, cls = "holds on memory (more trials per card); cost not judged: no GPU throughput", "partly"
    else:
        verdict = ("holds: more trials and more tokens/s per card" if more_tokens else
                   "depends: more trials, fewer tokens/s per card")
        cls = "holds" if more_tokens else "partly"
    ids = [x["id"] for e, run in found.values() for x in (e, run) if x is not None]
    speed = sorted({source_label(run) for _, run in found.values() if run is not None})
    return {**out, "ours": "; ".join(parts), "source": "trials estimated (CUDA); tokens/s from "
            + ("; ".join(speed) or "no run"), "record": ids[0], "verdict": verdict,
            "class": cls, "records": ids}


SHARDED = ("sharded per rank: FSDP2 full shard estimated for rank 0 (the largest); the estimator's sharded moments "
           "are checked against torchrun measurements per rank in reports/estimate-validation-sharded; ")
SEVENTY_B = "llama-2-70b"


def on(est: dict, card: str) -> tuple[bool, str]:
    """Whether an estimate's (per-rank) peak fits `card`, and its headroom as text."""
    room = est["cards"][card]["headroom_bytes"]
    return room >= 0, f"{'+' if room >= 0 else ''}{fmt.gb(room)} headroom"


def sharded_cell(pool: Pool, case: Case, cards: tuple[str, ...]) -> dict:
    """"Full FT of 7B needs 2x A100" under one recipe: one card (unsharded) against two (FSDP, per rank)."""
    one = pool.find("estimate", case.recipe, "full", case.impl)
    two = pool.find("estimate", case.recipe, "full", case.impl, shard="fsdp", world_size=2)
    out = {"recipe": case.label, "column": case.column}
    if None in (one, two) or not all(c in one.get("cards", {}) and c in two.get("cards", {}) for c in cards):
        return {**out, "verdict": "no record", "class": None, "records": []}
    parts, holds = [], []
    for card in cards:
        fits_one, room_one = on(one, card)
        fits_two, room_two = on(two, card)
        parts.append(f"{short(card)}: one card {'fits' if fits_one else 'does not fit'} ({room_one}); two, "
                     f"{fmt.gb(two['bytes']['peak'])} per rank, {'fit' if fits_two else 'do not fit'} ({room_two})")
        holds.append(fits_two and not fits_one)
    verdict = ("holds" if all(holds) else "refuted" if not any(holds) else "holds for " + ", ".join(
        short(c) for c, h in zip(cards, holds, strict=True) if h) + " only")
    run = pool.find("run", case.recipe, "full", case.impl, shard="fsdp", world_size=2)
    out.update(ours="; ".join(parts), source=SHARDED + source_label(two), record=two["id"], verdict=verdict,
               **{"class": "holds" if all(holds) else "refuted" if not any(holds) else "partly"},
               records=[two["id"], one["id"]] + ([run["id"]] if run else []))
    if run is not None:
        out["run_peak"] = f"{fmt.gb(run['bytes']['peak'])} per-rank tensor peak, {source_label(run)}"
    return out


def seventy_cell(pool: Pool, case: Case) -> dict:
    """"70B QLoRA trains on 2 x 24 GB" under one recipe, with checkpointing (as the FSDP+QLoRA system ran it)."""
    est = pool.find("estimate", case.recipe, "qlora", model=SEVENTY_B, shard="fsdp", world_size=2,
                    grad_checkpointing=True)
    out = {"recipe": case.label + ", checkpointing", "column": case.column}
    if est is None or "rtx4090" not in est.get("cards", {}):
        return {**out, "verdict": "no record", "class": None, "records": []}
    fits, room = on(est, "rtx4090")
    text, fid = longest(pool, est, "rtx4090")
    ours = f"{fmt.gb(est['bytes']['peak'])} per rank at {SEQ} tokens ({room} on a 24 GB card)"
    if fid:
        ours += f"; the longest sequence per rank that fits: {text}"
    verdict = (f"holds at {SEQ} tokens per rank, without CPU offload" if fits
               else "refuted without CPU offload (not modelled: the system behind the claim also offloads)")
    return {**out, "ours": ours, "source": SHARDED + source_label(est), "record": est["id"], "verdict": verdict,
            "class": "holds" if fits else "refuted", "records": [est["id"]] + ([fid] if fid else [])}


def card_rows(pool: Pool) -> list[dict]:
    cells = [sharded_cell(pool, case, ("a100-40gb", "a100-80gb")) for case in FULL]
    rows = [{"id": "gpus-full", "claim": "Full FT of 7B needs 2x A100", "claimed": "2x", "moment": "at the peak",
             "cells": cells, "verdict": verdicts(cells), "true_when": ASSUMED + "; two cards: FSDP, per rank",
             "records": list(dict.fromkeys(i for c in cells for i in c["records"]))}]
    cells = [seventy_cell(pool, case) for case in QLORA if case.recipe != "mixed"]
    rows.append({"id": "gpus-qlora-70b", "claim": "QLoRA trains a 70B model on 2 x 24 GB cards (Answer.AI's "
                 "FSDP+QLoRA, 2024)", "claimed": "2x 24 GB", "moment": "at the peak", "cells": cells,
                 "verdict": verdicts(cells),
                 "true_when": ASSUMED + "; FSDP per rank, batch 1, gradient checkpointing, no CPU offload; the 4-bit "
                              "data sharded, its constants replicated (QLoRA cannot be sharded on this stack: "
                              "estimated only)",
                 "records": list(dict.fromkeys(i for c in cells for i in c["records"]))})
    for method, text, cards, want, cases in GPU_CLAIMS:
        cells = [card_cell(pool, method, case, cards, want) for case in cases]
        rows.append({"id": f"gpus-{method}", "claim": text, "claimed": f"{want}x", "moment": "at the peak",
                     "cells": cells, "verdict": verdicts(cells), "true_when": ASSUMED,
                     "records": list(dict.fromkeys(i for c in cells for i in c["records"]))})
    cells = [trials_cell(pool, {"full": "seed", "lora": "seed", "qlora": "seed"}, "seed"),
             trials_cell(pool, {"full": "mixed", "lora": "mixed", "qlora": "mixed"}, "mixed"),
             trials_cell(pool, {"lora": "peft-lora", "qlora": "peft-qlora"}, "peft")]
    rows.append({"id": "qlora-more-trials", "claim": "QLoRA fits more hyper-parameter search trials per GPU, "
                 "reducing the cost of the search", "claimed": "more than LoRA", "moment": "at the peak",
                 "cells": cells, "verdict": verdicts(cells),
                 "true_when": "each trial a separate process with its own CUDA context; trials = card // (peak + "
                              "reserve + context); tokens/s per card = trials x one trial's tokens/s, an upper bound "
                              "(trials sharing a card do not scale linearly), shown for the device the runs ran on; "
                              "the cost half is judged only on a GPU's measured throughput",
                 "records": list(dict.fromkeys(i for c in cells for i in c["records"]))})
    return [r for r in rows if any(c.get("class") for c in r["cells"])]


def verdicts(cells: list[dict]) -> str:
    judged = [c for c in cells if c.get("class")]
    if not judged:
        return "no record"
    by_verdict: dict[str, list[str]] = {}
    for c in judged:
        by_verdict.setdefault(c["verdict"], []).append(c["recipe"])
    if len(by_verdict) == 1:
        return ("under every recipe: " if len(judged) > 1 else "") + judged[0]["verdict"]
    return "depends on recipe: " + "; ".join(f"{v} under {', '.join(names)}" for v, names in by_verdict.items())
