"""Generated input, valid and malformed, through the CLI and the readers: exit 0 or 2 (never a traceback), one
line naming the problem, never a partial file, never a record that is not valid JSON.

Hypothesis generates run options, plan TOMLs, JSONL example lines and result records. Every case runs in-process and
fast (estimates, dry-run sweeps, readers), so a plain `pytest` stays quick on 2 cores.
"""

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.cli import main
from bench.measuring import record
from qlora.config import ConfigError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

weird_numbers = st.one_of(st.integers(1, 64), st.integers(-(2**40), 2**40),
                          st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from(["0", "-1", "1e9", "nan", "inf", "abc", "", "4.5"]))
choice_words = st.sampled_from(["full", "lora", "qlora", "all", "nf4", "fp4", "bf16", "fp16", "fp32", "mixed",
                                "adamw", "adamw8bit", "paged_adamw8bit", "sdpa", "eager", "cuda", "cpu",
                                "cuda:7",
                                "LoRA", "", " ", "q_proj", "all-linear", "qkv_proj,q_proj"])


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)  # any exception but the CLI's own handling fails the test: that is a traceback for a user
    _, err = capsys.readouterr()
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        assert err.startswith("qlora-bench: error: ") and err.count("\n") == 1, (argv, err)
    return code, err


OPTIONS = {
    "--lora-r": weird_numbers, "--lora-alpha": weird_numbers, "--lora-dropout": weird_numbers,
    "--seq-len": weird_numbers, "--batch-size": weird_numbers, "--layers": weird_numbers, "--lr": weird_numbers,
    "--steps": weird_numbers, "--seed": weird_numbers,
    "--method": choice_words, "--quant-type": choice_words, "--compute-dtype": choice_words,
    "--optimizer": choice_words, "--precision": choice_words, "--attention": choice_words,
    "--device": choice_words, "--lora-targets": choice_words,
}


@SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.just(None), max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})),
    st.sampled_from(["tiny-llama", "smollm2-135m", "llama-2-7b", "nope", "a/b/c", "."]))
def test_generated_run_options_exit_0_or_2(capsys, options, model):
    argv = ["estimate", model] + [f"{k}={v}" for k, v in options.items()]
    run_cli(capsys, argv)


# ---- plans -------------------------------------------------------------------------------------------------------


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


scalars = st.one_of(st.booleans(), st.integers(-3, 5000), st.floats(allow_nan=True), choice_words,
                    st.sampled_from(["tiny-llama", "llama-2-7b", "nope", "yes"]))
plan_keys = st.sampled_from(["model", "method", "seq_len", "batch_size", "lora_r", "lr", "grad_checkpointing",
                             "double_quant", "layers", "steps", "device", "lora_targets", "precision", "seq",
                             "oom_fallback_layers", "optimizer"])
random_tables = st.dictionaries(plan_keys, st.one_of(scalars, st.lists(scalars, max_size=3)), max_size=5)
valid_tables = st.fixed_dictionaries(
    {"model": st.just(["tiny-llama"]), "seq_len": st.lists(st.sampled_from([16, 32, 64]), min_size=1, max_size=2)},
    optional={"method": st.lists(st.sampled_from(["full", "lora", "qlora"]), min_size=1, max_size=3, unique=True),
              "lora_r": st.lists(st.integers(1, 64), min_size=1, max_size=2),
              "grad_checkpointing": st.lists(st.booleans(), min_size=1, max_size=2, unique=True)})
tables = st.one_of(valid_tables, random_tables)


@SETTINGS
@given(st.lists(tables, min_size=1, max_size=3), st.lists(tables, max_size=2), st.booleans())
def test_generated_plans_exit_0_or_2_and_a_dry_run_writes_nothing(capsys, groups, estimates, model_first):
    text = ""
    for name, items in (("group", groups), ("estimate", estimates)):
        for t in items:
            if model_first:
                t = {"model": ["tiny-llama"], **t}
            text += f"[[{name}]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in t.items())
    with tempfile.TemporaryDirectory() as tmp:
        plan, out = Path(tmp) / "plan.toml", Path(tmp) / "out"
        plan.write_text(text)
        run_cli(capsys, ["sweep", str(plan), "--out", str(out), "--device", "cpu", "--dry-run"])
        assert not out.exists()  # checking a plan writes nothing


