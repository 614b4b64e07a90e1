import pytest

from qlora.config import ConfigError, RunConfig


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"method": "lorra"}, "method must be one of full, lora, qlora; got 'lorra'"),
        ({"lora_r": -4}, "lora_r must be an integer > 0, got -4"),
        ({"lora_r": 0}, "lora_r must be an integer > 0, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer > 0, got 0"),
        ({"seq_len": 2.5}, "seq_len must be an integer > 0, got 2.5"),
        ({"quant_type": "int4"}, "quant_type must be one of nf4, fp4; got 'int4'"),
        ({"optimizer": "sgd"},
         "optimizer must be one of adamw, adamw8bit, paged_adamw8bit, paged_adamw32bit; got 'sgd'"),
        ({"precision": "fp8"}, "precision must be one of bf16, mixed, fp32; got 'fp8'"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1), got 1.0"),
        ({"device": "tpu"}, "device must be cpu, cuda or cuda:N, got 'tpu'"),
        ({"layers": 0}, "layers must be an integer > 0, got 0"),
        ({"lora_targets": ()}, "lora_targets must be a non-empty list"),
        ({"optimizer": "paged_adamw8bit"}, "needs a CUDA device; got device 'cpu'"),
    ],
)
def test_bad_values_are_named(kw, message):
    with pytest.raises(ConfigError) as e:
        RunConfig(**kw)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_round_trips_through_a_dict():
    cfg = RunConfig(method="lora", lora_r=8, lora_targets=("q_proj", "v_proj"))
    d = cfg.to_dict()
    assert d["lora_targets"] == ["q_proj", "v_proj"]
    assert RunConfig.from_dict(d) == cfg


def test_from_dict_names_unknown_keys():
    with pytest.raises(ConfigError, match="unknown config key\\(s\\): lora_rank"):
        RunConfig.from_dict({"lora_rank": 4})


def test_default_learning_rates_differ_by_method():
    assert RunConfig(method="full").effective_lr < RunConfig(method="lora").effective_lr
    assert RunConfig(method="qlora", lr=1e-3).effective_lr == 1e-3
