"""MemoryLedgerCallback inside transformers' Trainer and TRL's SFTTrainer, on the tiny model: its records hold the
same static bytes as `qlora-bench measure` for the same config, training is unchanged, and `report` reads them."""

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

from bench.cli import main  # noqa: E402
from bench.measuring import record  # noqa: E402
from bench.measuring.measure import measure_once  # noqa: E402
from bench.running.callback import MemoryLedgerCallback  # noqa: E402
from bench.schema import CATEGORIES  # noqa: E402
from qlora.build import build  # noqa: E402
from qlora.config import ConfigError, RunConfig  # noqa: E402
from qlora.preflight import preflight  # noqa: E402

SEQ, BATCH = 32, 2


def config(method: str, ckpt: bool = False) -> RunConfig:
    return RunConfig(model="tiny-llama", method=method, precision="fp32", seq_len=SEQ, batch_size=BATCH,
                     grad_checkpointing=ckpt, steps=3, lr=1e-3)


def train(cfg: RunConfig, tmp_path, accumulation: int = 1, callback=None, optim: str = "adamw_torch", steps: int = 3,
          **extra):
    built = build(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, built.hf_config.vocab_size, (16, SEQ), generator=g)
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, optim=optim, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, activation_checkpointing=cfg.grad_checkpointing, remove_unused_columns=False,
        seed=0, data_seed=0, disable_tqdm=True, **extra)
    trainer = Trainer(model=built.model, args=args, train_dataset=data, callbacks=[callback] if callback else [])
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("method, accumulation, ckpt", [
    ("full", 1, False), ("lora", 2, True), ("qlora", 1, False), ("qlora", 2, True)])
def test_the_callbacks_record_matches_measure(tmp_path, method, accumulation, ckpt):
    cfg = config(method, ckpt)
    cb = MemoryLedgerCallback(out=tmp_path / "prof", model="tiny-llama")
    train(cfg, tmp_path, accumulation, cb)
    (rec,) = cb.records
    assert sum(rec["bytes"][c] for c in CATEGORIES) == rec["bytes"]["peak"]
    # the config read from the model and TrainingArguments is the one the model was built from, targets resolved
    assert rec["config"] == preflight(cfg).to_dict() and rec["caveats"] == []
    # the second optimizer step, its whole accumulation window: each micro-batch's forward and backward, one step
    assert rec["trainer"]["step"] == 2 and rec["trainer"]["micro_batches"] == accumulation
    phases = [p["phase"] for p in rec["timeline"]["phases"]]
    assert phases == ["start"] + ["forward", "backward"] * accumulation + ["optimizer", "zero_grad", "end"]
    assert rec["tokens_per_second"] == pytest.approx(accumulation * BATCH * SEQ / rec["step_seconds"])
    assert rec["static"] == measure_once(cfg)["static"]  # weights, quant_state, adapter, gradients, optimizer
    assert rec["estimate"]["peak"] > 0 and abs(rec["estimate"]["error"]) < 0.5
    assert rec["step_seconds"] > 0 and rec["ledger_step_seconds"] > 0
    on_disk = record.read(tmp_path / "prof" / "results.jsonl")
    assert [r["source"] for r in on_disk] == ["measured", "estimated"]
    assert on_disk[0] == rec and on_disk[1]["id"] == rec["estimate"]["id"]


def test_the_step_time_known_at_the_end_leaves_other_writers_lines_alone(tmp_path):
    other = record.make(config("full").to_dict(), source="estimated", status="ok", bytes_=None)
    record.append(tmp_path / "prof" / "results.jsonl", other)
    cb = MemoryLedgerCallback(out=tmp_path / "prof", model="tiny-llama", estimate=False)
    train(config("lora"), tmp_path, callback=cb)
    on_disk = record.read(tmp_path / "prof" / "results.jsonl")
    assert on_disk == [other, cb.records[0]] and on_disk[1]["step_seconds"] > 0


def test_a_step_that_raises_leaves_no_ledger_behind(tmp_path):
    """A Trainer calls no callback when training raises: the context manager (or the next train()) ends the step."""
    cfg = config("lora")
    built = build(cfg)
    calls = []

    def fail_on_the_second_forward(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")

    built.model.register_forward_pre_hook(fail_on_the_second_forward, with_kwargs=True)
    ids = torch.randint(0, built.hf_config.vocab_size, (8, SEQ), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=3, per_device_train_batch_size=BATCH,
                             report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True)
    resize = torch.UntypedStorage.resize_
    with pytest.raises(RuntimeError, match="simulated"):
        with MemoryLedgerCallback(model="tiny-llama") as cb:
            Trainer(model=built.model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids],
                    callbacks=[cb]).train()
    assert cb.records == [] and cb._ledger is None
    assert torch._C._len_torch_dispatch_stack() == 0 and torch.UntypedStorage.resize_ is resize


