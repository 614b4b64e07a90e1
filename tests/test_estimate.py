"""The analytical estimator: static categories to the byte, peaks against the ledger, and the fit planner."""

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.measuring.measure import measure_once
from bench.modelling import gpus
from bench.modelling.estimate import CATEGORIES, estimate_bytes, quant_state_bytes, read_arch
from qlora.config import RunConfig

STATIC = ("weights", "quant_state", "adapter", "optimizer")
VALIDATION = Path(__file__).parent.parent / "reports" / "estimate-validation"


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("precision", ["bf16", "mixed", "fp32"])
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_static_categories_are_exact(tiny, method, precision, optimizer):
    cfg = tiny(method=method, precision=precision, optimizer=optimizer, seq_len=64, steps=1)
    measured = measure_once(cfg)["bytes"]
    estimated = estimate_bytes(cfg)["bytes"]
    for c in STATIC:
        assert estimated[c] == measured[c], c


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("seq_len", [64, 256])
def test_peak_within_5_percent_on_the_tiny_model(tiny, method, checkpointing, seq_len):
    cfg = tiny(method=method, grad_checkpointing=checkpointing, seq_len=seq_len, steps=1)
    measured = measure_once(cfg)["bytes"]["peak"]
    assert estimate_bytes(cfg)["bytes"]["peak"] == pytest.approx(measured, rel=0.05)


# PEFT's own settings: fp32 adapters (get_peft_model's default), and for QLoRA prepare_model_for_kbit_training
# (every parameter that is not 4-bit in fp32, so the residual stream is fp32 too).
PEFT_SETTINGS = [dict(method="lora", adapter_dtype="fp32"), dict(method="qlora", adapter_dtype="fp32"),
                 dict(method="qlora", kbit_prepare=True), dict(method="qlora", kbit_prepare=True, adapter_dtype="fp32"),
                 dict(method="qlora", kbit_prepare=True, lora_dropout=0.0),
                 dict(method="lora", adapter_dtype="fp32", lora_dropout=0.0)]


