"""One measured run: build, a first step (which allocates optimizer state), timed steps, then a step under the
ledger with the device probes around it. `--layers N` measures two reduced depths and extrapolates to full depth.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import replace

import torch

from bench import progress
from bench.measuring import record
from bench.measuring.ledger import BudgetExceeded, Ledger
from bench.measuring.probes import DeviceProbe, rss_anon_bytes
from bench.measuring.runner import RunFailed, is_oom
from bench.schema import CATEGORIES, STATIC
from qlora import models
from qlora.build import build, count_trainable
from qlora.config import ConfigError, RunConfig, pattern_depth_ok
from qlora.optim import implementation, make_optimizer
from qlora.train import timed_steps, train_step


def ledgered(step, model, optimizer, device, budget: int | None = None, gathered=()) -> tuple[float, Ledger]:
    """A `timed_steps` step (step(on_phase) -> loss) run under the memory ledger: its loss and the ledger.
    `gathered`: storages of a sharded model's all-gather buffers (bench.measuring.sharded)."""
    ledger = Ledger(model, optimizer, device, budget, gathered=gathered)
    with ledger:
        loss = step(ledger.phase)
    return loss, ledger


def ledgered_step(model, optimizer, batch, device, budget: int | None = None) -> Ledger:
    """One training step on `batch` under the memory ledger (benchmarks time the ledger's overhead with it)."""
    return ledgered(lambda on_phase: train_step(model, optimizer, batch, on_phase), model, optimizer, device,
                    budget)[1]


def build_shown(cfg: RunConfig, num_labels: int = 2):
    """qlora.build.build with a bar of the layers built (and quantised) when bars are on: minutes at 7B on CPU.
    `num_labels`: an encoder's classes (quality runs)."""
    with progress.bar(None, f"{cfg.method}: building", unit="layer") as shown:
        return build(cfg, on_layer=shown.at, num_labels=num_labels)


def measure_once(cfg: RunConfig, budget: int | None = None, seed_offset: int = 0) -> dict:
    """Measure cfg at the depth it asks for. Returns a dict of raw figures (not yet a record). With a `budget`
    (bytes), live tensors beyond it raise BudgetExceeded: an out-of-memory at that capacity.

    Steps (qlora.train.timed_steps, all on one batch): the first under the ledger (it allocates optimizer state,
    often the run's real peak, so it is the one held to the budget), cfg.steps timed, and a last one under the
    ledger with the device probes around it: the measured step.

    A sharded cfg is one rank's part (inside torch.distributed, bench.measuring.sharded): the model is sharded before
    the optimizer is made, and `seed_offset` (the rank) gives each rank its own batch."""
    baseline = rss_anon_bytes()
    built = build_shown(cfg)
    gathered = list
    if cfg.shard != "none":
        from bench.measuring.sharded import wrap

        built.model, gathered = wrap(built.model, cfg)
    device = next(built.model.parameters()).device
    optimizer = make_optimizer(cfg, built.model)
    g = torch.Generator().manual_seed(cfg.seed + seed_offset)
    # Memory and speed do not depend on which token ids are fed; random ids in the vocabulary keep it simple.
    batch = torch.randint(0, built.hf_config.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g).to(device)
    last = cfg.steps + 1
    ledgers, probe = {}, DeviceProbe(device)
    at_start = {}

    def around(index, step):
        if index not in (0, last):
            return None
        if index == last:
            at_start["rss"] = rss_anon_bytes()
            probe.start()
        loss, ledgers[index] = ledgered(step, built.model, optimizer, device, budget, gathered())
        return loss

    with progress.bar(last + 1, f"{cfg.method}: steps", unit="step") as shown:
        steps = timed_steps(built.model, optimizer, itertools.repeat(batch, last + 1), around=around,
                            on_step=lambda s: shown.update(loss=f"{s.loss:.3f}"))
    figures = probe.stop()
    first, ledger = ledgers[0], ledgers[last]
    step_seconds = statistics.median(s.seconds for s in steps if s.seconds is not None)
    return {
        "bytes": ledger.categories(),
        "peak_at": ledger.peak_at,
        "timeline": ledger.timeline(),
        "first_step": {"peak": first.peak, "peak_at": first.peak_at, "bytes": first.categories()},
        # what the batch keeps for backward, as backward starts (the moment an "activations" claim is about; the
        # step's peak may fall elsewhere, e.g. in the optimizer step)
        "backward_start": ledger.categories_at("backward"),
        "device_figures": figures,
        "rss_anon_baseline": baseline,
        # RSS as the measured step starts, and the ledger's live bytes then: their difference is what the process
        # holds besides tensors (interpreter, libraries, allocator slack), to set beside the peak.
        "rss_anon_step_start": at_start["rss"],
        "ledger_step_start": ledger.start_bytes,
        "step_seconds": step_seconds,
        "tokens_per_second": batch.numel() / step_seconds,
        "trainable_parameters": count_trainable(built.model),
        "layers": built.hf_config.num_hidden_layers,
        "optimizer_impl": implementation(optimizer),
        # the timed steps' losses, on one repeated batch: finite and falling, or the run trained on garbage
        # (JSON has no NaN: a diverged step is null)
        "train_losses": [s.loss if math.isfinite(s.loss) else None for s in steps if s.seconds is not None],
        # paged optimizer state (CUDA managed memory): in `optimizer`, but never in the allocator's figures
        "optimizer_paged_bytes": ledger.paged_bytes(),
        # a sharded rank's all-gathered parameters live at the peak (in `weights`, beside its own shard)
        "gathered_bytes": ledger.gathered_bytes(),
        # what the rank holds as its optimizer step starts: its shards of weights, gradients and optimizer state
        "static": {c: v for c, v in ledger.categories_at("optimizer").items() if c in STATIC},
    }


