"""Where models come from, when the source is wrong: bad config.json directories, hub ids without a hub, hub ids for
quality runs, and a cached conversion that no longer matches its manifest. Each is one line and the right exit code."""

import json
import logging
import time

import pytest

from bench.cli import main
from qlora import hub, models
from qlora.config import ConfigError

TINY = json.loads((models.ARCH_DIR / "tiny-llama.json").read_text())


def config_dir(tmp_path, **changes):
    """A MODEL directory holding only a config.json: tiny-llama with `changes` (None removes a key)."""
    cfg = {**TINY, **changes}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def one_line_error(capfd, code, expected_code=2):
    out, err = capfd.readouterr()
    assert code == expected_code, err
    assert err.count("\n") == 1 and err.startswith("qlora-bench: error: "), err
    assert "Traceback" not in err
    return err


# --- A. architecture configs -------------------------------------------------------------------------------------

BAD_ARCHITECTURES = [
    ({"num_attention_heads": 3, "num_key_value_heads": 1}, "hidden_size 128 is not divisible by num_attention_heads 3"),
    ({"hidden_size": 0}, "hidden_size must be an integer >= 1, got 0"),
    ({"num_hidden_layers": -1}, "num_hidden_layers must be an integer >= 1, got -1"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer >= 1, got 0"),
    ({"num_hidden_layers": "4"}, "num_hidden_layers must be an integer >= 1, got '4'"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers must be an integer >= 1, got 2.0"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer >= 1, got True"),
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),
    ({"vocab_size": 0}, "vocab_size must be an integer >= 1, got 0"),
    ({"intermediate_size": -256}, "intermediate_size must be an integer >= 1, got -256"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be an integer >= 1, got 0"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 must divide num_attention_heads 4"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer >= 1, got 0"),
    ({"head_dim": 0}, "head_dim must be an integer >= 1, got 0"),
    ({"model_type": "nosuch"}, "unknown model_type 'nosuch'"),
    ({"model_type": 5}, "unknown model_type 5"),
    ({"rms_norm_eps": "x"}, "rms_norm_eps"),  # transformers' own validation, in one line
    ({"model_type": "qwen2", "num_hidden_layers": 0}, "num_hidden_layers must be an integer >= 1, got 0"),
    ({"model_type": "mistral", "hidden_size": 130}, "hidden_size 130 is not divisible by num_attention_heads 4"),
]


def _changes_id(v):
    return json.dumps(v) if isinstance(v, dict) else ""


@pytest.mark.parametrize("changes, named", BAD_ARCHITECTURES, ids=_changes_id)
def test_bad_architecture_in_a_config_directory_is_one_line_and_exit_2(capfd, tmp_path, changes, named):
    d = config_dir(tmp_path, **changes)
    err = one_line_error(capfd, main(["estimate", str(d), "--method", "all"]))
    assert f"{d}/config.json" in err and named in err


@pytest.mark.parametrize("changes, named", BAD_ARCHITECTURES[:4])
def test_the_check_is_inside_hf_config_so_every_caller_gets_it(tmp_path, changes, named):
    with pytest.raises(ConfigError, match=named.split(",")[0]):
        models.hf_config(models.resolve(str(config_dir(tmp_path, **changes))))


def test_aliased_keys_are_checked_as_transformers_reads_them(capfd, tmp_path):
    """GPT-2 spells num_hidden_layers n_layer: the check reads the transformers config, not only the JSON keys."""
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": -1, "n_embd": 64, "n_head": 4, "vocab_size": 50257, "n_positions": 128}))
    err = one_line_error(capfd, main(["estimate", str(tmp_path)]))
    assert "num_hidden_layers must be an integer >= 1, got -1" in err


@pytest.mark.parametrize("argv", [["estimate"], ["train", "--steps", "2", "--device", "cpu"]])
def test_an_architecture_transformers_cannot_build_names_the_file(capfd, tmp_path, argv):
    config_dir(tmp_path, model_type="t5")  # not a causal LM
    err = one_line_error(capfd, main([argv[0], str(tmp_path), *argv[1:]]))
    assert f"{tmp_path}/config.json" in err and "cannot build 't5' as a causal LM" in err


def test_meta_model_wraps_build_failures_of_user_configs(tmp_path):
    cfg = models.hf_config(models.resolve(str(config_dir(tmp_path, model_type="t5"))))
    with pytest.raises(ConfigError, match=r"config.json: cannot build 't5' as a causal LM"):
        models.meta_model(cfg)


def test_a_decoder_without_a_list_of_layers_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 50257, "n_positions": 128}))
    cfg = models.hf_config(models.resolve(str(tmp_path)))
    with pytest.raises(ConfigError, match=r"config.json: GPT2LMHeadModel has no list of decoder layers"):
        models.meta_model(cfg)


