"""`qlora-bench sweep PLAN --out DIR`: every run of a plan in its own subprocess, one result record each.

A crash, a time-out or an out-of-memory in one run cannot poison the next, and each starts with clean memory.
Every run is checked before the first starts. Records are appended atomically to DIR/results.jsonl; running the
same command again skips runs already recorded `ok` or `oom` for the same config and stack (package versions, device
and git commit) and runs `error` ones again, so a sweep interrupted even by kill -9 resumes without losing or
duplicating runs. Two sweeps on one DIR share the work through a claim (lock file) per run.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import time
from contextlib import contextmanager
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from bench.measuring import record
from bench.measuring.runner import isolated
from bench.running.plan import PlannedRun, read_plan
from bench.schema import GiB, label, run_key
from qlora import models
from qlora.config import ConfigError, RunConfig

STACK_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")


def stack(device: str) -> dict:
    """What a recorded run stands for: the library versions, the device's name and the code's commit. A sweep
    resumes only runs recorded under all three, so new code (a fresh clone of a later commit) measures again."""
    from bench.measuring.probes import device_info

    return {"packages": {p: metadata.version(p) for p in STACK_PACKAGES}, "device": device_info(device)["name"],
            "commit": record.git_state()["git_commit"]}


def record_key(r: dict) -> str:
    packages = {p: r["env"]["packages"].get(p) for p in STACK_PACKAGES}
    here = {"packages": packages, "device": r["env"]["device"]["name"], "commit": r["env"].get("git_commit")}
    return run_key(r["config"], stack=here, budget=r.get("budget_bytes"))


def measured(results: Path) -> list[tuple[str, dict]]:
    """(resume key, record) of every run recorded in `results`, in order. Records that are not runs (estimates, no
    environment) are passed over; a run whose config this version cannot read is bad input naming FILE:LINE."""
    out = []
    for n, r in record.read_numbered(results) if results.exists() else []:
        env = r.get("env")
        if r["source"] == "estimated" or not isinstance(env, dict) or not isinstance(env.get("device"), dict):
            continue
        try:
            out.append((record_key(r), r))
        except (ConfigError, KeyError, AttributeError, TypeError) as e:
            raise ConfigError(f"{results}:{n}: not a run this version can resume ({e})") from None
    return out


def run_isolated(cfg: RunConfig, budget: int | None, timeout_s: float | None) -> dict:
    """One run's record, each depth measured in its own fresh process (bench.measuring.runner): whatever happens
    there, a kill -9, the OOM killer, or input only the run itself could find bad (a weights folder it cannot load),
    comes back as a record, and the sweep goes on to the next run."""
    from bench.measuring.measure import measure

    try:
        return measure(cfg, run=functools.partial(isolated, timeout_s=timeout_s), budget=budget)
    except ConfigError as e:
        source = "extrapolated" if cfg.layers is not None else "measured"
        return record.make(cfg.to_dict(), source=source, status="error", bytes_=None, error=f"bad input: {e}",
                           env=record.environment(cfg.device), budget_bytes=budget)


def progress(done: int, total: int, elapsed: float, width: int = 24) -> str:
    """A text progress bar with elapsed time and an ETA from the mean time per run so far."""
    filled = round(width * done / total) if total else width
    eta = elapsed / done * (total - done) if done else None
    tail = f"eta {eta / 60:.1f} min" if eta is not None else "eta --"
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} · {elapsed / 60:.1f} min · {tail}"


def outcome(r: dict) -> str:
    if r["status"] == "ok":
        label = " extrapolated" if r["source"] == "extrapolated" else ""
        return f"ok, peak {r['bytes']['peak'] / GiB:.3f} GiB{label}"
    return f"{r['status']}: {r['error']}"


def run(plan: str | Path, out: str | Path, *, device: str, budget_gib: float | None = None,
        timeout_s: float | None = None, dry_run: bool = False, log=print, runs: list[PlannedRun] | None = None,
        tag=None) -> list[dict]:
    """Run every run of `plan` not yet recorded in OUT/results.jsonl; returns the plan's records as they stand at
    the end (one per planned run, plus fallbacks), so a caller can tell whether any ended in error.

    Every run is checked before the first one starts (ConfigError names the bad value). A run recorded as `error`
    (a time-out, a crash, a kill that was not the OOM killer) is run again; `ok` and `oom` are results and are
    kept. A full-depth run that is oom, in a group with `oom_fallback_layers`, is followed by the same config at
    that depth (extrapolated to full depth), so the report still has a breakdown; it records `fallback_for`.
    Two sweeps on one OUT share the work: each run is claimed (a lock file) by the sweep that runs it.

    `runs`: the runs to make instead of the plan file's (`plan` then only names them in messages; `qlora-bench
    ladder`); `tag(config)`: fields to add to each new record.
    """
    runs = checked_runs(plan, device) if runs is None else [replace(r, config=_checked(plan, r.config)) for r in runs]
    out = Path(out)
    results = out / "results.jsonl"
    stacks: dict[str, dict] = {}  # a group may pin its own device: each run is keyed by the device it runs on
    budget = int(budget_gib * GiB) if budget_gib is not None else None

    def key_of(cfg: RunConfig) -> str:
        if cfg.device not in stacks:
            stacks[cfg.device] = stack(cfg.device)
        return run_key(cfg.to_dict(), stack=stacks[cfg.device], budget=budget)

    def recorded() -> dict[str, dict]:
        """Finished runs (ok or oom) in OUT, read afresh: another sweep may have added some."""
        return {k: r for k, r in measured(results) if r["status"] != "error"}

    done = recorded()
    queue = owed(runs, done, key_of)
    fresh = sum(parent is None for _, _, parent in queue)
    retried = len({k for k, r in measured(results) if r["status"] == "error"} & {key_of(cfg) for _, cfg, _ in queue})
    log(f"{len(runs)} runs in {plan}: {len(runs) - fresh} already recorded, {fresh} to run"
        + (f" ({retried} recorded as error, run again)" if retried else "")
        + (f", {len(queue) - fresh} reduced-depth fallback(s) owed" if len(queue) > fresh else ""))
    if dry_run:
        for _, cfg, _ in queue:
            log(f"  would run: {label(cfg.to_dict())}")
        return []
    total, finished, started, deferred = len(queue), 0, time.monotonic(), []
    while queue or deferred:
        waiting = not queue  # only runs another sweep had claimed are left: wait for it to finish each
        planned, cfg, parent = queue.pop(0) if queue else deferred.pop(0)
        with claim(out, key_of(cfg), wait=waiting) as mine:
            if not mine:
                deferred.append((planned, cfg, parent))
                continue
            done = recorded()
            r = done.get(key_of(cfg))
            if r is None:
                r = run_isolated(cfg, budget, timeout_s)
                if tag is not None:
                    r.update(tag(planned.config))
                if parent is not None:
                    r["fallback_for"] = parent["id"]
                record.append(results, r)
                if r["status"] != "error":
                    done[key_of(cfg)] = r
                how = outcome(r)
            else:
                how = "recorded by another sweep"
        finished += 1
        follow = fallback_of(planned, r) if parent is None else None
        if follow is not None and key_of(follow) not in done:
            queue.insert(0, (planned, follow, r))
            total += 1
        else:
            follow = None
        log(f"{progress(finished, total, time.monotonic() - started)}  {label(cfg.to_dict())}: {how}"
            + (f" · next: the same at {follow.layers} layers" if follow is not None else ""))
    latest = dict(measured(results))
    wanted = [key_of(r.config) for r in runs]
    wanted += [key_of(f) for r in runs if (f := fallback_of(r, latest.get(key_of(r.config), {}))) is not None]
    return [latest[k] for k in wanted if k in latest]


def checked_runs(plan: str | Path, device: str) -> list[PlannedRun]:
    """The plan's runs, each checked against its model and this machine (ConfigError names the run and value)."""
    return [replace(r, config=_checked(plan, r.config)) for r in read_plan(plan, device).runs]


def _checked(plan, cfg: RunConfig) -> RunConfig:
    from bench.measuring.measure import check

    try:
        models.resolve(cfg.model)
    except ConfigError as e:
        raise ConfigError(f"{plan}: key 'model': {e}") from None
    try:
        return check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{plan}: run {label(cfg.to_dict())}: {e}") from None


def owed(runs: list[PlannedRun], done: dict[str, dict], key_of) -> list[tuple]:
    """A queue of (planned run, config to run, the oom record it is the fallback for). A finished run that was oom
    may still owe its fallback (the sweep was killed between the two): those come first."""
    queue = []
    for r in runs:
        prior = done.get(key_of(r.config))
        if prior is None:
            queue.append((r, r.config, None))
        elif (follow := fallback_of(r, prior)) is not None and key_of(follow) not in done:
            queue.append((r, follow, prior))
    queue.sort(key=lambda item: item[2] is None)
    return queue


@contextmanager
def claim(out: Path, key: str, *, wait: bool):
    """Hold the claim on one run of OUT while running it; yields False if another sweep holds it (and not `wait`).

    A lock file per run under OUT/.claims: the kernel drops an flock when its holder dies, even by kill -9, so a
    claim never outlives the sweep that made it."""
    folder = out / ".claims"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def fallback_of(planned: PlannedRun, r: dict) -> RunConfig | None:
    """The reduced-depth config owed after record r of a planned run, or None."""
    if planned.fallback_layers is None or r.get("status") != "oom" or planned.config.layers is not None:
        return None
    if planned.fallback_layers >= depth(planned.config.model):  # nothing shallower to measure
        return None
    return replace(planned.config, layers=planned.fallback_layers)


@functools.cache
def depth(model: str) -> int:
    return models.hf_config(models.resolve(model)).num_hidden_layers