def linear(near: dict, far: dict, n0: int, n1: int, depth: int, keys=CATEGORIES) -> dict:
    """`keys` linear in depth through two measurements (n0 < n1 layers), in whole bytes: exact for quantities that
    are a fixed part plus a per-layer part."""
    return {k: int(round(near[k] + (far[k] - near[k]) * (depth - n0) / (n1 - n0))) for k in keys}


def extrapolate_bytes(near: dict, far: dict, n0: int, n1: int, depth: int) -> dict:
    """Categories linear in depth through two measurements (n0 < n1 layers): exact for quantities that are a fixed
    part plus a per-layer part, which holds when both peaks fall at the same point of the step."""
    out = linear(near, far, n0, n1, depth)
    out["peak"] = sum(out.values())
    return out


def extrapolate(near: dict, far: dict, depth: int) -> dict:
    """Extrapolate a reduced-depth pair of raw measurements to `depth` layers (bytes, first step, step time)."""
    n0, n1 = near["layers"], far["layers"]
    per_layer = (far["step_seconds"] - near["step_seconds"]) / (n1 - n0)
    # Timings are noisy where memory is not: a slope at or below zero says the noise swamped one layer's time.
    seconds = far["step_seconds"] + per_layer * (depth - n1) if per_layer > 0 else None
    first = extrapolate_bytes(near["first_step"]["bytes"], far["first_step"]["bytes"], n0, n1, depth)
    backward = extrapolate_bytes(near["backward_start"], far["backward_start"], n0, n1, depth)
    backward["total"] = backward.pop("peak")
    return {
        "bytes": extrapolate_bytes(near["bytes"], far["bytes"], n0, n1, depth),
        "backward_start": backward,
        "first_step": {"peak": first["peak"], "peak_at": far["first_step"]["peak_at"], "bytes": first},
        "step_seconds": seconds,
        "tokens_per_second": None if seconds is None else far["tokens_per_second"] * far["step_seconds"] / seconds,
    }


def check(cfg: RunConfig) -> RunConfig:
    """cfg checked before any work (qlora.preflight, and two depths to extrapolate from), targets resolved."""
    from qlora.preflight import preflight

    cfg = preflight(cfg)
    if cfg.shard != "none":
        from bench.measuring.sharded import check as check_sharded

        check_sharded(cfg)
    if cfg.layers is not None and cfg.layers < models.hf_config(models.resolve(cfg.model)).num_hidden_layers:
        if cfg.layers < 2:
            raise ConfigError(f"layers must be >= 2 to extrapolate (two depths are fitted), got {cfg.layers}")
        if not pattern_depth_ok(cfg, cfg.layers):  # each depth must hold whole runs of the checkpointing pattern
            every = cfg.ckpt_every
            raise ConfigError(f"layers {cfg.layers} with ckpt_every {every}: both depths measured ({cfg.layers // 2} "
                              f"and {cfg.layers}) must be multiples of {every}; use --layers {2 * every}")
    return cfg


def in_this_process(fn, cfg: RunConfig, **kwargs):
    return fn(cfg, **kwargs)