@pytest.mark.parametrize("changes", [
    {},
    {"model_type": "mistral", "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 32},  # explicit head_dim
    {"model_type": "qwen2"},
    {"model_type": "phi3", "num_key_value_heads": 4, "vocab_size": 32064},
])
def test_sound_llama_mistral_qwen2_and_phi3_configs_pass(capfd, tmp_path, changes):
    d = config_dir(tmp_path, **changes)
    code = main(["estimate", str(d), "--method", "all", "--seq-len", "64"])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "peak" in out


@pytest.mark.parametrize("name", models.bundled_names())
def test_every_bundled_architecture_passes_the_check(name):
    models.hf_config(models.resolve(name))


# --- B. hub ids without a hub --------------------------------------------------------------------------------------

@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and hub access allowed unless a test says otherwise."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return tmp_path / "hub"


def test_a_hub_id_offline_and_not_cached_is_one_line_and_exit_1_within_seconds(capfd, empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    err = one_line_error(capfd, main(["estimate", "someorg/somemodel"]), expected_code=1)
    assert time.monotonic() - start < 10
    assert "cannot reach the Hugging Face hub for model 'someorg/somemodel' (HF_HUB_OFFLINE is set" in err
    assert err.rstrip().endswith("pass a local directory with config.json (and safetensors) instead")


def fail_metadata(monkeypatch, exc):
    """The hub's metadata request raises `exc`, after logging a retry warning as huggingface_hub does."""
    import huggingface_hub

    calls = []

    def fake(url, **kwargs):
        kwargs["telemetry_off"] = huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY
        calls.append((url, kwargs))
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise exc

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", fake)
    return calls


def test_no_network_is_hub_unreachable_asked_once_with_a_short_timeout(capfd, empty_hub_cache, monkeypatch):
    httpx2 = pytest.importorskip("httpx2")
    from huggingface_hub import constants

    telemetry_before = constants.HF_HUB_DISABLE_TELEMETRY
    calls = fail_metadata(monkeypatch, httpx2.ConnectError("[Errno -2] Name or service not known"))
    start = time.monotonic()
    err = one_line_error(capfd, main(["estimate", "someorg/somemodel"]), expected_code=1)
    assert time.monotonic() - start < 10
    assert len(calls) == 1 and calls[0][1]["timeout"] <= hub.HUB_TIMEOUT_S
    # huggingface_hub's agent-registry lookup (3 s more where packets are dropped) is skipped for that one request
    assert calls[0][1]["telemetry_off"] and constants.HF_HUB_DISABLE_TELEMETRY is telemetry_before
    assert ("cannot reach the Hugging Face hub for model 'someorg/somemodel' ([Errno -2] Name or service not known); "
            "pass a local directory with config.json (and safetensors) instead") in err
    assert "Retrying" not in err  # huggingface_hub's retry noise is silenced


def hub_http_error(cls, status):
    httpx2 = pytest.importorskip("httpx2")
    request = httpx2.Request("HEAD", "https://huggingface.co/someorg/somemodel/resolve/main/config.json")
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=request))


def test_a_model_the_hub_does_not_know_is_bad_input(capfd, empty_hub_cache, monkeypatch):
    from huggingface_hub import errors

    fail_metadata(monkeypatch, hub_http_error(errors.RepositoryNotFoundError, 404))
    err = one_line_error(capfd, main(["estimate", "someorg/somemodel"]), expected_code=2)
    assert "model 'someorg/somemodel' does not exist on the Hugging Face hub" in err


