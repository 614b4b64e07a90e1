"""`MemoryLedgerCallback`: the memory ledger inside your own `transformers.Trainer` or TRL `SFTTrainer` run.

    from bench.running.callback import MemoryLedgerCallback
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, callbacks=[MemoryLedgerCallback("prof")])

For each optimizer step asked for (default: the second, so the optimizer state exists) the ledger follows every
tensor from the step's first micro-batch to the end of its optimizer step (with gradient accumulation: the whole
window), and the callback writes a result record (DESIGN.md's schema, source `measured`) to OUT/results.jsonl: the
categories at the peak, where it fell, the timeline, the device's own figures, and the estimator's figure for the
same configuration (also as an estimate record beside it, so `qlora-bench report OUT` shows the difference). The
configuration is read from the model (method, quantisation, LoRA), the `TrainingArguments` (optimizer, seed,
checkpointing) and the batch the step trained on (batch size and padded length). Other steps run untouched; the
record's `step_seconds` is their median, `ledger_step_seconds` the measured step's.

On CUDA, `snapshot=True` also records PyTorch's allocator history over the same steps and writes it with
`torch.cuda.memory._dump_snapshot` beside the records (`snapshot-stepN.pickle`, for https://pytorch.org/memory_viz);
the callback writes that file and never loads one.

Blind spots, beside the ledger's own (bench.measuring.ledger): the batch itself (fetched before the step starts)
and anything the Trainer allocates outside the step (evaluation, checkpoint saving).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.measuring import record
from bench.measuring.ledger import Ledger
from bench.measuring.probes import DeviceProbe
from bench.schema import STATIC
from qlora import quantize
from qlora.config import ConfigError, RunConfig
from qlora.optim import implementation

# TrainingArguments.optim -> (RunConfig.optimizer, RunConfig.adamw_impl): the optimizers the estimator models.
OPTIMS = {"adamw_torch": ("adamw", "default"), "adamw_torch_fused": ("adamw", "fused"),
          "adamw_bnb_8bit": ("adamw8bit", "default"), "adamw_8bit": ("adamw8bit", "default"),
          "paged_adamw_8bit": ("paged_adamw8bit", "default"), "paged_adamw_32bit": ("paged_adamw32bit", "default")}
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class StepLedger(Ledger):
    """The ledger over a Trainer step, which has no phase hooks of its own: backward begins with the first op an
    autograd node runs (the loss's own backward included, wherever the trainer computed the loss)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._phase == "forward" and torch._C._current_autograd_node() is not None:
            self.phase("backward")
        return super().__torch_dispatch__(func, types, args, kwargs)


def _inner(optimizer):
    """The torch or bitsandbytes optimizer under accelerate's AcceleratedOptimizer wrapper."""
    while getattr(optimizer, "optimizer", optimizer) is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_name(model) -> str | None:
    """What the model was loaded from (a bundled name, a directory or a hub id), as its config says."""
    name = getattr(_base(model).config, "name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def config_of(model, args, batch_shape: tuple[int, int], name: str, steps: int = 1,
              caveats: list | None = None) -> RunConfig:
    """The RunConfig a Trainer run is: method, quantisation and LoRA read from the model, the optimizer, seed and
    checkpointing from `args` (TrainingArguments), batch size and length from the batch the step trained on. What
    the run does that no config expresses is appended to `caveats`, in words. Raises ConfigError naming a setting
    the suite does not model."""
    caveats = [] if caveats is None else caveats
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in OPTIMS:
        raise ConfigError(f"MemoryLedgerCallback: optim {optim!r} is not one the suite models "
                          f"({', '.join(OPTIMS)})")
    optimizer, impl = OPTIMS[optim]
    base = _base(model)
    four_bit = quantize.linear4bit_modules(base)
    peft = getattr(model, "peft_config", None)
    fields: dict = {}
    if peft:
        lora = peft[getattr(model, "active_adapter", "default")]
        targets = lora.target_modules
        if not isinstance(targets, str):  # in the order the model has them (q_proj, k_proj, ...), as runs record
            leaves = dict.fromkeys(n.rsplit(".", 1)[-1] for n, _ in _base(model).named_modules())
            targets = tuple([t for t in leaves if t in targets] + sorted(set(targets) - set(leaves)))
        fields.update(lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=float(lora.lora_dropout),
                      lora_targets=(targets,) if isinstance(targets, str) else targets)
        adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    if four_bit:
        if not peft:
            raise ConfigError("MemoryLedgerCallback: a 4-bit model without LoRA adapters cannot be trained")
        w = next(iter(four_bit.values())).weight
        fields.update(quant_type=w.quant_type, double_quant=bool(w.quant_state.nested),
                      compute_dtype=DTYPES[next(iter(four_bit.values())).compute_dtype or torch.float32])
    frozen = [p for n, p in base.named_parameters() if "lora_" not in n and p.is_floating_point()]
    dtype = frozen[0].dtype if frozen else torch.float32
    if dtype not in PRECISIONS:
        raise ConfigError(f"MemoryLedgerCallback: model dtype {dtype} is not one the suite models (fp32, bf16)")
    if peft and adapters and adapters[0].dtype == torch.float32 and dtype != torch.float32:
        fields["adapter_dtype"] = "fp32"
    elif peft and adapters and adapters[0].dtype != dtype:
        caveats.append(f"LoRA adapters are {DTYPES.get(adapters[0].dtype, adapters[0].dtype)} on a "
                       f"{PRECISIONS[dtype]} model (TRL casts a 4-bit model's adapters to bf16 under bf16=True), "
                       "which no config expresses: the estimate counts them, their gradients and moments in "
                       f"{PRECISIONS[dtype]}")
    if getattr(args, "bf16", False) or getattr(args, "fp16", False):
        caveats.append(f"the Trainer ran under {'bf16' if args.bf16 else 'fp16'} autocast, which the estimator does "
                       "not model (it keeps activations in the model's dtype)")
    attention = getattr(base.config, "_attn_implementation", None) or "sdpa"
    fields["layers"] = _reduced_depth(name, base.config.num_hidden_layers)
    return RunConfig(
        model=name, method="qlora" if four_bit else "lora" if peft else "full", optimizer=optimizer,
        adamw_impl=impl, lr=float(args.learning_rate), precision=PRECISIONS[dtype], batch_size=batch_shape[0],
        seq_len=batch_shape[1], attention=attention if attention in ("sdpa", "eager") else "sdpa",
        grad_checkpointing=bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
                                or getattr(base, "is_gradient_checkpointing", False)),
        steps=max(int(steps), 1), seed=int(args.seed),
        device="cpu" if args.device.type == "cpu" else f"cuda:{args.device.index or 0}", **fields)


