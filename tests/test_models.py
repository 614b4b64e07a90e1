import json

import pytest

from qlora import models
from qlora.config import ConfigError

# Published parameter counts of the real checkpoints these configs describe.
EXPECTED = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,
    "smollm2-135m-instruct": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_parameter_counts_are_exact(name):
    assert models.describe(name)["parameters"] == EXPECTED[name]


def test_every_bundled_architecture_is_listed_and_builds_on_meta():
    names = {r["name"] for r in models.list_models()}
    assert set(EXPECTED) | {"tiny-llama"} <= names
    tiny = models.describe("tiny-llama")
    assert tiny["parameters"] * 2 < 4 * 2**20  # "a few MB" in bf16


def test_reduced_depth_keeps_width():
    cfg = models.hf_config(models.resolve("llama-2-7b"), layers=2)
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (2, 4096)
    with pytest.raises(ConfigError, match="layers must be <= 32"):
        models.hf_config(models.resolve("llama-2-7b"), layers=33)


def test_config_only_directory_is_random_weights(tmp_path):
    (tmp_path / "config.json").write_text((models.ARCH_DIR / "tiny-llama.json").read_text())
    src = models.resolve(str(tmp_path))
    assert src.kind == "config-dir" and src.random_weights
    assert models.hf_config(src).hidden_size == 128


def test_directory_with_safetensors_is_real_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="has weights but no tokenizer"):  # it would fail inside the run
        models.resolve(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert models.resolve(str(tmp_path)).kind == "weights-dir"


def test_config_json_that_is_not_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{'model_type': llama")
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON"):
        models.hf_config(models.resolve(str(tmp_path)))


def test_config_json_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="has no 'model_type'"):
        models.hf_config(models.resolve(str(tmp_path)))


@pytest.mark.parametrize("spec", ["llama-2-7", "./no/such/dir", "a/b/c"])
def test_unknown_model_is_named(spec):
    with pytest.raises(ConfigError, match=f"unknown model '{spec}'"):
        models.resolve(spec)


def test_hub_id_resolves_without_network():
    assert models.resolve("meta-llama/Llama-2-7b-hf").kind == "hub"
