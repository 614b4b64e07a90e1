"""`qlora-bench sweep PLAN --out DIR`: every run of a plan in its own subprocess, one result record each.

A crash, a time-out or an out-of-memory in one run cannot poison the next, and each starts with clean memory.
Records are appended atomically to DIR/results.jsonl; running the same command again skips runs already recorded
for the same config and stack (package versions, device and git commit), so a sweep interrupted even by kill -9 resumes
without losing or duplicating runs.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from bench import record
from bench.plan import PlannedRun, read_plan
from qlora import models
from qlora.config import ConfigError, RunConfig

GiB = 2**30
STACK_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")


def stack(device: str) -> dict:
    """What a recorded run stands for: the library versions, the device's name and the code's commit. A sweep
    resumes only runs recorded under all three, so new code (a fresh clone of a later commit) measures again."""
    from bench.probes import device_info

    return {"packages": {p: metadata.version(p) for p in STACK_PACKAGES}, "device": device_info(device)["name"],
            "commit": record.git_state()["git_commit"]}


def run_key(config: dict, stack_: dict, budget: int | None) -> str:
    """A run's identity for resuming: config, stack, and the budget it was held to."""
    normal = RunConfig.from_dict(config).to_dict()
    return json.dumps({"config": normal, "stack": stack_, "budget": budget}, sort_keys=True)


def record_key(r: dict) -> str:
    packages = {p: r["env"]["packages"].get(p) for p in STACK_PACKAGES}
    here = {"packages": packages, "device": r["env"]["device"]["name"], "commit": r["env"].get("git_commit")}
    return run_key(r["config"], here, r.get("budget_bytes"))


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


def progress(done: int, total: int, elapsed: float, width: int = 24) -> str:
    """A text progress bar with elapsed time and an ETA from the mean time per run so far."""
    filled = round(width * done / total) if total else width
    eta = elapsed / done * (total - done) if done else None
    tail = f"eta {eta / 60:.1f} min" if eta is not None else "eta --"
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} · {elapsed / 60:.1f} min · {tail}"


def describe(cfg: RunConfig) -> str:
    depth = f" at {cfg.layers} layers" if cfg.layers is not None else ""
    return (f"{cfg.model} {cfg.method} seq {cfg.seq_len} batch {cfg.batch_size}"
            f"{' ckpt' if cfg.grad_checkpointing else ''}{depth}")


def outcome(r: dict) -> str:
    if r["status"] == "ok":
        label = " extrapolated" if r["source"] == "extrapolated" else ""
        return f"ok, peak {r['bytes']['peak'] / GiB:.3f} GiB{label}"
    return f"{r['status']}: {r['error']}"


def run(plan: str | Path, out: str | Path, *, device: str, budget_gib: float | None = None,
        timeout_s: float | None = None, log=print) -> list[dict]:
    """Run every not-yet-recorded run of `plan`; returns the records of this invocation.

    A full-depth run that is oom, in a group with `oom_fallback_layers`, is followed by the same config at that
    depth (extrapolated to full depth), so the report still has a breakdown; it records `fallback_for`.
    """
    runs = read_plan(plan, device).runs
    for name in sorted({r.config.model for r in runs}):  # fail before the first run, not in the middle
        try:
            models.resolve(name)
        except ConfigError as e:
            raise ConfigError(f"{plan}: key 'model': {e}") from None
    results = Path(out) / "results.jsonl"
    done = {record_key(r): r for r in record.read(results)} if results.exists() else {}
    here = stack(device)
    budget = int(budget_gib * GiB) if budget_gib is not None else None

    def key_of(cfg: RunConfig) -> str:
        return run_key(cfg.to_dict(), here, budget)

    # A queue of (planned run, config to run, the oom record it is the fallback for). A finished run that was oom
    # may still owe its fallback (the sweep was killed between the two): those come first.
    queue = []
    for r in runs:
        prior = done.get(key_of(r.config))
        if prior is None:
            queue.append((r, r.config, None))
        elif (follow := fallback_of(r, prior)) is not None and key_of(follow) not in done:
            queue.append((r, follow, prior))
    queue.sort(key=lambda item: item[2] is None)
    fresh = sum(parent is None for _, _, parent in queue)
    log(f"{len(runs)} runs in {plan}: {len(runs) - fresh} already recorded, {fresh} to run"
        + (f", {len(queue) - fresh} reduced-depth fallback(s) owed" if len(queue) > fresh else ""))
    total, new, started = len(queue), [], time.monotonic()
    while queue:
        planned, cfg, parent = queue.pop(0)
        r = run_isolated(cfg, budget, timeout_s)
        if parent is not None:
            r["fallback_for"] = parent["id"]
        record.append(results, r)
        new.append(r)
        done[key_of(cfg)] = r
        follow = fallback_of(planned, r) if parent is None else None
        if follow is not None and key_of(follow) not in done:
            queue.insert(0, (planned, follow, r))
            total += 1
        else:
            follow = None
        log(f"{progress(len(new), total, time.monotonic() - started)}  {describe(cfg)}: {outcome(r)}"
            + (f" · next: the same at {follow.layers} layers" if follow is not None else ""))
    return new


def fallback_of(planned: PlannedRun, r: dict) -> RunConfig | None:
    """The reduced-depth config owed after record r of a planned run, or None."""
    if planned.fallback_layers is None or r["status"] != "oom" or planned.config.layers is not None:
        return None
    if planned.fallback_layers >= depth(planned.config.model):  # nothing shallower to measure
        return None
    return replace(planned.config, layers=planned.fallback_layers)


@functools.cache
def depth(model: str) -> int:
    return models.hf_config(models.resolve(model)).num_hidden_layers


def _child(config_json: str, budget: str) -> None:
    from bench.measure import measure

    cfg = RunConfig.from_dict(json.loads(config_json))
    r = measure(cfg, budget=int(budget) or None)
    print(json.dumps(r, allow_nan=False), flush=True)


if __name__ == "__main__":
    _child(*sys.argv[1:3])
