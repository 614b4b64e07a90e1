"""The GPU smoke: the CUDA path's first run on a lent device, about 5 minutes, no network.

    python -m bench.running.gpu_smoke --out DIR               # on the GPU machine
    python -m bench.running.gpu_smoke --device cpu --out DIR  # the rehearsal: checks the whole plan, runs its
                                                              # small runs at 1 x 128 tokens on CPU

It sweeps bench/plans/gpu-smoke.toml (every run in its own process, as `qlora-bench sweep` does), writes the plan's
estimates, checks what the CUDA path must get right, and writes into DIR:
    env.json          versions, device, nvidia-smi
    results.jsonl     the result records (`qlora-bench report DIR` and the claims read them as they are)
    estimates.jsonl   the estimator's figures for the 7B runs
    smoke.md          each check, passed or failed, with its figures: the ledger against the allocator (corrected
                      for what was allocated before the step), the allocator's reserve, this process's CUDA
                      context (NVML's figure for the process less the allocator's reserved), losses, paged state
    report/           the report of the records (when matplotlib is installed)
Exit status 0 when every check passes, 1 otherwise.

On a machine without network, carry a bitsandbytes wheel (.whl/) and install it beside the checkout:
    pip install --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python -m bench.running.gpu_smoke --out DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from bench.running.plan import PLANS_DIR
from bench.schema import GiB, MiB, label

PLAN = PLANS_DIR / "gpu-smoke.toml"
LEDGER_TOLERANCE = 0.02  # of the peak, plus the allowance: the GPU test's bound
# cuBLAS/cuBLASLt workspaces (tens of MiB per handle and stream; forward and autograd's backward thread each have
# one) and buffers allocated inside kernels (bitsandbytes' dequantised weight), which the allocator holds and no
# tensor of the step does.
WORKSPACE_ALLOWANCE = 160 * MiB


def environment(device: str) -> dict:
    from bench.measuring import record

    env = record.environment(device)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = f"unavailable: {e}"
    return env


def cpu_sized(cfg) -> bool:
    """Runs the CPU rehearsal can run: the small model with plain AdamW at no more than 2048 tokens a step, and no
    activation offloading (there is no device to offload from)."""
    return (cfg.model == "smollm2-135m" and cfg.optimizer == "adamw" and cfg.batch_size * cfg.seq_len <= 2048
            and not cfg.offload_activations)


REHEARSAL = {"device": "cpu", "batch_size": 1, "seq_len": 128, "steps": 3}  # the code path in seconds on 2 cores


def run(out: Path, device: str, timeout_s: float, log) -> list[dict]:
    """The plan's records: swept on CUDA; on CPU, the whole plan checked and its CPU-sized runs measured."""
    from bench.measuring import record
    from bench.measuring.measure import check
    from bench.running import sweep
    from bench.running.plan import read_plan
    from qlora.preflight import preflight

    if device.startswith("cuda"):
        return sweep.run(PLAN, out, device=device, timeout_s=timeout_s, log=log)
    plan = read_plan(PLAN, "cuda")
    for r in plan.runs:  # every run as the GPU will see it, but for the device
        preflight(r.config, device=False)
    results, records = out / "results.jsonl", []
    results.unlink(missing_ok=True)  # a rehearsal measures afresh each time: no duplicates for the report
    for r in plan.runs:
        if cpu_sized(r.config):
            cfg = replace(r.config, **REHEARSAL)
            records.append(sweep.run_isolated(check(cfg), None, timeout_s))
            record.append(results, records[-1])
            log(f"{label(cfg.to_dict())} (cpu rehearsal): {sweep.outcome(records[-1])}")
    return records


