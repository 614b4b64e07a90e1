"""The folk claims, one verdict each, from result records: the setting it is judged under, the claimed value, ours,
where ours comes from (measured, extrapolated or estimated, with record ids) and the setting that would make it true.

Verdicts: "holds" (within 10%), "off by X%" (within 50%), "refuted" (further, or a yes/no claim that is false).
Claims are written in GB; so are our values here (10^9 bytes; the tables use GiB). The memory claims are judged
on the estimate records' CUDA figures at sequence 512 (where the measured runs of this machine were taken at 256
they are listed beside them); quality claims on the quality records, against their 95% intervals. Every figure
quoted is a field of a record: the alternatives (another precision, rank or sequence length, the longest sequence
that fits a card) are estimate records too (bench.modelling.records.derived).
"""

from __future__ import annotations

from bench.modelling import gpus  # the card catalog (names and sizes), not the estimator
from bench.render.select import Estimates, quality_sets
from bench.schema import GB, METHODS, GiB, device_name

TOLERANCE, FAR = 0.10, 0.50
MODEL, SEQ = "llama-2-7b", 512
FOLK_QUALITY = {"lora": 0.97, "qlora": 0.95}  # the share of Full FT's quality each method is said to keep


def verdict(claimed: float, ours: float) -> tuple[str, float]:
    err = ours / claimed - 1
    if abs(err) <= TOLERANCE:
        return f"holds (within 10%: {err:+.1%})", err
    return (f"off by {err:+.1%}" if abs(err) <= FAR else f"refuted (off by {err:+.1%})"), err


def setting(c: dict, source: str) -> str:
    bits = [c["model"], f"batch {c['batch_size']} x seq {c['seq_len']}", c["precision"], c["optimizer"],
            f"checkpointing {'on' if c['grad_checkpointing'] else 'off'}"]
    if c["method"] != "full":
        bits.append(f"LoRA r={c['lora_r']} on {','.join(c['lora_targets'])}")
    if c["method"] == "qlora":
        bits.append(f"{c['quant_type']}{' + double quant' if c['double_quant'] else ''}, {c['compute_dtype']} compute")
    return "; ".join(bits) + f" ({source})"


def find(records: list[dict], source: str | tuple, **want) -> dict | None:
    sources = (source,) if isinstance(source, str) else source
    for r in records:
        c = r["config"]
        if (r["source"] in sources and r["status"] == "ok" and not r.get("quality")
                and all(c.get(k) == v for k, v in want.items())):
            return r
    return None


