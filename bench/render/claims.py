"""The folk claims, one verdict each, from result records: the setting it is judged under, the claimed value, ours,
where ours comes from (measured, extrapolated or estimated, with record ids) and the setting that would make it true.

Verdicts: "holds" (within 10%), "off by X%" (within 50%), "refuted" (further, or a yes/no claim that is false).
Claims are written in GB; so are our values here (10^9 bytes; the tables use GiB). The memory claims are judged
on the estimator's CUDA figures at sequence 512 (where the measured runs of this machine were taken at 256 they are
listed beside them); quality claims on the quality records, against their 95% intervals.
"""

from __future__ import annotations

from dataclasses import replace

from bench.modelling import gpus
from qlora.config import RunConfig

GB, GiB = 10**9, 2**30
TOLERANCE, FAR = 0.10, 0.50
MODEL, SEQ = "llama-2-7b", 512


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


def _estimate(cfg: RunConfig) -> dict:
    from bench.modelling.estimate import estimate_bytes

    return estimate_bytes(cfg)["bytes"]


def memory_claims(records: list[dict]) -> list[dict]:
    base = dict(model=MODEL, seq_len=SEQ, batch_size=1, grad_checkpointing=False)
    est = {m: find(records, "estimated", method=m, double_quant=True, **base) for m in ("full", "lora", "qlora")}
    if not all(est.values()):
        return []
    runs = {m: find(records, ("measured", "extrapolated"), model=MODEL, method=m, grad_checkpointing=False)
            for m in ("full", "lora", "qlora")}

    def beside(m):
        r = runs[m]
        if r is None:
            return None
        c = r["config"]
        return (f"{r['source']} on {r['env']['device']['name']} at batch {c['batch_size']} x seq {c['seq_len']}: "
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

    f, lo, q = (est[m]["bytes"] for m in ("full", "lora", "qlora"))
    fc = RunConfig.from_dict(est["full"]["config"])
    mixed = _estimate(replace(fc, precision="mixed"))["peak"]
    add("full-7b-total", "7B Full FT needs ~64 GB", "full", 64, f["peak"],
        f"bf16 weights, gradients and AdamW moments (2+2+4 bytes a parameter) put the peak at the optimizer step, "
        f"independent of sequence length up to 2048: {f['peak'] / GB:.1f} GB. With fp32 master weights and moments "
        f"(mixed precision) it is {mixed / GB:.1f} GB")
    add("full-7b-weights", "of which 14 GB weights", "full", 14, f["weights"], "bf16 weights: 2 bytes a parameter")
    add("full-7b-gradients", "of which 14 GB gradients", "full", 14, f["gradients"], "bf16 gradients")
    add("full-7b-optimizer", "of which 28 GB optimizer state", "full", 28, f["optimizer"],
        "AdamW's two moments in bf16 (4 bytes a parameter); fp32 moments would be twice that")
    act = f["activations"] + f["other"]
    add("full-7b-activations", "of which ~8 GB activations", "full", 8, act,
        f"at the peak (the optimizer step) the activations are already freed; what takes their place is "
        f"foreach AdamW's temporaries ({f['other'] / GB:.1f} GB, counted as 'other'). Activations at the start of "
        f"backward depend on batch x sequence (see the peak-vs-sequence chart)")
    lc = RunConfig.from_dict(est["lora"]["config"])
    add("lora-7b-total", "7B LoRA needs ~18 GB", "lora", 18, lo["peak"],
        f"bf16 base, r={lc.lora_r} on all seven projections, sequence {lc.seq_len}; it grows with sequence length "
        f"(activations), e.g. {est_at(lc, 2048) / GB:.1f} GB at 2048 without checkpointing")
    qv = _estimate(replace(lc, lora_r=16, lora_targets=("q_proj", "v_proj")))["adapter"]
    r8 = _estimate(replace(lc, lora_r=8))["adapter"]
    add("lora-7b-adapters", "LoRA adapters ~50 MB", "lora", 0.05, lo["adapter"],
        f"adapter bytes scale with rank and targets (bf16): r=16 on all seven projections is "
        f"{lo['adapter'] / 1e6:.0f} MB, r=8 on all seven {r8 / 1e6:.0f} MB, r=16 on q and v only {qv / 1e6:.0f} MB")
    add("lora-7b-optimizer", "LoRA optimizer state ~0.2 GB", "lora", 0.2, lo["optimizer"],
        "AdamW moments of the adapters in bf16; in fp32 (mixed precision, with master copies) it is about 3x")
    add("qlora-7b-total", "7B QLoRA needs ~8 GB", "qlora", 8, q["peak"],
        f"NF4 base with double quantisation and bf16 compute, sequence {SEQ}; checkpointing takes it to "
        f"{est_at(RunConfig.from_dict(est['qlora']['config']), SEQ, ckpt=True) / GB:.1f} GB")
    add("qlora-7b-base", "with a 3.5 GB 4-bit base", "qlora", 3.5, q["weights"] + q["quant_state"],
        "the packed 4-bit decoder weights alone are 3.24 GB; embeddings, norms and lm_head stay bf16 (0.5 GB) and "
        "the block constants add 0.1 GB")
    ratio = q["peak"] / lo["peak"]
    v, err = verdict(0.5, ratio)
    r2048 = est_at(RunConfig.from_dict(est["qlora"]["config"]), 2048) / est_at(lc, 2048)
    rows.append({"id": "qlora-half-of-lora", "claim": "QLoRA cuts memory roughly in half compared with LoRA",
                 "setting": setting(est["qlora"]["config"], "estimated, CUDA"), "claimed": "0.5x",
                 "ours": f"{ratio:.2f}x", "error": round(err, 4), "source": "estimated",
                 "records": [est["qlora"]["id"], est["lora"]["id"]], "also": None, "verdict": v,
                 "true_when": f"short sequences, where the weights dominate; at 2048 tokens without checkpointing "
                              f"the ratio is {r2048:.2f}x (activations are the same for both)"})
    nodq = find(records, "estimated", method="qlora", double_quant=False, **base)
    if nodq is not None:
        saved = nodq["bytes"]["quant_state"] - q["quant_state"]
        v, err = verdict(0.4, saved / GB)
        rows.append({"id": "double-quant-saving", "claim": "double quantisation saves ~0.4 GB on a 7B model",
                     "setting": setting(est["qlora"]["config"], "estimated, CUDA"), "claimed": "0.4 GB",
                     "ours": f"{saved / GB:.3f} GB", "error": round(err, 4), "source": "estimated",
                     "records": [est["qlora"]["id"], nodq["id"]], "also": None, "verdict": v,
                     "true_when": "the saving is 0.373 bits a quantised parameter (fp32 block constants per 64 "
                                  "weights become 8-bit, plus one fp32 per 256 blocks): 0.4 GB needs about 8.6B "
                                  "quantised parameters; Llama-2-7B quantises 6.48B"})
    rows += gpu_claims(est)
    return rows


def est_at(cfg: RunConfig, seq: int, ckpt: bool = False) -> int:
    return _estimate(replace(cfg, seq_len=seq, grad_checkpointing=ckpt))["peak"]


def max_seq(r: dict, card: str, ckpt: bool = False) -> int | None:
    from bench.modelling.estimate import largest_fitting, read_arch

    cfg = RunConfig.from_dict({**r["config"], "grad_checkpointing": ckpt})
    arch = read_arch(cfg)
    g = gpus.CATALOG[card]
    return largest_fitting(cfg, arch, "seq_len", lambda peak: gpus.headroom(g, peak) >= 0, arch.max_positions or 131072)


def gpu_claims(est: dict) -> list[dict]:
    rows = []
    lora_4090, qlora_4090 = max_seq(est["lora"], "rtx4090"), max_seq(est["qlora"], "rtx4090")
    qlora_4090_ckpt = max_seq(est["qlora"], "rtx4090", ckpt=True)
    for method, claim, cards, want in (
        ("full", "Full FT of 7B needs 2x A100", ("a100-40gb", "a100-80gb"), 2),
        ("lora", "LoRA of 7B needs 1x A100", ("a100-40gb", "a100-80gb"), 1),
        ("qlora", "QLoRA of 7B fits 1x RTX 4090 (24 GB)", ("rtx4090",), 1),
    ):
        r = est[method]
        peak = r["bytes"]["peak"]
        parts, holds = [], []
        for card in cards:
            g = gpus.CATALOG[card]
            n = -(-gpus.needed(peak) // g.total_bytes)  # cards whose memory adds up to the need (state sharded)
            parts.append(f"{g.label}: {'fits one' if n == 1 else f'{n} cards, sharded'} "
                         f"(headroom on one {gpus.headroom(g, peak) / GiB:+.1f} GiB)")
            holds.append(n == want)
        v = "holds" if all(holds) else "refuted" if not any(holds) else "holds for " + ", ".join(
            gpus.CATALOG[c].label for c, h in zip(cards, holds, strict=True) if h) + " only"
        true_when = {"full": "an A100 80GB holds the whole bf16 Full FT of 7B at sequence 512 (one card); "
                             "two are needed only with 40 GB cards, with the state sharded (FSDP or ZeRO)",
                     "lora": f"it also fits a 24 GB card up to {lora_4090:,} tokens without checkpointing; "
                             "an A100 is needed beyond that (or checkpointing)",
                     "qlora": f"on an RTX 4090 up to {qlora_4090:,} tokens without checkpointing and "
                              f"{qlora_4090_ckpt:,} with it (estimated)"}[method]
        rows.append({"id": f"gpus-{method}", "claim": claim, "setting": setting(r["config"], "estimated, CUDA"),
                     "claimed": f"{want}x", "ours": "; ".join(parts), "error": None, "source": "estimated",
                     "records": [r["id"]], "also": None, "verdict": v, "true_when": true_when})
    trials = {m: {c: gpus.trials(gpus.CATALOG[c], est[m]["bytes"]["peak"]) for c in ("rtx4090", "a100-80gb")}
              for m in est}
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
    from bench.render.charts import quality_sets

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
        for method, claimed in (("lora", 0.97), ("qlora", 0.95)):
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