@pytest.mark.parametrize("setting", PEFT_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_peft_settings_static_exact_and_peak_within_1_percent(tiny, setting):
    """What PEFT's defaults change, term by term: fp32 adapters (and their gradients and moments), fp32 non-4-bit
    parameters, and what each path saves for backward in which dtype (peft casts each adapter's input to the
    adapter's dtype; fp32 norms carry fp32 activations through the 4-bit Linears)."""
    cfg = tiny(seq_len=128, steps=1, **setting)
    measured = measure_once(cfg)["bytes"]
    estimated = estimate_bytes(cfg)["bytes"]
    for c in STATIC:
        assert estimated[c] == measured[c], c
    assert estimated["peak"] == pytest.approx(measured["peak"], rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("setting", [dict(method="qlora", kbit_prepare=True, adapter_dtype="fp32"),
                                     dict(method="lora", adapter_dtype="fp32")], ids=["peft-qlora", "peft-lora"])
def test_peft_recipes_at_7b_width_within_5_percent(setting):
    """The PEFT recipes with checkpointing at Llama-2-7B's width (2 layers): the estimate's peak within 5%."""
    cfg = RunConfig(model="llama-2-7b", layers=2, seq_len=256, steps=1, grad_checkpointing=True, **setting)
    measured = measure_once(cfg)["bytes"]["peak"]
    assert estimate_bytes(cfg)["bytes"]["peak"] == pytest.approx(measured, rel=0.05)


TINY_TRAINABLE, TINY_LARGEST = 426_624, 65_536  # tiny-llama's parameter count and its largest tensor (embedding)


@pytest.mark.parametrize("precision, impl", [("mixed", "for-loop"), ("mixed", "foreach"), ("mixed", "fused"),
                                             ("bf16", "for-loop"), ("bf16", "foreach")])
def test_adamw_implementation_scratch_is_measured_and_estimated(tiny, precision, impl):
    """The optimizer step's scratch, by AdamW implementation, read by the ledger on CPU (Full FT at a short sequence
    peaks in the optimizer step, so `other` at the peak is that scratch): the for-loop holds two temporaries the
    size of the largest tensor, foreach one copy of every trainable tensor, fused none; mixed precision adds the
    fp32 upcast of every gradient. The estimator must say the same for each."""
    cfg = tiny(method="full", precision=precision, adamw_impl=impl, seq_len=32, steps=1)
    raw = measure_once(cfg)
    assert raw["optimizer_impl"] == impl and raw["peak_at"]["phase"] == "optimizer"
    moment = 4 if precision == "mixed" else 2
    upcast = 4 * TINY_TRAINABLE if precision == "mixed" else 0
    scratch = {"for-loop": 2 * TINY_LARGEST * moment, "foreach": TINY_TRAINABLE * moment, "fused": 0}[impl]
    assert 0 <= raw["bytes"]["other"] - upcast - scratch < 1024  # a few scalars besides
    estimated = estimate_bytes(cfg)["bytes"]
    assert estimated["other"] == upcast + scratch
    assert estimated["peak"] == pytest.approx(raw["bytes"]["peak"], rel=0.005)


def test_estimates_say_which_adamw_they_assume(capsys):
    assert main(["estimate", "llama-2-7b", "--method", "full", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["optimizer_impl"] == "foreach"  # torch's default on CUDA
    assert main(["estimate", "llama-2-7b", "--method", "full", "--adamw-impl", "fused", "--json"]) == 0
    fused = json.loads(capsys.readouterr().out)
    assert fused["optimizer_impl"] == "fused"
    assert main(["estimate", "llama-2-7b", "--method", "full", "--json"]) == 0
    foreach = json.loads(capsys.readouterr().out)
    # foreach's scratch is one bf16 copy of all 6.7B parameters: 13.5 GB that fused AdamW never allocates
    assert foreach["bytes"]["other"] - fused["bytes"]["other"] == 6_738_415_616 * 2


def test_llama_2_7b_qlora_layout(capsys):
    assert main(["estimate", "llama-2-7b", "--method", "qlora", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["source"] == "estimated" and set(r["bytes"]) == set(CATEGORIES) | {"peak"}
    linears = 32 * 7
    # nf4 + double quantisation: 8-bit absmax and its fp32 constants (DESIGN.md), plus per-weight code tables
    assert r["bytes"]["quant_state"] == 102_768_640 + linears * (256 * 4 + 4 + 16 * 4)
    unquantised = (2 * 32000 * 4096 + 65 * 4096) * 2  # embeddings, lm_head, 65 RMSNorm weights in bf16
    arch = read_arch(RunConfig(model="llama-2-7b"))
    assert r["bytes"]["weights"] - unquantised - arch.buffer_bytes == 3_238_002_688
    assert r["bytes"]["adapter"] == 39_976_960 * 2


def test_double_quantisation_saves_what_the_layout_says():
    numel = 6_476_005_376 // (32 * 7)  # not exact per layer, but the formula is per weight
    assert quant_state_bytes(4096 * 4096, False) - quant_state_bytes(4096 * 4096, True) > 0
    assert quant_state_bytes(numel * 64, False) == numel * 4 + 64


def test_seventy_billion_is_quick_and_small(tmp_path):
    import time

    cfg = json.loads((Path(__file__).parent.parent / "qlora" / "archs" / "llama-2-13b.json").read_text())
    cfg.update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
               num_key_value_heads=8)  # Llama-2-70B's shape
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    est = estimate_bytes(RunConfig(model=str(tmp_path), method="qlora", seq_len=2048, device="cuda"))
    assert time.perf_counter() - t0 < 30
    assert 30 * 2**30 < est["bytes"]["weights"] < 45 * 2**30


def test_gpu_catalog_and_fit(capsys):
    assert gpus.lookup("RTX4090").total_bytes == 24_564 * 2**20
    assert gpus.headroom(gpus.lookup("a100-80gb"), 10 * 2**30) > 0
    assert gpus.trials(gpus.lookup("h200"), 20 * 2**30) == 6
    assert main(["estimate", "llama-2-7b", "--method", "all", "--gpu", "rtx4090", "--seq-len", "512"]) == 0
    out = capsys.readouterr().out
    assert "full   does not fit" in out and "qlora  fits" in out


def test_max_finds_the_boundary(capsys):
    assert main(["estimate", "llama-2-7b", "--method", "qlora", "--gpu", "rtx4090", "--max", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)["on_gpu"]
    gpu = gpus.lookup("rtx4090")
    base = RunConfig(model="llama-2-7b", method="qlora", device="cuda")
    from dataclasses import replace

    def peak(**kw):
        return estimate_bytes(replace(base, **kw))["bytes"]["peak"]

    assert gpus.headroom(gpu, peak(seq_len=fit["max_seq_len"])) >= 0
    assert gpus.headroom(gpu, peak(seq_len=fit["max_seq_len"] + 1)) < 0
    assert gpus.headroom(gpu, peak(batch_size=fit["max_batch_size"] + 1)) < 0


@pytest.mark.parametrize(
    "argv, named",
    [
        (["estimate", "llama-2-7b", "--gpu", "rtx5090"], "unknown GPU 'rtx5090'"),
        (["estimate", "llama-2-7b", "--lora-r", "5000"], "lora_r 5000 exceeds the narrowest targeted layer's width"),
        (["estimate", "llama-2-7b", "--batch-size", "0"], "batch_size must be an integer > 0, got 0"),
        (["estimate", "llama-2-7b", "--max"], "--max and --trials need --gpu"),
        (["estimate", "tiny-llama", "--seq-len", "999"], "seq_len 999 exceeds the model's maximum of 256"),
    ],
)
def test_impossible_settings_exit_2(capsys, argv, named):
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def committed_rows(folder: Path = VALIDATION) -> list[dict]:
    """The measurements a committed validation folder holds (none where it does not exist)."""
    path = folder / "measured.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("measured", committed_rows(), ids=lambda r: "-".join(
    str(r["config"][k]) for k in ("model", "method", "grad_checkpointing", "seq_len")))
def test_committed_validation_still_holds(measured):
    """Re-estimate every committed measurement: an estimator change that breaks the 5% target shows here."""
    cfg = RunConfig.from_dict({**measured["config"], "layers": None})
    est = estimate_bytes(cfg)["bytes"]
    assert est["peak"] == pytest.approx(measured["bytes"]["peak"], rel=0.05)
    if measured["source"] == "measured":
        for c in STATIC:
            assert est[c] == measured["bytes"][c], c


def test_the_committed_validation_plan_loads():
    from bench.running.plan import load_plan

    configs = load_plan(Path(__file__).parent.parent / "bench" / "plans" / "validation.toml")
    assert len(configs) == 54
    assert {c.attention for c in configs} == {"sdpa", "eager"}
    assert {c.method for c in configs} == {"full", "lora", "qlora"}
    assert {c.model for c in configs} == {"tiny-llama", "smollm2-135m-instruct", "llama-2-7b"}


@pytest.mark.parametrize(
    "text, named",
    [
        ("[[group]]\nmodel = ['tiny-llama']\nlora_rank = [4]\n", "unknown config key(s): lora_rank"),
        ("[[group]]\nmodel = []\n", "key 'model' must be a non-empty list"),
        ("title = 'x'\n", "unknown top-level key(s) title"),
        ("# empty\n", "no [[group]] tables"),
        ("[[group]\n", "plan.toml:"),
        ("[[group]]\nmodel = ['tiny-llama']\nmethod = ['lorra']\n", "got 'lorra'"),
    ],
)
def test_bad_plans_name_the_file_and_key(tmp_path, text, named):
    from bench.running.plan import load_plan
    from qlora.config import ConfigError

    plan = tmp_path / "plan.toml"
    plan.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_plan(plan)
    assert named in str(e.value) and str(plan) in str(e.value)


def test_paged_32bit_adamw_state_is_what_bitsandbytes_allocates(tiny):
    """The QLoRA paper's paged 32-bit AdamW needs CUDA; its state layout is bitsandbytes' 32-bit AdamW's (paging
    moves it, it does not shrink it), which runs here: two fp32 moments per trainable element."""
    from dataclasses import replace

    import bitsandbytes as bnb
    import torch

    from bench.measuring.ledger import static_tensors
    from qlora.build import build

    cfg = tiny(method="qlora", adapter_dtype="fp32", kbit_prepare=True)
    built = build(cfg)
    opt = bnb.optim.AdamW32bit([p for p in built.model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 512, (cfg.batch_size, cfg.seq_len))
    built.model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = sum(t.untyped_storage().nbytes() for t in static_tensors(built.model, opt)["optimizer"])
    paged = replace(cfg, optimizer="paged_adamw32bit", device="cuda")
    assert estimate_bytes(paged)["bytes"]["optimizer"] == state == 2 * 4 * 65_536


def test_dropout_masks_are_bool_on_cuda():
    """torch runs dropout on CUDA as one fused kernel (native_dropout) whose saved mask is bool (1 byte); on CPU it is
    bernoulli_ * input, whose mask has the input's dtype (what the ledger measures here). 7B LoRA at 1x512, r=16 on
    all seven projections, bf16: one byte less per element of every adapter's input, except layer 0's q/k/v, whose
    input does not require grad and save no mask."""
    import torch

    _, mask = torch.native_dropout(torch.ones(4, requires_grad=True), 0.1, True)
    assert mask.dtype == torch.bool
    cpu, cuda = (estimate_bytes(RunConfig(model="llama-2-7b", method="lora", seq_len=512, device=d))
                 for d in ("cpu", "cuda"))
    per_layer = 6 * 4096 + 11008  # fan-in of q, k, v, o, gate, up and of down
    expected = 512 * (32 * per_layer - 3 * 4096)
    assert cpu["backward_start"]["activations"] - cuda["backward_start"]["activations"] == expected
