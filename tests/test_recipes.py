"""Recipes: named settings (bench/recipes.toml), applied under explicit options, crossed in plans, recognised in
records."""

import json

import pytest

from bench import recipes
from bench.cli import main
from bench.running.plan import read_plan
from qlora.config import ConfigError, RunConfig


@pytest.mark.parametrize("name", list(recipes.load()))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_recipe_is_a_valid_config_for_each_of_its_methods_and_recognised(name, device):
    for d in recipes.configure(name, {"model": "llama-2-7b", "device": device}, None):
        cfg = RunConfig.from_dict(d)
        assert recipes.match(cfg.to_dict()) == name
        for k, v in recipes.get(name).settings_for(device).items():
            assert getattr(cfg, k) == v, k


def test_the_peft_recipes_are_what_peft_and_bitsandbytes_run():
    q = recipes.get("peft-qlora").settings_for("cuda")
    assert q == {"lora_dropout": 0.05, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16",
                 "kbit_prepare": True, "grad_checkpointing": True, "adapter_dtype": "fp32", "precision": "bf16",
                 "optimizer": "paged_adamw32bit"}
    assert recipes.get("peft-qlora").settings_for("cpu")["optimizer"] == "adamw"  # no paging without CUDA
    assert recipes.get("peft-lora").methods == ("lora",) and recipes.get("peft-qlora").methods == ("qlora",)


def test_explicit_values_override_and_the_config_is_then_no_recipe():
    [d] = recipes.configure("peft-qlora", {"double_quant": False, "device": "cuda"}, None)
    assert d["double_quant"] is False and d["kbit_prepare"] is True
    assert recipes.match(d) is None
    assert recipes.match(RunConfig(method="full").to_dict()) == "seed"  # the defaults are the seed's arithmetic
    with pytest.raises(ConfigError, match="recipe peft-lora is for method lora; got method qlora"):
        recipes.configure("peft-lora", {}, ["qlora"])
    with pytest.raises(ConfigError, match="unknown recipe 'peft'; recipes: seed, mixed, peft-qlora, peft-lora"):
        recipes.get("peft")


def test_a_recipe_file_naming_no_config_field_is_refused(tmp_path):
    bad = tmp_path / "recipes.toml"
    bad.write_text('[x]\nabout = "x"\nmethods = ["lora"]\n[x.set]\nadapter_type = "fp32"\n')
    with pytest.raises(ConfigError, match=r"recipe 'x' \[set\] names no config field: adapter_type"):
        recipes.load(bad)


def test_the_table_says_what_each_recipe_sets_and_why():
    text = recipes.markdown()
    for name in recipes.load():
        assert f"**`{name}`**" in text
    assert "| `kbit_prepare` | `true` | peft.prepare_model_for_kbit_training" in text
    assert "| `optimizer` | `paged_adamw32bit` (on CPU: `adamw`) |" in text


def test_cli_recipe_under_explicit_options(capsys):
    assert main(["estimate", "llama-2-7b", "--method", "all", "--recipe", "peft-qlora", "--json"]) == 0
    [r] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # all: the methods it is for
    assert r["recipe"] == "peft-qlora" and r["config"]["kbit_prepare"] and r["config"]["adapter_dtype"] == "fp32"
    assert main(["estimate", "llama-2-7b", "--recipe", "peft-qlora", "--no-double-quant", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["config"]["double_quant"] is False and r["recipe"] is None  # overridden: no longer the recipe
    assert main(["estimate", "llama-2-7b", "--recipe", "peft-lora", "--method", "qlora"]) == 2
    assert "recipe peft-lora is for method lora; got method qlora" in capsys.readouterr().err


def test_a_measured_run_under_a_recipe_on_cpu(capsys):
    argv = ["measure", "tiny-llama", "--recipe", "peft-qlora", "--seq-len", "32", "--steps", "1", "--device", "cpu",
            "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["status"] == "ok" and r["recipe"] == "peft-qlora"
    assert r["config"]["optimizer"] == "adamw"  # paging needs CUDA: plain AdamW over the fp32 adapters
    assert r["bytes"]["optimizer"] >= 2 * 4 * 65_536  # fp32 moments, as the paged 32-bit AdamW holds


def test_plans_cross_recipes_with_the_methods_each_is_for(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('[[group]]\nmodel = ["llama-2-7b"]\nmethod = ["full", "lora", "qlora"]\n'
                    'recipe = ["seed", "peft-lora", "peft-qlora"]\nseq_len = [512]\n')
    runs = read_plan(plan).configs
    got = sorted((c.method, recipes.match(c.to_dict())) for c in runs)
    assert got == [("full", "seed"), ("lora", "peft-lora"), ("lora", "seed"), ("qlora", "peft-qlora"),
                   ("qlora", "seed")]
    plan.write_text('[[group]]\nmodel = ["llama-2-7b"]\nmethod = ["full"]\nrecipe = ["peft-lora"]\n')
    with pytest.raises(ConfigError, match="group 1: no run: none of its methods is one its recipes are for"):
        read_plan(plan)


def test_the_readme_table_is_the_recipe_file():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("<!-- recipes:start -->\n")[1].split("<!-- recipes:end -->")[0]
    assert table == recipes.markdown()
