"""What `measure` and `estimate` print on a terminal (without --json): a record as a readable table."""

from __future__ import annotations

from bench.schema import CATEGORIES, DEVICE_FIGURES, GiB, MiB


def fmt_bytes(n, unit: int) -> str:
    return "n/a" if n is None else f"{n / unit:.3f}"


def print_record(r: dict) -> None:
    """A readable summary of one result record: categories with their shares, where the peak fell, device figures."""
    c = r["config"]
    source = r["source"]
    if r.get("measured_at"):
        source += f", fitted through {' and '.join(str(m['layers']) for m in r['measured_at'])} layers"
    flags = " · checkpointing" if c["grad_checkpointing"] else ""
    if c.get("shard", "none") != "none":
        flags += f" · {c['shard']} x{c['world_size']}, per rank"
    print(f"{c['method']} · {c['model']} · batch {c['batch_size']} x seq {c['seq_len']} · {c['device']} · "
          f"{c['precision']} · {c['optimizer']}{flags} ({source})")
    if r["status"] != "ok":
        print(f"  {r['status'].upper()}: {r['error']}")
        return
    b = r["bytes"]
    unit, name = (GiB, "GiB") if b["peak"] >= GiB / 4 else (MiB, "MiB")
    if r.get("ranks"):
        peaks = ", ".join(f"rank {x['rank']} {fmt_bytes(x['bytes']['peak'], unit)}" for x in r["ranks"])
        print(f"  peaks ({name}): {peaks}; below, rank {r['rank']}'s, whose weights include "
              f"{fmt_bytes(r['ranks'][r['rank']]['gathered_bytes'], unit)} {name} of all-gathered parameters")
    print(f"  {'category':<13}{name:>10}{'share':>8}")
    for k in CATEGORIES:
        print(f"  {k:<13}{fmt_bytes(b[k], unit):>10}{b[k] / b['peak']:>8.1%}")
    at = r["peak_at"]
    where = f" at {at['module']}" if at["module"] else ""
    if at.get("grad_fn"):
        where += f" ({at['grad_fn']})"
    print(f"  {'peak':<13}{fmt_bytes(b['peak'], unit):>10}{1:>8.0%}   in {at['phase']}{where}")
    f = r["first_step"]
    print(f"  first step: peak {fmt_bytes(f['peak'], unit)} {name} in {f['peak_at']['phase']} "
          f"(it allocates the optimizer state)")
    for key in DEVICE_FIGURES[:3]:  # the CUDA ones; RSS is set beside the ledger below
        if r.get(key) is not None:
            print(f"  device {key}: {fmt_bytes(r[key], unit)} {name}")
    if r.get("rss_anon_peak") is not None:
        non_tensor = r["rss_anon_step_start"] - r["ledger_step_start"]
        print(f"  device rss_anon_peak: {fmt_bytes(r['rss_anon_peak'], unit)} {name}; less the "
              f"{fmt_bytes(non_tensor, unit)} {name} held besides tensors at the step's start: "
              f"{fmt_bytes(r['rss_anon_peak'] - non_tensor, unit)} {name} (ledger peak {fmt_bytes(b['peak'], unit)})")
    if r["step_seconds"] is None:
        print("  step time: too noisy to extrapolate (a longer layer took less time than a shorter one)")
    else:
        print(f"  step {r['step_seconds']:.3f} s (median of {c['steps']}), {r['tokens_per_second']:,.0f} tokens/s")
    if r.get("warning"):
        print(f"  warning: {r['warning']}")


def print_estimates(records: list[dict], gpu) -> None:
    c = records[0]["config"]
    flags = " · checkpointing" if c["grad_checkpointing"] else ""
    if c.get("shard", "none") != "none":
        flags += f" · {c['shard']} x{c['world_size']}, per rank (rank 0, the largest; batch per rank)"
    print(f"{c['model']} · batch {c['batch_size']} x seq {c['seq_len']} · {c['precision']} · {c['optimizer']}"
          f"{flags} (estimated, GiB)")
    methods = [r["config"]["method"] for r in records]
    print(f"  {'category':<13}" + "".join(f"{m:>10}" for m in methods))
    for k in (*CATEGORIES, "peak"):
        print(f"  {k:<13}" + "".join(f"{r['bytes'][k] / GiB:>10.3f}" for r in records))
    print(f"  {'peak falls in':<13}" + "".join(f"{r['peak_at']['phase']:>10}" for r in records))
    if records[0].get("sharding", {}).get("gathered_root_bytes") is not None:
        print(f"  {'of weights, gathered':<13}" + "".join(
            f"{r['sharding']['gathered_root_bytes'] / GiB:>10.3f}" for r in records)
            + "   (the root unit: embeddings, final norm, lm_head; plus one layer inside its backward)")
    if gpu is None:
        return
    print(f"  on {gpu.label} ({gpu.total_bytes / GiB:.1f} GiB; needs peak + 5% + 0.5 GiB context):")
    for r in records:
        f = r["on_gpu"]
        verdict = "fits" if f["fits"] else "does not fit"
        line = f"    {r['config']['method']:<6} {verdict:<13} headroom {f['headroom_bytes'] / GiB:+.2f} GiB"
        if "trials" in f:
            line += f" · {f['trials']} concurrent run(s)"
        if "max_seq_len" in f and f["max_seq_len"] is None:
            line += " · not even one token fits"
        elif "max_seq_len" in f:
            line += f" · max seq_len {f['max_seq_len']} (batch {r['config']['batch_size']})"
            line += f" · max batch {f['max_batch_size']} (seq {r['config']['seq_len']})"
        print(line)