def memory_claims(records: list[dict]) -> list[dict]:
    base = dict(model=MODEL, seq_len=SEQ, batch_size=1, grad_checkpointing=False)
    plain = [r for r in records if not r.get("fit") and not r.get("purpose")]
    est = {m: find(plain, "estimated", method=m, double_quant=True, **base) for m in METHODS}
    if not all(est.values()):
        return []
    estimates = Estimates(records)
    runs = {m: find(records, ("measured", "extrapolated"), model=MODEL, method=m, grad_checkpointing=False)
            for m in METHODS}

    def peak_gb(method: str, **changes) -> str:
        peak = estimates.peak(est[method]["config"], **changes)
        return "n/a" if peak is None else f"{peak / GB:.1f}"

    def bytes_of(method: str, category: str, **changes) -> str:
        r = estimates.of(est[method]["config"], **changes)
        return "n/a" if r is None else f"{r['bytes'][category] / 1e6:.0f}"

    def beside(m):
        r = runs[m]
        if r is None:
            return None
        c = r["config"]
        return (f"{r['source']} on {device_name(r)} at batch {c['batch_size']} x seq {c['seq_len']}: "
                f"{r['bytes']['peak'] / GB:.2f} GB (record {r['id']})")

    rows = []

    def add(cid, claim, method, claimed_gb, ours_bytes, true_when):
        r = est[method]
        v, err = verdict(claimed_gb, ours_bytes / GB)
        run = runs[method] if cid.endswith("-total") else None
        rows.append({"id": cid, "claim": claim, "setting": setting(r["config"], "estimated, CUDA"),
                     "claimed": f"{claimed_gb:g} GB", "ours": f"{ours_bytes / GB:.2f} GB", "error": round(err, 4),
                     "source": "estimated", "records": [r["id"]] + ([run["id"]] if run else []),
                     "also": beside(method) if run else None, "verdict": v, "true_when": true_when})

    full, lora, qlora = (est[m]["bytes"] for m in METHODS)
    add("full-7b-total", "7B Full FT needs ~64 GB", "full", 64, full["peak"],
        f"bf16 weights, gradients and AdamW moments (2+2+4 bytes a parameter) put the peak at the optimizer step, "
        f"independent of sequence length up to 2048: {full['peak'] / GB:.1f} GB. With fp32 master weights and "
        f"moments (mixed precision) it is {peak_gb('full', precision='mixed')} GB")
    add("full-7b-weights", "of which 14 GB weights", "full", 14, full["weights"], "bf16 weights: 2 bytes a parameter")
    add("full-7b-gradients", "of which 14 GB gradients", "full", 14, full["gradients"], "bf16 gradients")
    add("full-7b-optimizer", "of which 28 GB optimizer state", "full", 28, full["optimizer"],
        "AdamW's two moments in bf16 (4 bytes a parameter); fp32 moments would be twice that")
    rows += activation_claims(est["full"], runs["full"], estimates)
    lc = est["lora"]["config"]
    add("lora-7b-total", "7B LoRA needs ~18 GB", "lora", 18, lora["peak"],
        f"bf16 base, r={lc['lora_r']} on all seven projections, sequence {lc['seq_len']}; it grows with sequence "
        f"length (activations), e.g. {peak_gb('lora', seq_len=2048)} GB at 2048 without checkpointing")
    add("lora-7b-adapters", "LoRA adapters ~50 MB", "lora", 0.05, lora["adapter"],
        f"adapter bytes scale with rank and targets (bf16): r=16 on all seven projections is "
        f"{lora['adapter'] / 1e6:.0f} MB, r=8 on all seven {bytes_of('lora', 'adapter', lora_r=8)} MB, r=16 on q "
        f"and v only {bytes_of('lora', 'adapter', lora_r=16, lora_targets=['q_proj', 'v_proj'])} MB")
    add("lora-7b-optimizer", "LoRA optimizer state ~0.2 GB", "lora", 0.2, lora["optimizer"],
        "AdamW moments of the adapters in bf16; in fp32 (mixed precision, with master copies) it is about 3x")
    add("qlora-7b-total", "7B QLoRA needs ~8 GB", "qlora", 8, qlora["peak"],
        f"NF4 base with double quantisation and bf16 compute, sequence {SEQ}; checkpointing takes it to "
        f"{peak_gb('qlora', grad_checkpointing=True)} GB")
    add("qlora-7b-base", "with a 3.5 GB 4-bit base", "qlora", 3.5, qlora["weights"] + qlora["quant_state"],
        "the packed 4-bit decoder weights alone are 3.24 GB; embeddings, norms and lm_head stay bf16 (0.5 GB) and "
        "the block constants add 0.1 GB")
    ratio = qlora["peak"] / lora["peak"]
    v, err = verdict(0.5, ratio)
    q2048, l2048 = (estimates.peak(est[m]["config"], seq_len=2048) for m in ("qlora", "lora"))
    r2048 = "n/a" if q2048 is None or l2048 is None else f"{q2048 / l2048:.2f}x"
    rows.append({"id": "qlora-half-of-lora", "claim": "QLoRA cuts memory roughly in half compared with LoRA",
                 "setting": setting(est["qlora"]["config"], "estimated, CUDA"), "claimed": "0.5x",
                 "ours": f"{ratio:.2f}x", "error": round(err, 4), "source": "estimated",
                 "records": [est["qlora"]["id"], est["lora"]["id"]], "also": None, "verdict": v,
                 "true_when": f"short sequences, where the weights dominate; at 2048 tokens without checkpointing "
                              f"the ratio is {r2048} (activations are the same for both)"})
    nodq = find(records, "estimated", method="qlora", double_quant=False, **base)
    if nodq is not None:
        saved = nodq["bytes"]["quant_state"] - qlora["quant_state"]
        v, err = verdict(0.4, saved / GB)
        rows.append({"id": "double-quant-saving", "claim": "double quantisation saves ~0.4 GB on a 7B model",
                     "setting": setting(est["qlora"]["config"], "estimated, CUDA"), "claimed": "0.4 GB",
                     "ours": f"{saved / GB:.3f} GB", "error": round(err, 4), "source": "estimated",
                     "records": [est["qlora"]["id"], nodq["id"]], "also": None, "verdict": v,
                     "true_when": "the saving is 0.373 bits a quantised parameter (fp32 block constants per 64 "
                                  "weights become 8-bit, plus one fp32 per 256 blocks): 0.4 GB needs about 8.6B "
                                  "quantised parameters; Llama-2-7B quantises 6.48B"})
    if all("cards" in r for r in est.values()):
        rows += gpu_claims(est, estimates)
    return rows


def activation_claims(full: dict, run: dict | None, estimates: Estimates) -> list[dict]:
    """"~8 GB activations" is about what a batch keeps for backward: judged on `activations` as backward starts
    (`backward_start`), never at the step's peak, where Full FT's activations are already freed."""
    r = estimates.of(full["config"])
    if r is None or "backward_start" not in r:
        return []
    ours = r["backward_start"]["activations"]
    v, err = verdict(8, ours / GB)
    longer = estimates.of(full["config"], seq_len=2048)
    at_2048 = ("" if longer is None or "backward_start" not in longer else
               f"; at batch 1 x seq 2048 {longer['backward_start']['activations'] / GB:.1f} GB (record {longer['id']})")
    also, ids = None, [r["id"]] + ([longer["id"]] if at_2048 else [])
    if run is not None and "backward_start" in run:
        c = run["config"]
        also = (f"{run['source']} on {device_name(run)} at batch {c['batch_size']} x seq {c['seq_len']}: "
                f"{run['backward_start']['activations'] / GB:.2f} GB as backward starts (record {run['id']})")
        ids.append(run["id"])
    return [{"id": "full-7b-activations", "claim": "of which ~8 GB activations",
             "setting": setting(r["config"], "estimated, CUDA; as backward starts"), "claimed": "8 GB",
             "ours": f"{ours / GB:.2f} GB", "error": round(err, 4), "source": "estimated", "records": ids,
             "also": also, "verdict": v,
             "true_when": f"activations grow with batch x sequence (they are freed before the optimizer step, "
                          f"where Full FT peaks){at_2048}"}]