def checks(records: list[dict]) -> list[tuple[str, bool, str]]:
    """(check, passed, figures) for each thing the smoke must show."""
    out = []
    for r in records:
        c = r["config"]
        name = label(c).split(" [")[0] + (f" {c['optimizer']}" if c["optimizer"] != "adamw" else "")
        huge = c["batch_size"] * c["seq_len"] >= 2**18
        if huge:
            out.append((f"{name}: a real out-of-memory is recorded oom", r["status"] == "oom", r["error"] or "ok"))
            continue
        if r["status"] != "ok":
            out.append((f"{name}: finishes", False, f"{r['status']}: {r['error']}"))
            continue
        losses = r.get("train_losses") or []
        falling = bool(losses) and None not in losses and losses[-1] < losses[0]
        out.append((f"{name}: losses finite and falling", falling, ", ".join("nan" if v is None else f"{v:.3f}"
                                                                             for v in losses)))
        peak = r["bytes"]["peak"]
        if r.get("cuda_max_allocated") is not None:
            corrected = r["cuda_max_allocated"] - (r["cuda_allocated_step_start"] - r["ledger_step_start"])
            gap = corrected - peak
            ok = -LEDGER_TOLERANCE * peak <= gap <= LEDGER_TOLERANCE * peak + WORKSPACE_ALLOWANCE
            out.append((f"{name}: ledger within 2% + {WORKSPACE_ALLOWANCE // MiB} MiB of the allocator", ok,
                        f"ledger {peak / GiB:.3f} GiB, allocator {corrected / GiB:.3f} GiB (corrected), gap "
                        f"{gap / MiB:+.1f} MiB ({gap / peak:+.2%}); reserved {r['cuda_max_reserved'] / GiB:.3f} GiB "
                        f"(+{r['cuda_max_reserved'] / r['cuda_max_allocated'] - 1:.1%} over max allocated)"))
            if r.get("cuda_total_bytes") is not None:
                out.append((f"{name}: capacity CUDA reports (mem_get_info)", r["cuda_total_bytes"] > 0,
                            f"total {r['cuda_total_bytes'] / GiB:.2f} GiB, free before the step "
                            f"{r['cuda_free_step_start'] / GiB:.2f} GiB"))
            if r.get("nvml_process_used") is not None:
                context = r["nvml_process_used"] - r["cuda_max_reserved"]
                out.append((f"{name}: CUDA context measured (NVML process less reserved)", context > 0,
                            f"{context / MiB:.0f} MiB"))
        else:
            rss = r.get("rss_anon_peak")
            out.append((f"{name}: device figures recorded", rss is not None,
                        f"rss_anon_peak {rss / GiB:.3f} GiB" if rss else "none"))
        if c["optimizer"].startswith("paged_"):
            paged = r.get("optimizer_paged_bytes") or 0
            out.append((f"{name}: paged optimizer state counted", 0 < paged <= r["bytes"]["optimizer"],
                        f"{paged / MiB:.1f} MiB paged of {r['bytes']['optimizer'] / MiB:.1f} MiB optimizer"))
    return out


def markdown(env: dict, rows: list[tuple[str, bool, str]]) -> str:
    dev = env["device"]
    lines = ["# GPU smoke", "",
             f"Device: {dev['name']} ({dev['type']}); torch {env['torch_build']['version']} (CUDA "
             f"{env['torch_build']['cuda']}), transformers {env['packages']['transformers']}, peft "
             f"{env['packages']['peft']}, bitsandbytes {env['packages']['bitsandbytes']}; commit "
             f"{(env.get('git_commit') or 'unknown')[:10]}{' (dirty)' if env.get('git_dirty') else ''}.", "",
             f"{sum(ok for _, ok, _ in rows)} of {len(rows)} checks passed.", "",
             "| check | result | figures |", "|---|---|---|"]
    lines += [f"| {name} | {'pass' if ok else '**FAIL**'} | {figures} |" for name, ok, figures in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.measuring import record
    from bench.modelling.records import estimate_record
    from bench.running.plan import read_plan

    p = argparse.ArgumentParser(prog="python -m bench.running.gpu_smoke", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for the records, smoke.md and the report")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for the rehearsal")
    p.add_argument("--timeout-s", type=float, default=300, help="time limit of each run's process (default 300)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    env = environment(args.device)
    record.write_atomic(out / "env.json", json.dumps(env, indent=1) + "\n")
    records = run(out, args.device, args.timeout_s, log)
    estimates = [estimate_record(replace(c, layers=None)) for c in read_plan(PLAN, "cuda").estimates]
    record.write_atomic(out / "estimates.jsonl", "".join(json.dumps(e) + "\n" for e in estimates))
    rows = checks(records)
    text = markdown(env, rows)
    record.write_atomic(out / "smoke.md", text)
    print(text, end="")
    try:
        from bench.running import reporting

        reporting.make(out)
    except ImportError as e:  # matplotlib missing on the device: the records are what matters
        log(f"report skipped: {e}")
    return 0 if rows and all(ok for _, ok, _ in rows) else 1


def entry() -> int:
    from qlora.config import ConfigError

    try:
        return main()
    except ConfigError as e:  # e.g. --device cuda where there is none: one line, exit 2, as the CLI does
        print(f"qlora-bench gpu_smoke: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
