"""`qlora-bench quality`: fine-tune each method from the same base on the same examples with the same token budget,
then evaluate the base, the 4-bit base and every tuned model on the same held-out examples.

Budget: every method of a seed sees the same examples in the same order (the order depends on the seed only), in
the same number of steps of the same batch size, so the same tokens. Methods differ in what they train and in their
learning rate (defaults: Full FT 2e-5, LoRA and QLoRA 2e-4, as in the QLoRA paper's small-model runs).

Metrics, per held-out example (so they can be resampled): summed negative log-likelihood of the target tokens and
their count (held-out loss, perplexity = exp(loss)); for choice tasks also whether the highest-likelihood choice is
the answer (accuracy). Quality score: accuracy for choice tasks, exp(-loss) (the geometric-mean probability per
target token, 1/perplexity) otherwise. Relative quality = score(method) / score(Full FT), with a percentile
bootstrap interval that resamples seeds and held-out examples together (paired: one resample for every method).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from bench import progress
from bench.render import quality as render_quality
from bench.running.quality_stats import bootstrap, collapsed
from bench.schema import METHODS, run_key
from qlora import models
from qlora.config import RunConfig
from qlora.scoring import Head, schedule, summarise
from qlora.tasks import Example, Task

Q4_1_CAVEAT = ("the packaged SmolLM2-135M-Instruct went through GGUF Q4_1 before it was converted: its fp32 "
               "weights are dequantised 4-bit weights (at most 16 distinct values in a block of 32), so QLoRA's NF4 "
               "is a second quantisation, and neither base is the original model; `qlora-bench nf4-cost` measures "
               "what NF4 costs these weights beside genuine fp32 ones")

CLASSIFIER_HEAD = ("a sequence classifier: the encoder reads the prompt; the head (the checkpoint's pooler, which "
                   "all-MiniLM-L6-v2's own mean pooling never used, and a new classifier seeded by the run's seed) is "
                   "16-bit and trained in full in every method, at the method's learning rate; the base is the "
                   "untrained head")


# ---- the runs --------------------------------------------------------------------------------------------------


def train_and_score(cfg: RunConfig, task: Task, eval_examples: list[Example], *, measure_memory: bool = True,
                    with_base: bool = False, log=print) -> dict:
    """Build cfg, (optionally score the untrained model), train cfg.steps steps of the task, score. Returns the
    per-example scores, timings and (measure_memory) the ledger's categories of the second step."""
    from bench.measuring import record
    from bench.measuring.measure import build_shown, ledgered
    from qlora.build import count_trainable
    from qlora.optim import make_optimizer
    from qlora.train import timed_steps

    classifier = models.is_encoder(models.hf_config(models.resolve(cfg.model), cfg.layers))
    built = build_shown(cfg, num_labels=len(task.train[0].choices) if classifier else 2)
    model, tok = built.model, built.tokenizer
    if tok is None:
        raise ValueError(f"model {cfg.model} has no tokenizer: quality runs need a pretrained model")
    eos = tok.eos_token_id
    head = Head(classifier, tok, cfg.seq_len, eos, tok.pad_token_id if tok.pad_token_id is not None else eos)
    device = next(model.parameters()).device
    # The environment (git commit and dirty flag included) as the run starts: what produced the numbers.
    result = {"config": cfg.to_dict(), "trainable_parameters": count_trainable(model),
              "env": record.environment(cfg.device)}

    def scored(what: str) -> dict:
        with progress.bar(len(eval_examples), f"{cfg.method}: scoring {what}", unit="seq") as shown:
            return head.score(model, eval_examples, on_batch=shown.update)

    if with_base:
        t0 = time.perf_counter()
        result["base"] = scored("the base")
        log(f"  {cfg.method} base scored in {time.perf_counter() - t0:.0f} s")
    pairs = head.pairs(task.train)
    steps = schedule(len(pairs), cfg.steps, cfg.batch_size, cfg.seed)
    targets = []

    def batches():  # collated as each step comes, as a training loop over a dataset would
        for idx in steps:
            batch = head.collate([pairs[j] for j in idx])
            targets.append(head.target_tokens(batch))
            yield batch

    optimizer = make_optimizer(cfg, model)
    model.train()
    started = time.perf_counter()

    def around(index, step):  # the second step: optimizer state exists, as in `measure`
        if index != 1 or not measure_memory:
            return None
        loss, ledger = ledgered(step, model, optimizer, device)
        result["bytes"], result["peak_at"] = ledger.categories(), ledger.peak_at
        return loss

    def logged(s):
        shown.update(loss=f"{s.loss:.3f}")
        if (s.index + 1) % max(1, len(steps) // 4) == 0:
            log(f"  {cfg.method} seed {cfg.seed}: step {s.index + 1}/{len(steps)} loss {s.loss:.3f} "
                f"({time.perf_counter() - started:.0f} s)")

    with progress.bar(len(steps), f"{cfg.method} seed {cfg.seed}: training", unit="step") as shown:
        done = timed_steps(model, optimizer, batches(), around=around, on_step=logged)
    train_seconds = time.perf_counter() - started
    timed = [s for s in done if s.seconds is not None]
    t0 = time.perf_counter()
    result["tuned"] = scored("the tuned model")
    result.update(train_losses=[s.loss for s in timed], step_seconds=statistics.median(s.seconds for s in timed),
                  tokens=sum(s.tokens for s in done), target_tokens=sum(targets), schedule_digest=_digest(steps),
                  train_seconds=train_seconds, score_seconds=time.perf_counter() - t0)
    return result


def _digest(steps: list[list[int]]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(steps).encode()).hexdigest()[:16]


def eval_digest(examples: list[Example]) -> str:
    import hashlib

    return hashlib.sha256(repr(examples).encode("utf-8")).hexdigest()[:16]


def run(cfgs: list[RunConfig], task: Task, eval_examples: int, seeds: int, out: Path | None = None,
        log=print, lr_grid: dict | None = None) -> list[dict]:
    """Every (seed, method) of cfgs fine-tuned and scored, then one result record per method with `quality`.

    cfgs: one RunConfig per method (seed 0; seeds 1..K-1 are the same with another seed). Per-run scores are
    appended to OUT/quality-runs.jsonl as each finishes, and runs found there (same task, held-out examples and
    config) are not run again, so an interrupted run resumes. The unquantised base is scored by the first of the
    full/lora builds of seed 0, the 4-bit base by the qlora build (LoRA's B starts at zero: the untrained model
    is the base). With `lr_grid`, each method's rate is chosen first on a validation split carved from the
    training examples (bench.running.lr_search), and the final runs train on the examples less that split.
    """
    from bench.measuring import record
    from bench.running import lr_search

    searched = {}
    if lr_grid:
        task, valid = lr_search.carve(task)
        for c in cfgs:
            searched[c.method] = lr_search.search(c, task, valid, lr_grid[c.method], out, log=log,
                                                  train_and_score=train_and_score, digest=eval_digest(valid))
        cfgs = [replace(c, lr=searched[c.method]["chosen"]) for c in cfgs]
    held = task.heldout[:eval_examples]
    digest = eval_digest(held)
    commit = record.git_state()["git_commit"]  # runs of other code are not resumed: they measure again
    runs_file = out / "quality-runs.jsonl" if out is not None else None
    done = {}
    if runs_file is not None and runs_file.exists():
        for r in record.read_objects(runs_file):
            done[run_key(r["config"], task=r["task"], heldout=r["heldout_digest"],
                         commit=(r.get("env") or {}).get("git_commit"))] = r
    base_by = next((c.method for c in cfgs if c.method in ("full", "lora")), None)
    results: dict[str, list[dict]] = {c.method: [] for c in cfgs}
    for seed in range(seeds):
        for c in cfgs:
            cfg = replace(c, seed=c.seed + seed)
            k = run_key(cfg.to_dict(), task=task.name, heldout=digest, commit=commit)
            if k in done:
                log(f"{task.name} {cfg.method} seed {cfg.seed}: already scored")
                r = done[k]
            else:
                log(f"{task.name} {cfg.method} seed {cfg.seed}: {cfg.steps} steps of {cfg.batch_size}, then "
                    f"{len(held)} held-out examples")
                with_base = seed == 0 and cfg.method in (base_by, "qlora")
                r = train_and_score(cfg, task, held, with_base=with_base, log=log)
                r.update(task=task.name, heldout_digest=digest)
                if runs_file is not None:
                    record.append(runs_file, r)
            results[cfg.method].append(r)
    return records(cfgs, task, held, results, searched)


def records(cfgs: list[RunConfig], task: Task, held: list[Example], results: dict[str, list[dict]],
            searched: dict[str, dict] | None = None) -> list[dict]:
    from bench.measuring import record

    scores = {m: [r["tuned"] for r in rs] for m, rs in results.items()}
    bases = {}
    for m, rs in results.items():
        if "base" in rs[0]:
            bases["base_4bit" if m == "qlora" else "base"] = [rs[0]["base"]]
    has_reference = "full" in scores
    boot = bootstrap({**scores, **bases}, task.metric) if has_reference else {}
    n_seeds = len(next(iter(results.values())))
    baseline = {name: {**summarise(s[0], task.metric), **_relative(boot.get(name))} for name, s in bases.items()}
    # Failed runs: flagged per method, and every figure given again without their seeds (dropped for every method,
    # so the comparison stays paired).
    failed = {m: collapsed(rs, baseline.get("base"), task.metric, lambda r: summarise(r["tuned"], task.metric))
              for m, rs in results.items()}
    dropped = sorted({f["seed"] for fs in failed.values() for f in fs})
    without = {}
    if dropped and has_reference:
        keep = {m: [r for r in rs if r["config"]["seed"] not in dropped] for m, rs in results.items()}
        if all(keep.values()):
            without = bootstrap({**{m: [r["tuned"] for r in rs] for m, rs in keep.items()}, **bases}, task.metric)
    out = []
    for cfg in cfgs:
        rs = results[cfg.method]
        per_seed = [summarise(r["tuned"], task.metric) for r in rs]
        pooled = summarise(_pool([r["tuned"] for r in rs]), task.metric)
        quality = {
            "task": task.name, "source": task.source, "metric": task.metric, "value": pooled["value"],
            "loss": pooled["loss"], "perplexity": pooled["perplexity"], **({"accuracy": pooled["accuracy"]}
                                                                            if "accuracy" in pooled else {}),
            "per_seed": per_seed, "seeds": [r["config"]["seed"] for r in rs], "eval_examples": len(held),
            "heldout_digest": rs[0]["heldout_digest"] if "heldout_digest" in rs[0] else eval_digest(held),
            **_relative(boot.get(cfg.method)),
            "train": {"steps": cfg.steps, "batch_size": cfg.batch_size, "examples": cfg.steps * cfg.batch_size,
                      "tokens": rs[0]["tokens"], "target_tokens": rs[0]["target_tokens"],
                      "schedule_digest": rs[0]["schedule_digest"], "lr": cfg.lr,
                      "first_loss": rs[0]["train_losses"][0], "last_loss": rs[0]["train_losses"][-1]},
            "collapsed": failed[cfg.method],
            "collapsed_elsewhere": sorted({f["seed"] for m, fs in failed.items() if m != cfg.method for f in fs}),
            **baseline,
        }
        if (searched or {}).get(cfg.method):
            quality["lr_search"] = searched[cfg.method]
        if cfg.method == "qlora" and "gap" in boot:
            quality["gap_to_lora"] = boot["gap"]
        if without:
            kept = [s for s in quality["seeds"] if s not in dropped]
            quality["without_collapsed"] = {"seeds": kept, **_relative(without.get(cfg.method)),
                                            **({"gap_to_lora": without["gap"]} if cfg.method == "qlora"
                                               and "gap" in without else {})}
        if task.note:
            quality["task_note"] = task.note
        if cfg.model == "smollm2-135m-instruct":
            quality["caveat"] = Q4_1_CAVEAT
        if models.is_encoder(models.hf_config(models.resolve(cfg.model))):
            quality["head"] = CLASSIFIER_HEAD
        step = statistics.median(r["step_seconds"] for r in rs)
        tokens_per_step = rs[0]["tokens"] / cfg.steps
        out.append(record.make(cfg.to_dict(), source="measured", status="ok", bytes_=rs[0].get("bytes"),
                               step_seconds=step, tokens_per_second=tokens_per_step / step, quality=quality,
                               env=rs[0].get("env") or record.environment(cfg.device), peak_at=rs[0].get("peak_at"),
                               trainable_parameters=rs[0]["trainable_parameters"], n_seeds=n_seeds))
    return out


def rescore(out: Path, log=print) -> list[dict]:
    """The quality records of OUT/quality-runs.jsonl made again from the per-example scores it holds, without
    training anything: what a change to the statistics (gain share, collapsed seeds, the gap) needs. One record per
    (task, held-out set, method), from the latest run of every seed; written like `run`'s (OUT/results.jsonl and
    summary.md). Raises ConfigError when there is nothing to rescore or a held-out set no longer matches."""
    from bench.measuring import record
    from qlora import tasks
    from qlora.config import ConfigError

    runs_file = out / "quality-runs.jsonl"
    if not runs_file.is_file():
        raise ConfigError(f"no {runs_file}: nothing to rescore (a quality run with --out writes it)")
    results_file = out / "results.jsonl"  # the learning-rate search of each record it replaces is kept
    earlier = {record_key(r): r for r in record.read(results_file)} if results_file.is_file() else {}
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in record.read_objects(runs_file):
        seedless = {**r["config"], "seed": 0}
        key = (r["config"]["model"], r["task"], r["heldout_digest"])  # two models on one held-out set: two groups
        groups.setdefault(key, {}).setdefault(run_key(seedless), {})[r["config"]["seed"]] = r  # the latest wins
    new = []
    for (_, name, digest), by_config in groups.items():
        task = tasks.load_task(name)
        first = next(iter(next(iter(by_config.values())).values()))
        held = task.heldout[:len(first["tuned"]["nll"])]
        if eval_digest(held) != digest:
            raise ConfigError(f"{runs_file}: the held-out set of {name} ({digest}) is not this version's")
        results, cfgs = {}, []
        for runs in by_config.values():
            ordered = [runs[k] for k in sorted(runs)]
            cfg = RunConfig.from_dict({**ordered[0]["config"]})
            results[cfg.method] = ordered
            cfgs.append(cfg)
        cfgs.sort(key=lambda c: METHODS.index(c.method))
        log(f"{name}: {', '.join(f'{c.method} x {len(results[c.method])} seed(s)' for c in cfgs)}")
        searched = {c.method: earlier[k]["quality"]["lr_search"] for c in cfgs
                    if (k := run_key(c.to_dict(), task=name, heldout=digest)) in earlier
                    and earlier[k]["quality"].get("lr_search")}
        new += records(cfgs, task, held, results, searched)
    new = [_unchanged(earlier, r) for r in new]
    save(out, new)
    return new


def _unchanged(earlier: dict, r: dict) -> dict:
    """The earlier record of r's run where rescoring changed none of its figures (ids, times, the environment and
    the config's spelling aside: a field added to RunConfig since is not a change), else r."""
    before = earlier.get(record_key(r))
    skip = ("id", "created", "env", "config")
    if before is not None and {k: v for k, v in before.items() if k not in skip} == {
            k: v for k, v in r.items() if k not in skip}:
        return before
    return r


def _pool(scores: list[dict]) -> dict:
    return {k: [x for s in scores for x in s[k]] for k in scores[0]}


def _relative(b: dict | None) -> dict:
    if b is None:
        return {"relative": None, "difference": None}
    return {"relative": b["relative"], "difference": b["difference"],
            **({"gain_share": b["gain_share"]} if "gain_share" in b else {})}


def record_key(r: dict) -> str:
    return run_key(r["config"], task=r["quality"]["task"], heldout=r["quality"]["heldout_digest"])


def save(out: Path, new: list[dict]) -> None:
    """OUT/results.jsonl holds the latest record of every (task, held-out set, config); rewritten atomically."""
    from bench.measuring import record

    path = out / "results.jsonl"
    old = record.read(path) if path.exists() else []
    keys = {record_key(r) for r in new}
    kept = [r for r in old if record_key(r) not in keys] + new
    record.write_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
    record.write_atomic(out / "summary.md", render_quality.markdown(kept))
