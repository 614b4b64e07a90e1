"""`qlora-bench sweep PLAN --out DIR`: every run of a plan in its own subprocess, one result record each.

A crash, a time-out or an out-of-memory in one run cannot poison the next, and each starts with clean memory.
Records are appended atomically to DIR/results.jsonl; running the same command again skips runs already recorded
for the same config and stack (package versions and device), so a sweep interrupted even by kill -9 resumes
without losing or duplicating runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from bench import record
from bench.plan import load_plan
from qlora import models
from qlora.config import ConfigError, RunConfig

GiB = 2**30
STACK_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")


def stack(device: str) -> dict:
    """What a figure is only comparable under: the library versions and the device's name."""
    from bench.probes import device_info

    return {"packages": {p: metadata.version(p) for p in STACK_PACKAGES}, "device": device_info(device)["name"]}


def run_key(config: dict, stack_: dict, budget: int | None) -> str:
    """A run's identity for resuming: config, stack, and the budget it was held to."""
    normal = RunConfig.from_dict(config).to_dict()
    return json.dumps({"config": normal, "stack": stack_, "budget": budget}, sort_keys=True)


def record_key(r: dict) -> str:
    packages = {p: r["env"]["packages"].get(p) for p in STACK_PACKAGES}
    return run_key(r["config"], {"packages": packages, "device": r["env"]["device"]["name"]}, r.get("budget_bytes"))


def run_isolated(cfg: RunConfig, budget: int | None, timeout_s: float | None) -> dict:
    """One measured run in a fresh Python process; whatever happens there comes back as a record."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # CPU RSS follows live memory (DESIGN.md)
    cmd = [sys.executable, "-m", "bench.sweep", json.dumps(cfg.to_dict()), str(budget or 0)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return failed(cfg, "error", f"timed out after {timeout_s:g} s", budget)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode == -signal.SIGKILL:  # the kernel's OOM killer, most likely
        return failed(cfg, "oom", "killed by SIGKILL (the machine ran out of memory?)", budget)
    last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return failed(cfg, "error", last, budget)


def failed(cfg: RunConfig, status: str, message: str, budget: int | None) -> dict:
    source = "extrapolated" if cfg.layers is not None else "measured"
    return record.make(cfg.to_dict(), source=source, status=status, bytes_=None, error=message,
                       env=record.environment(cfg.device), budget_bytes=budget)


def run(plan: str | Path, out: str | Path, *, device: str, budget_gib: float | None = None,
        timeout_s: float | None = None, log=print) -> list[dict]:
    """Run every not-yet-recorded run of `plan`; returns the records of this invocation."""
    configs = load_plan(plan, device)
    for name in sorted({c.model for c in configs}):  # fail before the first run, not in the middle of the sweep
        try:
            models.resolve(name)
        except ConfigError as e:
            raise ConfigError(f"{plan}: key 'model': {e}") from None
    results = Path(out) / "results.jsonl"
    done = {record_key(r) for r in record.read(results)} if results.exists() else set()
    here = stack(device)
    budget = int(budget_gib * GiB) if budget_gib is not None else None
    todo = [c for c in configs if run_key(c.to_dict(), here, budget) not in done]
    log(f"{len(configs)} runs in {plan}: {len(configs) - len(todo)} already recorded, {len(todo)} to run")
    new, started = [], time.monotonic()
    for i, cfg in enumerate(todo, 1):
        r = run_isolated(cfg, budget, timeout_s)
        record.append(results, r)
        new.append(r)
        elapsed = time.monotonic() - started
        eta = elapsed / i * (len(todo) - i)
        peak = f"peak {r['bytes']['peak'] / GiB:.3f} GiB" if r["status"] == "ok" else r["error"]
        log(f"[{i}/{len(todo)}] {cfg.model} {cfg.method} seq {cfg.seq_len} batch {cfg.batch_size}"
            f"{' ckpt' if cfg.grad_checkpointing else ''}: {r['status']} ({peak}) · "
            f"elapsed {elapsed / 60:.1f} min, eta {eta / 60:.1f} min")
    return new


def _child(config_json: str, budget: str) -> None:
    from bench.measure import measure

    cfg = RunConfig.from_dict(json.loads(config_json))
    r = measure(cfg, budget=int(budget) or None)
    print(json.dumps(r, allow_nan=False), flush=True)


if __name__ == "__main__":
    _child(*sys.argv[1:3])