def test_the_callback_leaves_training_unchanged(tmp_path):
    plain = train(config("lora"), tmp_path)
    watched = train(config("lora"), tmp_path, callback=MemoryLedgerCallback(steps=(1, 2, 3), model="tiny-llama"))
    assert len(plain) == 3 and plain == watched


def test_report_renders_the_callbacks_records(tmp_path, capsys):
    train(config("qlora"), tmp_path, callback=MemoryLedgerCallback(out=tmp_path / "prof", model="tiny-llama"))
    assert main(["report", str(tmp_path / "prof"), "--out", str(tmp_path / "report")]) == 0
    row = next(x for x in (tmp_path / "report" / "runs.md").read_text().splitlines() if "tiny-llama qlora" in x)
    assert "| measured | ok |" in row and "%)" in row.split("| backward |")[1]  # the estimate's error beside it
    # compare checks the run, not the estimate written beside it under the same config
    results = str(tmp_path / "prof" / "results.jsonl")
    capsys.readouterr()
    assert main(["compare", results, results]) == 0
    (rec,) = [r for r in record.read(results) if r["source"] == "measured"]
    assert f"{rec['bytes']['peak'] / 2**30:.3f} → " in capsys.readouterr().out


def test_a_model_the_estimator_cannot_resolve_still_gets_its_record(tmp_path):
    cb = MemoryLedgerCallback(model=str(tmp_path / "nowhere"))
    train(config("lora"), tmp_path, callback=cb)
    (rec,) = cb.records
    assert rec["estimate"] is None and "nowhere" in rec["estimate_missing"]
    assert rec["bytes"]["peak"] > 0


def test_bad_settings_fail_before_training_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match="steps must be optimizer step numbers"):
        MemoryLedgerCallback(steps=(0,))
    with pytest.raises(ConfigError, match="optim 'adafactor' is not one the suite models"):
        train(config("lora"), tmp_path, callback=MemoryLedgerCallback(), optim="adafactor")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz .:"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_sft_trainer_smoke(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    built = build(config("lora"))
    rows = [{"prompt": f"review: {t}. sentiment:", "completion": f" {s}"}
            for t, s in (("a good film", "positive"), ("a dull plot", "negative"))] * 8
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=BATCH,
                         learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                         disable_tqdm=True, max_length=64)
    cb = MemoryLedgerCallback(out=tmp_path / "prof", model="tiny-llama")
    trl.SFTTrainer(model=built.model, args=args, train_dataset=Dataset.from_list(rows),
                   processing_class=tiny_tokenizer(), callbacks=[cb]).train()
    (rec,) = cb.records
    assert rec["config"]["method"] == "lora" and rec["config"]["seq_len"] == rec["trainer"]["micro_batch"][1]
    assert sum(rec["bytes"][c] for c in CATEGORIES) == rec["bytes"]["peak"]
    assert json.loads((tmp_path / "prof" / "results.jsonl").read_text().splitlines()[0])["id"] == rec["id"]


def test_the_trainers_8bit_optimizer_is_read_and_matches_measure(tmp_path):
    cfg = config("lora")
    cb = MemoryLedgerCallback(model="tiny-llama")
    train(cfg, tmp_path, callback=cb, optim="adamw_bnb_8bit")
    (rec,) = cb.records
    assert rec["config"]["optimizer"] == "adamw8bit" and rec["optimizer_impl"] == "bitsandbytes"
    from dataclasses import replace

    assert rec["static"] == measure_once(replace(cfg, optimizer="adamw8bit"))["static"]


def test_what_no_config_expresses_is_a_caveat_in_the_record(tmp_path):
    cb = MemoryLedgerCallback(model="tiny-llama", snapshot=True)  # a snapshot is CUDA's: on CPU, none and no error
    train(config("lora"), tmp_path, callback=cb, bf16=True)
    (rec,) = cb.records
    assert rec["trainer"]["autocast"] == "bf16" and "snapshot" not in rec
    assert any("bf16 autocast, which the estimator does not model" in c for c in rec["caveats"])


@pytest.mark.gpu
def test_a_cuda_snapshot_is_written_beside_the_records(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cfg = RunConfig(model="tiny-llama", method="qlora", seq_len=SEQ, batch_size=BATCH, device="cuda", lr=1e-3)
    built = build(cfg)
    ids = torch.randint(0, built.hf_config.vocab_size, (8, SEQ))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=BATCH,
                             report_to=[], save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    cb = MemoryLedgerCallback(out=tmp_path / "prof", model="tiny-llama", snapshot=True)
    Trainer(model=built.model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids],
            callbacks=[cb]).train()
    (rec,) = cb.records
    snap = tmp_path / "prof" / rec["snapshot"]["file"]
    assert snap.stat().st_size == rec["snapshot"]["bytes"] > 0
    assert rec["cuda_max_allocated"] >= rec["bytes"]["peak"]  # the allocator rounds up and also holds the batch
