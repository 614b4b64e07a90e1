"""The command line: exit codes, one-line errors, and the output users read."""

import json
import subprocess
import sys

import pytest

from bench.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_llama_2_7b_with_its_exact_count(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["llama-2-7b"]["parameters"] == 6_738_415_616
    code, out, _ = run(capsys, "models")
    assert "6,738,415,616" in out


@pytest.mark.parametrize(
    "argv, named",
    [
        (["train", "llama-2-7"], "unknown model 'llama-2-7'"),
        (["train", "tiny-llama", "--method", "lorra"], "got 'lorra'"),
        (["train", "tiny-llama", "--lora-r", "0"], "lora_r must be an integer > 0, got 0"),
        (["train", "tiny-llama", "--lora-r", "-4"], "got -4"),
        (["train", "tiny-llama", "--seq-len", "4096"], "seq_len 4096 exceeds the model's maximum of 256"),
        (["train", "tiny-llama", "--seq-len", "abc"], "invalid int value: 'abc'"),
        (["train", "tiny-llama", "--optimizer", "paged_adamw8bit", "--device", "cpu"], "paged_adamw8bit"),
        (["train", "tiny-llama", "--adamw-impl", "fast"], "adamw_impl must be one of default, foreach, fused, "
                                                           "for-loop; got 'fast'"),
        (["train", "tiny-llama", "--adamw-impl", "fused", "--optimizer", "adamw8bit"], "adamw_impl fused chooses "
                                                                                      "torch's AdamW"),
        (["train", "tiny-llama", "--method", "full", "--adapter-dtype", "fp32"], "adapter_dtype fp32 applies to lora "
                                                                                "and qlora"),
        (["train", "tiny-llama", "--method", "lora", "--kbit-prepare"], "kbit_prepare (PEFT's "
                                                                         "prepare_model_for_kbit_training) applies "
                                                                         "to qlora"),
        (["train", "tiny-llama", "--adapter-dtype", "fp32", "--precision", "mixed"], "fp32 adapters need no fp32 "
                                                                                     "master copy"),
        (["train", "tiny-llama", "--optimizer", "paged_adamw32bit", "--device", "cpu"], "paged_adamw32bit pages "
                                                                                        "state through CUDA"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_it(capsys, argv, named):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert named in err
    assert err.count("\n") == 1 and err.startswith("qlora-bench: error: ")


def test_config_json_that_is_not_json(capsys, tmp_path):
    (tmp_path / "config.json").write_text("not json")
    code, _, err = run(capsys, "train", str(tmp_path))
    assert code == 2
    assert f"{tmp_path}/config.json is not valid JSON" in err


def test_train_all_methods_on_the_tiny_model(capsys):
    code, out, _ = run(capsys, "train", "tiny-llama", "--method", "all", "--seq-len", "64", "--steps", "3",
                       "--device", "cpu", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["config"]["method"] for r in rows] == ["full", "lora", "qlora"]
    assert rows[0]["trainable_parameters"] == rows[0]["stored_parameters"] == 426_624
    assert rows[1]["trainable_parameters"] == rows[2]["trainable_parameters"] == 65_536
    for r in rows:
        assert len(r["losses"]) == 3 and r["step_seconds"] > 0 and r["tokens_per_second"] > 0


def test_console_script_exit_code():
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "train", "tiny-llama", "--lora-r", "-4"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "qlora-bench: error: lora_r must be an integer > 0, got -4"


def test_measure_prints_one_record_and_appends_it(capsys, tmp_path):
    out = tmp_path / "runs" / "results.jsonl"
    argv = ["measure", "tiny-llama", "--method", "qlora", "--seq-len", "64", "--steps", "1", "--device", "cpu",
            "--json", "--out", str(out)]
    code, stdout, _ = run(capsys, *argv)
    assert code == 0
    printed = [json.loads(line) for line in stdout.splitlines()]
    assert len(printed) == 1 and printed[0]["status"] == "ok"
    run(capsys, *argv)
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == printed[0]
    assert not list(out.parent.glob(".results.jsonl.*"))  # no temporary left behind


def test_measure_table_names_the_categories(capsys):
    code, out, _ = run(capsys, "measure", "tiny-llama", "--method", "lora", "--seq-len", "32", "--steps", "1",
                       "--device", "cpu")
    assert code == 0
    for word in ("weights", "quant_state", "adapter", "gradients", "optimizer", "activations", "other", "peak"):
        assert f"  {word}" in out


def test_extrapolation_needs_two_depths(capsys):
    code, _, err = run(capsys, "measure", "smollm2-135m", "--layers", "1", "--device", "cpu")
    assert code == 2 and "layers must be >= 2 to extrapolate" in err