def gpu_claims(est: dict, estimates: Estimates) -> list[dict]:
    rows = []

    def longest(method: str, ckpt: bool = False) -> str:
        config = {**est[method]["config"], "layers": None}
        if not estimates.has_fit(config, "rtx4090", grad_checkpointing=ckpt):
            return "n/a"
        n = estimates.longest(config, "rtx4090", grad_checkpointing=ckpt)
        return "none" if n is None else f"{n:,}"

    lora_4090, qlora_4090, qlora_4090_ckpt = longest("lora"), longest("qlora"), longest("qlora", ckpt=True)
    for method, claim, cards, want in (
        ("full", "Full FT of 7B needs 2x A100", ("a100-40gb", "a100-80gb"), 2),
        ("lora", "LoRA of 7B needs 1x A100", ("a100-40gb", "a100-80gb"), 1),
        ("qlora", "QLoRA of 7B fits 1x RTX 4090 (24 GB)", ("rtx4090",), 1),
    ):
        r = est[method]
        parts, holds = [], []
        for card in cards:
            fit = r["cards"][card]
            n = fit["cards_needed"]  # cards whose memory adds up to the need (state sharded)
            parts.append(f"{gpus.CATALOG[card].label}: {'fits one' if n == 1 else f'{n} cards, sharded'} "
                         f"(headroom on one {fit['headroom_bytes'] / GiB:+.1f} GiB)")
            holds.append(n == want)
        v = "holds" if all(holds) else "refuted" if not any(holds) else "holds for " + ", ".join(
            gpus.CATALOG[c].label for c, h in zip(cards, holds, strict=True) if h) + " only"
        true_when = {"full": "an A100 80GB holds the whole bf16 Full FT of 7B at sequence 512 (one card); "
                             "two are needed only with 40 GB cards, with the state sharded (FSDP or ZeRO)",
                     "lora": f"it also fits a 24 GB card up to {lora_4090} tokens without checkpointing; "
                             "an A100 is needed beyond that (or checkpointing)",
                     "qlora": f"on an RTX 4090 up to {qlora_4090} tokens without checkpointing and "
                              f"{qlora_4090_ckpt} with it (estimated)"}[method]
        rows.append({"id": f"gpus-{method}", "claim": claim, "setting": setting(r["config"], "estimated, CUDA"),
                     "claimed": f"{want}x", "ours": "; ".join(parts), "error": None, "source": "estimated",
                     "records": [r["id"]], "also": None, "verdict": v, "true_when": true_when})
    trials = {m: {c: est[m]["cards"][c]["trials"] for c in ("rtx4090", "a100-80gb")} for m in est}
    more = all(trials["qlora"][c] > trials["lora"][c] for c in ("rtx4090", "a100-80gb"))
    rows.append({"id": "qlora-more-trials", "claim": "QLoRA fits more hyper-parameter search trials per GPU",
                 "setting": setting(est["qlora"]["config"], "estimated, CUDA"), "claimed": "more than LoRA",
                 "ours": "; ".join(f"{c}: full {trials['full'][c]}, lora {trials['lora'][c]}, "
                                   f"qlora {trials['qlora'][c]}" for c in ("rtx4090", "a100-80gb")),
                 "error": None, "source": "estimated", "records": [est[m]["id"] for m in est], "also": None,
                 "verdict": "holds" if more else "refuted",
                 "true_when": "each trial a separate process with its own CUDA context; trials = card // "
                              "(peak + 5% + 0.5 GiB)"})
    return rows


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
            v = (f"holds ({gap:.1f} points, at most ~2)" if gap <= 2 * (1 + TOLERANCE)
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
    return memory_claims(records) + quality_claims(records)


def markdown(rows: list[dict]) -> str:
    lines = ["# Claims verdicts", "",
             "Generated by `qlora-bench report` from result records. GB = 10^9 bytes, as the claims are written. "
             "Verdicts: *holds* within 10%, *off by X%* within 50%, *refuted* beyond that (or a yes/no claim that "
             "is false); quality claims against the 95% bootstrap interval.", "",
             "| claim | setting | claimed | ours | verdict | true when | source (records) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        also = f" Also: {r['also']}." if r.get("also") else ""
        lines.append(f"| {r['claim']} | {r['setting']} | {r['claimed']} | {r['ours']} | **{r['verdict']}** | "
                     f"{r['true_when'].rstrip('.')}.{also} | {r['source']} ({', '.join(r['records'])}) |")
    return "\n".join(lines) + "\n"