def measure(cfg: RunConfig, run=in_this_process, budget: int | None = None) -> dict:
    """A result record for cfg: measured at full depth, or extrapolated when cfg.layers is below it.

    `run(fn, cfg, **kwargs)` runs one measurement: in this process by default; the CLI and sweeps pass
    `bench.measuring.runner.isolated` (a fresh process per depth, so the deeper model never shares memory with the
    first).
    Out-of-memory becomes a record with status "oom"; other failures status "error". Bad input raises ConfigError.
    """
    cfg = check(cfg)  # bad input fails here, before any model is built; lora_targets resolved for the record

    def measure_at(c):  # every depth is measured under the same budget
        if c.shard != "none":  # the rank with the highest peak, every rank under "ranks"
            from bench.measuring.sharded import launch

            ranks = run(launch, c, budget=budget)["ranks"]
            return {**max(ranks, key=lambda raw: raw["bytes"]["peak"]), "ranks": ranks}
        return run(measure_once, c, budget=budget)

    full_depth = models.hf_config(models.resolve(cfg.model)).num_hidden_layers
    env = record.environment(cfg.device)
    extrapolating = cfg.layers is not None and cfg.layers < full_depth
    source = "extrapolated" if extrapolating else "measured"
    try:
        if not extrapolating:
            raw = measure_at(cfg)
            fields = {k: raw[k] for k in ("bytes", "first_step", "backward_start", "step_seconds",
                                          "tokens_per_second")}
            figures = raw["device_figures"]
            extra = {k: raw[k] for k in ("rss_anon_baseline", "rss_anon_step_start", "ledger_step_start",
                                         "optimizer_paged_bytes", "train_losses")}
            if "ranks" in raw:
                extra["ranks"] = [_rank_summary(r, {k: r[k] for k in ("bytes", "first_step", "backward_start",
                                                                       "step_seconds")}) for r in raw["ranks"]]
        else:
            near = measure_at(replace(cfg, layers=cfg.layers // 2))
            raw = measure_at(cfg)
            if "ranks" in raw:  # one rank through both depths: the one with the highest peak at the larger
                near = {**near["ranks"][raw["rank"]], "ranks": near["ranks"]}
            fields = extrapolate(near, raw, full_depth)
            figures = None  # the device saw smaller models; their own figures are under measured_at
            extra = {"measured_at": [_depth_summary(near), _depth_summary(raw)], "timeline_layers": raw["layers"]}
            if "ranks" in raw:
                extra["ranks"] = [_rank_summary(f, extrapolate(n, f, full_depth), n, full_depth)
                                  for n, f in zip(near["ranks"], raw["ranks"], strict=True)]
            if near["peak_at"]["phase"] != raw["peak_at"]["phase"]:
                extra["warning"] = (f"the peak falls in {near['peak_at']['phase']} at {near['layers']} layers but in "
                                    f"{raw['peak_at']['phase']} at {raw['layers']}: the extrapolation is approximate")
    except (ConfigError, KeyboardInterrupt, SystemExit):  # bad input, Ctrl-C, SIGTERM/SIGHUP (cli._terminated):
        raise  # the caller stops; none of them is the run's result
    except BaseException as e:  # an out-of-memory run is a result; any other failure is recorded with its message
        status = "oom" if is_oom(e) else "error"
        if isinstance(e, RunFailed):  # it happened in the run's own process: the runner has classified it
            message, reached = e.message, dict(e.extra)
        else:
            message = (f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__])[0]
            reached = {"oom_bytes": e.live} if isinstance(e, BudgetExceeded) else {}
        return record.make(cfg.to_dict(), source=source, status=status, bytes_=None, error=message, env=env,
                           layers=full_depth, budget_bytes=budget, **reached)
    return record.make(
        cfg.to_dict(), source=source, status="ok", bytes_=fields["bytes"], device_figures=figures,
        step_seconds=fields["step_seconds"], tokens_per_second=fields["tokens_per_second"], env=env,
        layers=full_depth, budget_bytes=budget, trainable_parameters=raw["trainable_parameters"],
        optimizer_impl=raw["optimizer_impl"], peak_at=raw["peak_at"],
        first_step=fields["first_step"], backward_start=fields["backward_start"], timeline=raw["timeline"],
        **({"rank": raw["rank"], "world_size": cfg.world_size} if "ranks" in raw else {}), **extra,
    )


def _rank_summary(raw: dict, fields: dict, near: dict | None = None, depth: int | None = None) -> dict:
    """One rank's figures in a sharded run's record (`fields`: its bytes, first step, backward start and step time,
    measured, or extrapolated to `depth` from `near`, the same rank at the smaller depth)."""
    gathered, static = raw["gathered_bytes"], raw["static"]
    if near is not None:  # linear in depth, as the categories are
        n0, n1 = near["layers"], raw["layers"]
        gathered = linear(near, raw, n0, n1, depth, ("gathered_bytes",))["gathered_bytes"]
        static = linear(near["static"], static, n0, n1, depth, STATIC)
    return {"rank": raw["rank"], "bytes": fields["bytes"], "gathered_bytes": gathered, "static": static,
            "backward_start": fields["backward_start"], "first_step": fields["first_step"],
            "peak_at": raw["peak_at"], "step_seconds": fields["step_seconds"], **raw["device_figures"]}


def _depth_summary(raw: dict) -> dict:
    return {"layers": raw["layers"], "bytes": raw["bytes"], "peak_at": raw["peak_at"],
            "backward_start": raw["backward_start"],
            "step_seconds": raw["step_seconds"], "train_losses": raw["train_losses"], **raw["device_figures"]}