def test_a_failing_hub_is_unreachable_not_bad_input(capfd, empty_hub_cache, monkeypatch):
    from huggingface_hub import errors

    fail_metadata(monkeypatch, hub_http_error(errors.HfHubHTTPError, 503))
    err = one_line_error(capfd, main(["estimate", "someorg/somemodel"]), expected_code=1)
    assert "cannot reach the Hugging Face hub for model 'someorg/somemodel' (HTTP 503)" in err


def test_a_cached_hub_model_needs_no_hub(capfd, empty_hub_cache, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--someorg--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(TINY))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["estimate", "someorg/cached", "--method", "lora", "--seq-len", "64"])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "someorg/cached" in out
    # A bad cached config is checked like any other, and named.
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps({**TINY, "hidden_size": 0}))
    err = one_line_error(capfd, main(["estimate", "someorg/cached"]))
    assert "config.json of hub model 'someorg/cached': hidden_size must be an integer >= 1, got 0" in err


# --- C. quality needs local weights ----------------------------------------------------------------------------------

def test_quality_on_a_hub_id_says_it_needs_local_weights(capfd):
    err = one_line_error(capfd, main(["quality", "someorg/somemodel"]))
    assert "model 'someorg/somemodel' is a hub id" in err and "random weights" not in err
    assert "smollm2-135m-instruct, or a directory of safetensors" in err


# --- D. the converted pretrained model is verified on every use ------------------------------------------------------

@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """smollm2_dir() in an empty cache, with a converter that writes small stand-in files and counts its calls."""
    monkeypatch.setenv("QLORA_BENCH_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(work, staged):
        calls.append(staged)
        staged.mkdir(parents=True)
        (staged / "config.json").write_text(json.dumps(TINY))
        (staged / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        (staged / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_smollm2", convert)
    return calls


def flip_block(path, offset=4096, size=4096):
    with open(path, "r+b") as f:
        f.seek(offset)
        block = f.read(size)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in block))


def test_a_conversion_is_written_with_its_manifest_and_reused(fake_conversion, capfd):
    out = models.smollm2_dir()
    assert models.manifest_problem(out) is None
    manifest = json.loads((out / models.MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert models.smollm2_dir() == out and len(fake_conversion) == 1
    assert capfd.readouterr().err == ""
    assert not [p for p in out.parent.iterdir() if p != out]  # no staging folder left behind


@pytest.mark.parametrize("damage, reason", [
    (lambda out: flip_block(out / "model.safetensors"), "model.safetensors does not match its sha256 in manifest.json"),
    (lambda out: (out / "model.safetensors").write_bytes(b"x" * 100),
     "model.safetensors is not the 16,384-byte file manifest.json lists"),
    (lambda out: (out / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda out: (out / models.MANIFEST).unlink(), "no manifest.json"),
    (lambda out: (out / models.MANIFEST).write_text("{"), "manifest.json is unreadable"),
    (lambda out: (out / "extra.safetensors").write_bytes(b""), "extra.safetensors is not in manifest.json"),
])
def test_a_damaged_conversion_is_named_in_one_line_and_converted_again(fake_conversion, capfd, damage, reason):
    out = models.smollm2_dir()
    capfd.readouterr()
    damage(out)
    assert models.smollm2_dir() == out
    err = capfd.readouterr().err
    assert err == f"qlora-bench: cached conversion {out} failed its checksum ({reason}); converting again\n"
    assert len(fake_conversion) == 2 and models.manifest_problem(out) is None


def test_an_old_conversion_without_manifest_is_converted_again(fake_conversion, capfd):
    out = models.smollm2_dir()
    (out / models.MANIFEST).unlink()
    (out / "model.safetensors").write_bytes(b"made by an older qlora-bench")
    models.smollm2_dir()
    assert models.manifest_problem(out) is None and (out / "model.safetensors").read_bytes()[:4] == bytes(range(4))
