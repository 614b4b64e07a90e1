"""`qlora-bench nf4-cost`: what NF4 costs a model before any training, measured the same way on every model, so the
cost on a genuine-precision model (all-MiniLM-L6-v2, fp32) and on one whose weights were already 4-bit (the packaged
SmolLM2, dequantised from GGUF Q4_1) can be set side by side.

Three builds of the same weights through the engine: the checkpoint as shipped in fp32 (the reference), in bf16 (LoRA's
base in the quality runs) and as QLoRA's base (NF4 with double quantisation, bf16 compute; the adapters start at zero
so they change nothing). Figures:

- weights: over every 4-bit Linear, ||dequantised NF4 - fp32|| / ||fp32|| (Frobenius, all layers together), and
  the same for bf16 rounding;
- grid: the median number of distinct values in a block of 32 consecutive fp32 weights of those layers: 32 for
  weights that were never quantised, at most 16 for weights that sit on a 4-bit grid (GGUF Q4_1 blocks are 32);
- hidden: the last hidden state over the held-out prompts of a task, ||h(NF4) - h(fp32)|| / ||h(fp32)|| over every
  real token (and for bf16): the same computation on both kinds of model, though not the same quantity (a
  decoder's is after its final norm, 30 layers deep for SmolLM2; an encoder's is its last layer's output, 6 deep);
- loss (decoders only): next-token loss of the prompts in nats per token, each build, and NF4's increase.

One record per model (`nf4_cost`), in OUT/nf4-cost.jsonl; a report reads them beside the quality records.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from qlora.config import ConfigError, RunConfig
from qlora.scoring import IGNORE
from qlora.tasks import Example

FILE = "nf4-cost.jsonl"
GRID_BLOCK = 32  # GGUF Q4_1's block: its weights take at most 16 values in each


def _builds(model: str):
    from qlora.build import build

    base = dict(model=model, seq_len=128, device="cpu")
    for name, cfg in (("fp32", RunConfig(method="full", precision="fp32", **base)),
                      ("bf16", RunConfig(method="full", precision="bf16", **base)),
                      ("nf4", RunConfig(method="qlora", precision="bf16", compute_dtype="bf16", **base))):
        yield name, cfg, build(cfg)


def _linear_weights(model) -> dict[str, torch.Tensor]:
    """Name -> fp32 weight of every Linear the NF4 build quantises (keyed like the NF4 build's modules)."""
    return {n: m.weight.detach().float() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _dequantised(model) -> dict[str, torch.Tensor]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    out = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, bnb.nn.Params4bit):
            key = n.removeprefix("base_model.model.").removesuffix(".base_layer")
            out[key] = bf.dequantize_4bit(w.data, w.quant_state).float()
    return out


def _relative(pairs) -> float:
    pairs = list(pairs)
    num = sum(float((a - b).pow(2).sum()) for a, b in pairs)
    den = sum(float(b.pow(2).sum()) for _, b in pairs)
    return (num / den) ** 0.5


def grid_levels(weights: list[torch.Tensor]) -> float:
    """Median distinct values per block of GRID_BLOCK consecutive weights (every full block of every tensor)."""
    counts = []
    for w in weights:
        flat = w.reshape(-1)
        blocks = flat[: flat.numel() // GRID_BLOCK * GRID_BLOCK].reshape(-1, GRID_BLOCK)
        ordered = blocks.sort(dim=1).values
        counts += (1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)).tolist()
    return float(statistics.median(counts))


@torch.no_grad()
def _hidden_and_loss(built, examples: list[Example], seq_len: int, decoder: bool, batch_size: int = 16):
    """The last hidden state of every real token of the examples' prompts (fp32, concatenated), and for decoders
    the summed next-token loss and its token count."""
    model, tok = built.model, built.tokenizer
    model.eval()
    hidden, nll, count = [], 0.0, 0
    for i in range(0, len(examples), batch_size):
        texts = [e.prompt or e.completion for e in examples[i:i + batch_size]]
        enc = tok(texts, truncation=True, max_length=seq_len, padding=True, return_tensors="pt",
                  add_special_tokens=not decoder)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        mask = enc["attention_mask"].bool()
        hidden.append(out.hidden_states[-1].float()[mask])
        if decoder:
            logits = out.logits.float()[:, :-1]
            target = enc["input_ids"][:, 1:].masked_fill(~mask[:, 1:], IGNORE)
            nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE,
                                                           reduction="sum"))
            count += int((target != IGNORE).sum())
    return torch.cat(hidden), (nll, count)


def measure(model: str, task_name: str, examples: int, log=print) -> dict:
    """One nf4-cost record for `model`, scored on the first `examples` held-out prompts of `task_name`."""
    from bench.measuring import record
    from qlora import models, tasks

    source = models.resolve(model)
    if source.random_weights or source.kind == "hub":
        raise ConfigError(f"model {model!r}: NF4's cost is measured on real local weights (smollm2-135m-instruct, "
                          "all-minilm-l6-v2, or a directory of safetensors)")
    task = tasks.load_task(task_name)
    held = task.heldout[:examples]
    decoder = not models.is_encoder(models.hf_config(source))
    hidden, loss, weights, configs = {}, {}, {}, {}
    for name, cfg, built in _builds(model):
        log(f"{model}: {name} build, {len(held)} held-out {task.name} prompts")
        weights[name] = _dequantised(built.model) if name == "nf4" else _linear_weights(built.model)
        hidden[name], loss[name] = _hidden_and_loss(built, held, cfg.seq_len, decoder)
        configs[name] = cfg
        del built
    quantised = sorted(weights["nf4"])
    missing = [n for n in quantised if n not in weights["fp32"]]
    if missing:
        raise RuntimeError(f"NF4 layers with no fp32 twin: {missing[:3]}")
    ref = [weights["fp32"][n] for n in quantised]
    cost = {
        "task": task.name, "source": task.source, "examples": len(held), "tokens": int(hidden["fp32"].shape[0]),
        "quantised_layers": len(quantised), "quantised_parameters": sum(w.numel() for w in ref),
        "grid_levels": grid_levels(ref), "grid_block": GRID_BLOCK,
        "weight_error": {"nf4": _relative(zip([weights["nf4"][n] for n in quantised], ref, strict=True)),
                         "bf16": _relative(zip([weights["bf16"][n] for n in quantised], ref, strict=True))},
        "hidden_error": {k: _relative([(hidden[k], hidden["fp32"])]) for k in ("nf4", "bf16")},
        "head": "causal-lm" if decoder else "sequence-classification",
    }
    if decoder:
        cost["loss"] = {k: v[0] / v[1] for k, v in loss.items()}
        cost["loss"]["nf4_increase"] = cost["loss"]["nf4"] - cost["loss"]["fp32"]
    return record.make(configs["nf4"].to_dict(), source="measured", status="ok", bytes_=None, nf4_cost=cost,
                       env=record.environment("cpu"))


def run(models_: list[str], task: str, examples: int, out: Path | None, log=print) -> list[dict]:
    """A record per model; appended to OUT/nf4-cost.jsonl, replacing an earlier one of the same model and task."""
    from bench.measuring import record

    new = [measure(m, task, examples, log=log) for m in models_]
    if out is not None:
        path = out / FILE
        key = lambda r: (r["config"]["model"], r["nf4_cost"]["task"])  # noqa: E731
        kept = [r for r in (record.read(path) if path.exists() else []) if key(r) not in {key(n) for n in new}]
        record.write_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept + new))
    return new
