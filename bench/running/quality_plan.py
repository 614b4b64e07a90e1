"""What a quality run is, checked before anything runs: from the CLI's options (`qlora-bench quality`) or a plan's
[[quality]] table. `prepare` returns the configs per method, the task, and the settings; bad input is a ConfigError
naming the value.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.schema import METHODS
from qlora.config import RunConfig
from qlora.tasks import Task

SETTINGS = {
    # quick: all three methods on one task in well under 15 minutes on 2 CPU cores (nox -s bench runs it).
    "quick": {"steps": 40, "seeds": 1, "eval_examples": 200, "batch_size": 8, "seq_len": 128},
    # long: the committed reference runs (about an hour for sentiment on 2 CPU cores).
    "long": {"steps": 100, "seeds": 3, "eval_examples": 1000, "batch_size": 8, "seq_len": 128},
    # gpu: the longer setting for a GPU (minutes for SmolLM2-135M): more steps, every held-out example up to 2000.
    "gpu": {"steps": 500, "seeds": 3, "eval_examples": 2000, "batch_size": 16, "seq_len": 256},
}


@dataclass(frozen=True)
class QualityPlan:
    configs: list[RunConfig]
    task: Task
    eval_examples: int
    seeds: int
    lr_grid: dict[str, tuple[float, ...]] | None = None  # per method: choose the rate on a validation split


def parse_lr(value, methods: list[str]) -> dict[str, float]:
    """One learning rate for every method, or per method ("full=2e-5,lora=2e-4" or a table); the documented
    defaults (qlora.config.default_lr) for the rest."""
    from qlora.config import ConfigError, default_lr

    out = {m: default_lr(m) for m in methods}
    if value is None:
        return out
    try:
        if isinstance(value, (int, float)) or (isinstance(value, str) and "=" not in value):
            out = dict.fromkeys(methods, float(value))
        else:
            pairs = value.items() if isinstance(value, dict) else (p.partition("=")[::2] for p in value.split(","))
            for m, v in pairs:
                if m.strip() not in METHODS:
                    raise ValueError(f"unknown method {m.strip()!r}")
                out[m.strip()] = float(v)
    except (ValueError, TypeError, AttributeError) as e:
        hint = "give a number or method=number pairs, e.g. full=2e-5,lora=2e-4"
        raise ConfigError(f"--lr {value!r}: {hint} ({e})") from None
    if not all(v > 0 for v in out.values()):
        raise ConfigError(f"--lr {value!r}: learning rates must be > 0")
    return out


def prepare(spec: dict, device: str) -> QualityPlan:
    """Check a quality spec (CLI options or a plan's [[quality]] table) before anything runs. Raises ConfigError
    naming the bad value."""
    from qlora import models, tasks
    from qlora.config import ConfigError

    # The keys were checked where the spec was written: the plan file (bench.running.plan) or the CLI's options.
    if "model" not in spec:
        raise ConfigError("a quality run needs a model")
    methods = spec.get("methods", "all")
    methods = METHODS if methods == "all" else methods
    methods = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise ConfigError(f"methods {spec.get('methods')!r}: a list of distinct full, lora, qlora"
                          + (f" (unknown: {bad[0]!r})" if bad else ""))
    setting = SETTINGS.get(spec.get("setting", "quick"))
    if setting is None:
        raise ConfigError(f"setting {spec['setting']!r}: one of {', '.join(SETTINGS)}")
    opts = {k: spec.get(k, v) for k, v in setting.items()}
    for k, least in (("steps", 2), ("seeds", 1), ("eval_examples", 1), ("batch_size", 1), ("seq_len", 8)):
        if type(opts[k]) is not int or opts[k] < least:
            raise ConfigError(f"--{k.replace('_', '-')} must be an integer >= {least}, got {opts[k]!r}")
    from bench.running.lr_search import parse_grid

    if spec.get("lr") is not None and spec.get("lr_grid") is not None:
        raise ConfigError("give --lr or --lr-grid, not both: a grid chooses the rate")
    lrs = parse_lr(spec.get("lr"), methods)
    grid = parse_grid(spec.get("lr_grid"), methods)
    source = models.resolve(spec["model"])
    if source.kind == "hub":
        raise ConfigError(f"model {spec['model']!r} is a hub id; quality runs need local weights with a tokenizer: "
                          "smollm2-135m-instruct, or a directory of safetensors (download the model to one first)")
    if source.kind not in ("pretrained", "weights-dir"):
        raise ConfigError(f"model {spec['model']!r} has random weights; quality runs need a pretrained model with a "
                          "tokenizer (smollm2-135m-instruct, or a directory of safetensors)")
    if spec.get("task") and spec.get("data"):
        raise ConfigError("give --task or --data, not both")
    if spec.get("eval_data") and not spec.get("data"):
        raise ConfigError("--eval-data goes with --data")
    if spec.get("data"):
        task = tasks.user_task(spec["data"], spec.get("eval_data"))
    else:
        task = tasks.load_task(spec.get("task") or "sentiment")
    if models.is_encoder(models.hf_config(source)):
        check_classes(task, spec["model"])
    r = spec.get("lora_r", RunConfig().lora_r)
    cfgs = [RunConfig(model=spec["model"], method=m, lr=lrs[m], precision=spec.get("precision", "mixed"),
                      lora_r=r, lora_alpha=2 * r if isinstance(r, int) else r, batch_size=opts["batch_size"],
                      seq_len=opts["seq_len"], steps=opts["steps"], seed=spec.get("seed", 0), device=device)
            for m in methods]
    from qlora.preflight import preflight

    # the device, the sequence length and the rank, before any training
    cfgs = [preflight(c, classifier=True) for c in cfgs]
    if spec.get("data"):
        check_examples(task, cfgs[0])
    if grid:
        from bench.running.lr_search import carve

        carve(task)  # a training set too small to carve a validation split from fails here, not after training
    return QualityPlan(cfgs, task, opts["eval_examples"], opts["seeds"], grid)


def check_classes(task: Task, model: str) -> None:
    """A sequence classifier's task: choice examples that all offer the same choices (its classes). Raises
    ConfigError naming the model and what the task is instead."""
    from qlora.config import ConfigError

    kinds = {e.kind for e in task.train + task.heldout}
    if kinds != {"choice"}:
        raise ConfigError(f"model {model!r} is a sequence classifier: it trains on choice tasks (sentiment, party, "
                          f"or --data of prompt/choices/answer), and {task.name} holds {'/'.join(sorted(kinds))} "
                          "examples")
    classes = {e.choices for e in task.train + task.heldout}
    if len(classes) > 1:
        raise ConfigError(f"model {model!r} is a sequence classifier: every example of {task.name} must offer the "
                          f"same choices (its classes), but it has {len(classes)} different sets")


def check_examples(task: Task, cfg: RunConfig) -> None:
    """Every user example has a token to predict once tokenised (a one-token text has none: nothing to train on or
    score). Raises ConfigError naming the example; checked before any training, not after it."""
    from transformers import AutoTokenizer

    from qlora import models
    from qlora.config import ConfigError
    from qlora.scoring import IGNORE, encode

    source = models.resolve(cfg.model)
    path = models.weights_dir(source)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    for side, examples in (("training", task.train), ("held-out", task.heldout)):
        for i, e in enumerate(examples):
            enc = encode(tok, e.prompt, e.target, cfg.seq_len, None if e.kind == "text" else tok.eos_token_id)
            if not any(label != IGNORE for label in enc.labels[1:]):  # the first token is never predicted
                raise ConfigError(f"{side} example {i + 1} ({e.target[:40]!r}) has no token to predict after "
                                  f"tokenising; a text example needs at least two tokens")
