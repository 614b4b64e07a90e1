"""Learning rates chosen, not assumed (`--lr-grid`): per method, each rate of a small grid is trained (seed 0, the
run's budget) on the training examples less a validation split carved from them, and scored on that split; the
best is the rate the method's final runs use, trained on the same examples less the split. The held-out examples
are never read here. The grid, every rate's validation score and the choice go into the method's quality record
(`quality.lr_search`); the search runs are kept in OUT/lr-search.jsonl, so an interrupted search resumes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path

from bench.schema import METHODS, run_key
from qlora.config import ConfigError, RunConfig
from qlora.tasks import Example, Task

# Around each method's default (qlora.config.default_lr), a factor of about 2.5 either side.
GRIDS = {"full": (1e-5, 2e-5, 5e-5), "lora": (1e-4, 2e-4, 5e-4), "qlora": (1e-4, 2e-4, 5e-4)}
VALIDATION = 200  # validation examples at most: a tenth of the training examples at most
SEARCH_FILE = "lr-search.jsonl"


def parse_grid(value, methods: list[str]) -> dict[str, tuple[float, ...]] | None:
    """`default` (GRIDS), or per method `full=1e-5:2e-5:5e-5,lora=1e-4:2e-4:5e-4` (a plan may give a table of
    lists); the default grid for methods not named. None for no search. Raises ConfigError naming the value."""
    if value is None or value is False:
        return None
    out = {m: GRIDS[m] for m in methods}
    if value in ("default", True):
        return out
    try:
        pairs = value.items() if isinstance(value, dict) else (p.partition("=")[::2] for p in str(value).split(","))
        for m, v in pairs:
            m = m.strip()
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}")
            rates = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else str(v).split(":")))
            if len(rates) < 2 or len(set(rates)) != len(rates) or not all(r > 0 and math.isfinite(r) for r in rates):
                raise ValueError(f"{m}: at least two distinct positive rates")
            out[m] = rates
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"--lr-grid {value!r}: give 'default' or method=rate:rate:rate pairs, e.g. "
                          f"full=1e-5:2e-5:5e-5,lora=1e-4:2e-4:5e-4 ({e})") from None
    return {m: out[m] for m in methods}


def carve(task: Task, most: int = VALIDATION) -> tuple[Task, list[Example]]:
    """(the task with its training examples less the validation split, the split): the examples with the smallest
    hash of their text, the same on every run, at most a tenth of the training examples; for a task with groups
    (party's speakers), whole groups in hash order, so no group is on both sides. Raises ConfigError when
    the training set is too small to carve from."""
    n = min(most, len(task.train) // 10)
    if n < 2:
        raise ConfigError(f"{task.name}: {len(task.train)} training examples are too few to carve a validation "
                          "split from (a learning-rate search needs at least 20)")

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    if task.train_groups is None:
        ranked = sorted(range(len(task.train)), key=lambda i: digest(repr(task.train[i])))
        chosen = set(ranked[:n])
    else:  # whole groups (party: speakers), in hash order, until the split holds n examples or just under
        members: dict[str, list[int]] = {}
        for i, g in enumerate(task.train_groups):
            members.setdefault(g, []).append(i)
        chosen = set()
        for g in sorted(members, key=digest):
            if len(chosen) + len(members[g]) <= n:
                chosen.update(members[g])
        if len(chosen) < 2:
            raise ConfigError(f"{task.name}: its groups are too large to carve a validation split of at most {n} "
                              "examples from whole groups")
    valid = [task.train[i] for i in sorted(chosen)]
    groups = None if task.train_groups is None else [g for i, g in enumerate(task.train_groups) if i not in chosen]
    return replace(task, train=[e for i, e in enumerate(task.train) if i not in chosen], train_groups=groups), valid


def score_of(summary: dict, metric: str) -> float:
    """Higher is better: accuracy, or exp(-loss) for text tasks."""
    return summary["accuracy"] if metric == "accuracy" else math.exp(-summary["loss"])


def search(cfg: RunConfig, task: Task, valid: list[Example], grid: tuple[float, ...], out: Path | None, *,
           train_and_score, digest: str, log=print) -> dict:
    """Train cfg at every rate of `grid` on task.train (already less the split) with `train_and_score` (the
    quality runs' own, bench.running.quality), score each on `valid` (whose digest is `digest`); returns
    {grid, scores, chosen, metric, seed, validation_examples, validation_digest}."""
    from bench.measuring import record
    from qlora.scoring import summarise

    commit = record.git_state()["git_commit"]
    file = out / SEARCH_FILE if out is not None else None
    done = {}
    if file is not None and file.exists():
        done = {run_key(r["config"], task=r["task"], valid=r["validation_digest"],
                        commit=(r.get("env") or {}).get("git_commit")): r for r in record.read_objects(file)}
    scores = []
    for lr in grid:
        c = replace(cfg, lr=lr)
        key = run_key(c.to_dict(), task=task.name, valid=digest, commit=commit)
        r = done.get(key)
        if r is None:
            log(f"{task.name} {c.method} lr {lr:g}: {c.steps} steps, scored on {len(valid)} validation examples")
            r = train_and_score(c, task, valid, measure_memory=False, log=log)
            r.update(task=task.name, validation_digest=digest)
            if file is not None:
                record.append(file, r)
        scores.append(score_of(summarise(r["tuned"], task.metric), task.metric))
    best = max(range(len(grid)), key=lambda i: (scores[i], -i))  # ties: the smaller rate
    log(f"{task.name} {cfg.method}: lr {grid[best]:g} chosen ("
        + ", ".join(f"{lr:g}: {s:.4f}" for lr, s in zip(grid, scores, strict=True)) + ")")
    return {"grid": list(grid), "scores": scores, "chosen": grid[best], "metric": task.metric, "seed": cfg.seed,
            "validation_examples": len(valid), "validation_digest": digest}
