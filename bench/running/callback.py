"""`MemoryLedgerCallback`: the memory ledger inside your own `transformers.Trainer` or TRL `SFTTrainer` run.

    from bench.running.callback import MemoryLedgerCallback
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, callbacks=[MemoryLedgerCallback("prof")])

For each optimizer step asked for (default: the second, so the optimizer state exists) the ledger follows every
tensor from the step's first micro-batch to the end of its optimizer step (with gradient accumulation: the whole
window), and the callback writes a result record (DESIGN.md's schema, source `measured`) to OUT/results.jsonl: the
categories at the peak, where it fell, the timeline, the device's own figures, and the estimator's figure for the
same configuration (also as an estimate record beside it, so `qlora-bench report OUT` shows the difference). The
configuration is read from the model (method, quantisation, LoRA), the `TrainingArguments` (optimizer, seed,
checkpointing) and the batch the step trained on (batch size and padded length); what no config expresses is in
its `caveats` (bench.running.trainer_config). Other steps run untouched; the record's `step_seconds` is their
median, `ledger_step_seconds` the measured step's. Under several processes only rank 0 measures.

On CUDA, `snapshot=True` also records PyTorch's allocator history over the same steps and writes it with
`torch.cuda.memory._dump_snapshot` beside the records (`snapshot-stepN.pickle`, for https://pytorch.org/memory_viz);
the callback writes that file and never loads one.

Blind spots, beside the ledger's own (bench.measuring.ledger): the batch itself (fetched before the step starts)
and anything the Trainer allocates outside the step (evaluation, checkpoint saving).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.measuring import record
from bench.measuring.ledger import Ledger
from bench.measuring.probes import DeviceProbe
from bench.running.trainer_config import base_model, config_of, inner_optimizer, model_name, optimizer_of
from bench.schema import STATIC
from qlora.config import ConfigError, RunConfig
from qlora.optim import implementation


class StepLedger(Ledger):
    """The ledger over a Trainer step, which has no phase hooks of its own: backward begins with the first op an
    autograd node runs (the loss's own backward included, wherever the trainer computed the loss)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._phase == "forward" and torch._C._current_autograd_node() is not None:
            self.phase("backward")
        return super().__torch_dispatch__(func, types, args, kwargs)


def estimate_beside(cfg: RunConfig) -> tuple[dict | None, str | None]:
    """The estimate record of cfg (source `estimated`, purpose "beside a run"), or None and why there is none (a
    model the estimator cannot resolve offline, an architecture it does not model)."""
    from bench.modelling.records import estimate_record

    try:
        return estimate_record(cfg, purpose="beside a run"), None
    except Exception as e:  # noqa: BLE001 - a profiling aid must never stop the user's training
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


class MemoryLedgerCallback(TrainerCallback):
    """Records memory by category for chosen optimizer steps of a Trainer run; see the module docstring.

    out: folder for results.jsonl (and snapshots), or None to keep the records in `.records` only.
    steps: 1-based optimizer steps to measure (default: the second).
    model: the name to record and estimate (a bundled name, a directory or a hub id); default: the model's
        `name_or_path`. Without one the record carries no estimate.
    snapshot: on CUDA, dump the allocator's memory history of the measured steps (for memory_viz).
    estimate: set the estimator's figure beside each record.

    Use it as a context manager around `trainer.train()` where a step may fail: a Trainer calls no callback when
    training raises, and the ledger of a step that never ended would stay active (the next train() also ends it).
    """

    def __init__(self, out: str | Path | None = None, steps=(2,), model: str | None = None, snapshot: bool = False,
                 estimate: bool = True):
        steps = tuple(steps)
        if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
            raise ConfigError(f"MemoryLedgerCallback: steps must be optimizer step numbers >= 1, got {steps!r}")
        self.out = None if out is None else Path(out)
        self.steps, self.name, self.snapshot, self.estimate = set(steps), model, snapshot, estimate
        self.records: list[dict] = []
        self.failures: list[str] = []  # records that could not be made, in one line each (training went on)
        self._ledger: StepLedger | None = None
        self._probe: DeviceProbe | None = None
        self._hook = None
        self._shape, self._micro = (0, 0), 0
        self._seconds: list[float] = []
        self._t0 = 0.0
        self._model = self._optimizer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """End a measured step that never reached its end (training raised inside it): the dispatch mode, hooks and
        CUDA memory history go, and nothing is recorded for it."""
        ended = self._end()
        if ended is not None:
            self._history_off(ended[0].device)

    # ---- Trainer events ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.close()  # an earlier train() that raised inside a measured step
        self._model, self._optimizer = model, optimizer
        self._seconds = []
        # Say what cannot be recorded before training starts, not after its first steps.
        if model is not None:
            config_of(model, args, (1, 1), self.name or model_name(model) or "unnamed")
        else:
            optimizer_of(args)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.close()
        self._model, self._optimizer = model or self._model, optimizer or self._optimizer
        self._t0 = time.perf_counter()
        if state.global_step + 1 not in self.steps or not state.is_world_process_zero:
            return
        device = next(self._model.parameters()).device
        self._shape, self._micro = (0, 0), 0
        self._hook = self._model.register_forward_pre_hook(self._forward, with_kwargs=True)
        if self.snapshot and device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._probe = DeviceProbe(device)
        self._probe.start()
        self._ledger = StepLedger(self._model, inner_optimizer(self._optimizer), device)
        self._ledger.__enter__()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._ledger is not None:
            self._ledger.phase("optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._ledger is not None:
            self._ledger.phase("zero_grad")

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._t0
        if self._ledger is None:
            self._seconds.append(seconds)
            return
        self._ledger.phase("end")
        ledger, figures = self._end()
        t0 = time.perf_counter()
        try:
            rec, est = self._record(args, state, ledger, figures, seconds)
        except Exception as e:  # noqa: BLE001 - a profiling aid must never stop the user's training
            self.failures.append(f"step {state.global_step}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            print(f"MemoryLedgerCallback: no record for {self.failures[-1]}", file=sys.stderr, flush=True)
            return
        finally:  # after the snapshot is dumped, or not
            self._history_off(ledger.device)
        rec["record_seconds"] = time.perf_counter() - t0  # making the record (estimate, timeline, git): not a step's
        self.records.append(rec)
        if self.out is not None:
            for r in (rec, est):
                if r is not None:
                    record.append(self.out / "results.jsonl", r)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        mine = [r for r in self.records if r["step_seconds"] is None]
        if mine and self._seconds:  # the untouched steps' time, known only now
            for r in mine:
                r["step_seconds"] = statistics.median(self._seconds)
                r["tokens_per_second"] = r["trainer"]["tokens"] / r["step_seconds"]
            if self.out is not None:
                record.update(self.out / "results.jsonl", mine)

    # ---- the measured step ---------------------------------------------------------------------------------
    def _end(self) -> tuple[StepLedger, dict] | None:
        """Stop following the measured step, if one is on: the ledger and the device's figures."""
        ledger, self._ledger = self._ledger, None
        if ledger is None:
            return None
        ledger.__exit__(None, None, None)
        self._hook.remove()
        return ledger, self._probe.stop()

    def _history_off(self, device) -> None:
        if self.snapshot and device.type == "cuda":
            torch.cuda.memory._record_memory_history(enabled=None)

    def _forward(self, module, args, kwargs):
        """Each micro-batch's forward: the phase, its tokens, and the batch's shape (the largest of the window's)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            self._shape = (max(self._shape[0], ids.shape[0]), max(self._shape[1], ids.shape[1]))
        self._micro += 1
        self._ledger.phase("forward")

    def _dump(self, cfg: RunConfig, step: int, device) -> dict | None:
        if not (self.snapshot and device.type == "cuda"):
            return None
        path = None
        if self.out is not None:  # one file per method and step: several runs may share the folder
            path = self.out / f"snapshot-{cfg.method}-{cfg.batch_size}x{cfg.seq_len}-step{step}.pickle"
            self.out.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
        return {"file": path.name, "bytes": path.stat().st_size} if path else None

    def _record(self, args, state, ledger: StepLedger, figures: dict, seconds: float) -> tuple[dict, dict | None]:
        name = self.name or model_name(self._model) or "unnamed"
        caveats: list[str] = []
        cfg = config_of(self._model, args, self._shape, name, state.max_steps, caveats)
        snapshot = self._dump(cfg, state.global_step, ledger.device)
        est, why = estimate_beside(cfg) if self.estimate else (None, "not asked for")
        measured = ledger.categories()
        beside = None
        if est is not None:
            peak = est["bytes"]["peak"]
            beside = {"id": est["id"], "peak": peak, "bytes": est["bytes"], "phase": est["peak_at"]["phase"],
                      "error": round(peak / measured["peak"] - 1, 4)}
        autocast = "bf16" if args.bf16 else "fp16" if args.fp16 else None
        rec = record.make(
            cfg.to_dict(), source="measured", status="ok", bytes_=measured, device_figures=figures,
            step_seconds=None, tokens_per_second=None, env=record.environment(ledger.device),
            layers=base_model(self._model).config.num_hidden_layers, peak_at=ledger.peak_at,
            backward_start=ledger.categories_at("backward"), timeline=ledger.timeline(),
            static={c: v for c, v in ledger.categories_at("optimizer").items() if c in STATIC},
            optimizer_impl=implementation(inner_optimizer(self._optimizer)),
            optimizer_paged_bytes=ledger.paged_bytes(), ledger_step_seconds=seconds, estimate=beside,
            caveats=caveats, **({"estimate_missing": why} if est is None else {}),
            # step_seconds covers the whole accumulation window: its tokens are every micro-batch's (padding in)
            trainer={"step": state.global_step, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                     "micro_batches": self._micro, "micro_batch": list(self._shape),
                     "tokens": self._micro * self._shape[0] * self._shape[1], "autocast": autocast,
                     "max_grad_norm": args.max_grad_norm, "world_size": getattr(args, "world_size", 1)},
            **({"snapshot": snapshot} if snapshot else {}))
        return rec, est