def _reduced_depth(name: str, layers: int) -> int | None:
    """`layers` when the model is shallower than the model `name` resolves to (a reduced-depth build), else None."""
    from qlora import models

    try:
        full = models.hf_config(models.resolve(name)).num_hidden_layers
    except Exception:  # noqa: BLE001 - a name the suite cannot resolve offline: the depth is the model's own
        return None
    return layers if layers < full else None


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
    """

    def __init__(self, out: str | Path | None = None, steps=(2,), model: str | None = None, snapshot: bool = False,
                 estimate: bool = True):
        steps = tuple(steps)
        if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
            raise ConfigError(f"MemoryLedgerCallback: steps must be optimizer step numbers >= 1, got {steps!r}")
        self.out = None if out is None else Path(out)
        self.steps, self.name, self.snapshot, self.estimate = set(steps), model, snapshot, estimate
        self.records: list[dict] = []
        self._ledger: StepLedger | None = None
        self._probe: DeviceProbe | None = None
        self._hook = None
        self._shape = (0, 0)
        self._seconds: list[float] = []
        self._t0 = 0.0
        self._model = self._optimizer = None

    # ---- Trainer events ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._model, self._optimizer = model, optimizer
        optim = str(getattr(args.optim, "value", args.optim))
        if optim not in OPTIMS:  # say so before training starts, not after the first steps
            raise ConfigError(f"MemoryLedgerCallback: optim {optim!r} is not one the suite models "
                              f"({', '.join(OPTIMS)})")

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._model, self._optimizer = model or self._model, optimizer or self._optimizer
        self._t0 = time.perf_counter()
        if state.global_step + 1 not in self.steps:
            return
        device = next(self._model.parameters()).device
        self._shape = (0, 0)
        self._hook = self._model.register_forward_pre_hook(self._forward, with_kwargs=True)
        if self.snapshot and device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._probe = DeviceProbe(device)
        self._probe.start()
        self._ledger = StepLedger(self._model, _inner(self._optimizer), device)
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
        ledger, self._ledger = self._ledger, None
        ledger.phase("end")
        ledger.__exit__(None, None, None)
        self._hook.remove()
        figures = self._probe.stop()
        snapshot = self._dump(state.global_step, ledger.device)
        self._write(self._record(args, state, ledger, figures, seconds, snapshot))

    def on_train_end(self, args, state, control, **kwargs):
        if self._ledger is not None:  # the run stopped inside a measured step: leave no mode or hook behind
            self._ledger.__exit__(None, None, None)
            self._hook.remove()
            self._ledger = None
        if self.records and self._seconds:  # the untouched steps' time, known only now
            for r in self.records:
                if r["step_seconds"] is None:
                    r["step_seconds"] = statistics.median(self._seconds)
                    r["tokens_per_second"] = r["config"]["batch_size"] * r["config"]["seq_len"] / r["step_seconds"]
            if self.out is not None:
                self._rewrite()

    # ---- the measured step ---------------------------------------------------------------------------------
    def _forward(self, module, args, kwargs):
        """Each micro-batch's forward: the phase, and the batch's shape (the largest of the window's)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            self._shape = (max(self._shape[0], ids.shape[0]), max(self._shape[1], ids.shape[1]))
        self._ledger.phase("forward")

    def _dump(self, step: int, device) -> dict | None:
        if not (self.snapshot and device.type == "cuda"):
            return None
        path = None
        if self.out is not None:
            path = self.out / f"snapshot-step{step}.pickle"
            self.out.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        return {"file": path.name, "bytes": path.stat().st_size} if path else None

    def _record(self, args, state, ledger: StepLedger, figures: dict, seconds: float, snapshot) -> dict:
        name = self.name or model_name(self._model) or "unnamed"
        caveats: list[str] = []
        cfg = config_of(self._model, args, self._shape, name, state.max_steps, caveats)
        est, why = estimate_beside(cfg) if self.estimate else (None, "not asked for")
        measured = ledger.categories()
        beside = None
        if est is not None:
            peak = est["bytes"]["peak"]
            beside = {"id": est["id"], "peak": peak, "bytes": est["bytes"], "phase": est["peak_at"]["phase"],
                      "error": round(peak / measured["peak"] - 1, 4)}
        rec = record.make(
            cfg.to_dict(), source="measured", status="ok", bytes_=measured, device_figures=figures,
            step_seconds=None, tokens_per_second=None, env=record.environment(ledger.device),
            layers=_base(self._model).config.num_hidden_layers, peak_at=ledger.peak_at,
            backward_start=ledger.categories_at("backward"), timeline=ledger.timeline(),
            static={c: v for c, v in ledger.categories_at("optimizer").items() if c in STATIC},
            optimizer_impl=implementation(_inner(self._optimizer)), optimizer_paged_bytes=ledger.paged_bytes(),
            ledger_step_seconds=seconds, estimate=beside, caveats=caveats,
            **({"estimate_missing": why} if est is None else {}),
            trainer={"step": state.global_step, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                     "micro_batch": list(self._shape), "autocast": "bf16" if args.bf16 else "fp16" if args.fp16
                     else None, "max_grad_norm": args.max_grad_norm},
            **({"snapshot": snapshot} if snapshot else {}))
        return rec, est

    def _rewrite(self) -> None:
        """The records already written, again with the step time known at the end (atomically, others untouched)."""
        import json

        path = self.out / "results.jsonl"
        mine = {r["id"]: r for r in self.records}
        lines = [json.dumps(mine[json.loads(x)["id"]], allow_nan=False) if json.loads(x).get("id") in mine else x
                 for x in path.read_text().splitlines() if x.strip()]
        record.write_atomic(path, "".join(x + "\n" for x in lines))

    def _write(self, pair) -> None:
        rec, est = pair
        self.records.append(rec)
        if self.out is not None:
            for r in (rec, est):
                if r is not None:
                    record.append(self.out / "results.jsonl", r)