@SETTINGS
@given(st.text(max_size=200))
def test_arbitrary_text_as_a_plan_exits_0_or_2(capsys, text):
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "plan.toml"
        plan.write_text(text)
        run_cli(capsys, ["sweep", str(plan), "--out", str(Path(tmp) / "out"), "--device", "cpu", "--dry-run"])


# ---- user examples (JSONL) ---------------------------------------------------------------------------------------

json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=8)),
                           lambda inner: st.lists(inner, max_size=3), max_leaves=4)
example_objects = st.dictionaries(st.sampled_from(["text", "prompt", "completion", "choices", "answer", "x"]),
                                  json_values, max_size=4)
lines = st.one_of(example_objects.map(json.dumps), st.text(max_size=30),
                  st.builds(lambda a, b: json.dumps({"prompt": a, "choices": b, "answer": 0}),
                            st.text(min_size=1, max_size=5), st.lists(st.text(min_size=1, max_size=5), max_size=3)))


@SETTINGS
@given(st.lists(lines, min_size=0, max_size=6))
def test_generated_example_files_load_or_name_file_and_line(lines_):
    from qlora.tasks import read_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("\n".join(lines_) + "\n")
        try:
            examples = read_jsonl(path)
        except ConfigError as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:
            assert examples and len({e.kind for e in examples}) == 1


# ---- result records ----------------------------------------------------------------------------------------------


def good_record(method="lora", peak=2**20, status="ok") -> dict:
    b = None if status != "ok" else {"weights": peak // 2, "quant_state": 0, "adapter": 0, "gradients": 0,
                                     "optimizer": 0, "activations": peak - peak // 2, "other": 0, "peak": peak}
    return record.make({"model": "tiny-llama", "method": method, "batch_size": 1, "seq_len": 32}, source="measured",
                       status=status, bytes_=b, error=None if status == "ok" else "boom")


mutations = st.sampled_from(["none", "drop-schema", "schema-2", "schema-str", "method", "source", "status", "bytes",
                             "config-list", "id-int", "nan"])


def mutate(r: dict, how: str) -> str:
    r = json.loads(json.dumps(r))
    if how == "drop-schema":
        del r["schema"]
    elif how == "schema-2":
        r["schema"] = 2
    elif how == "schema-str":
        r["schema"] = "1"
    elif how == "method":
        r["config"]["method"] = "dora"
    elif how == "source":
        r["source"] = "guessed"
    elif how == "status":
        r["status"] = "fine"
    elif how == "bytes":
        r["bytes"] = {"peak": "big"}
    elif how == "config-list":
        r["config"] = [1, 2]
    elif how == "id-int":
        r["id"] = 7
    elif how == "nan":
        return json.dumps(r).replace('"error": null', '"error": NaN')
    return json.dumps(r)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["full", "lora", "qlora"]), st.integers(1, 2**34),
                          st.sampled_from(["ok", "oom", "error"]), mutations), min_size=0, max_size=4),
       st.booleans())
def test_generated_records_are_read_or_named_by_file_and_line(capsys, specs, torn):
    text = "".join(mutate(good_record(m, p, s), how) + "\n" for m, p, s, how in specs)
    if torn and text:
        text = text[: len(text) // 2]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.jsonl"
        path.write_text(text)
        try:
            records = record.read(path)
        except ConfigError as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:
            assert all(r["schema"] == record.SCHEMA for r in records)
        code = main(["compare", str(path), str(path)])
        err = capsys.readouterr().err
        assert code in (0, 2), err  # a file against itself never regresses; bad input is exit 2
        if code == 2:
            assert err.count("\n") == 1


@SETTINGS
@given(st.dictionaries(st.text(max_size=5), st.one_of(json_values, st.floats(allow_nan=True, allow_infinity=True)),
                       max_size=4))
def test_append_writes_one_valid_line_or_nothing(obj):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.jsonl"
        path.write_text(json.dumps(good_record()) + "\n")
        before = path.read_bytes()
        try:
            record.append(path, obj)
        except ValueError:  # NaN or infinity: not JSON, so not written
            assert path.read_bytes() == before
        else:
            lines_ = path.read_text().splitlines()
            assert len(lines_) == 2 and json.loads(lines_[1]) == obj
        assert [p.name for p in Path(tmp).iterdir()] == ["results.jsonl"]  # no temporary left behind
