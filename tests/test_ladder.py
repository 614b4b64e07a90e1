"""The memory-savers ladder: rungs cumulative and in order, the estimator within 5% of the ledger on every rung, the
command resumable with its report, and the committed ladders regenerated from their records."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import ladder
from bench.cli import main
from bench.measuring import record
from bench.measuring.measure import measure_once
from bench.modelling.estimate import estimate_bytes
from qlora.config import RunConfig

ROOT = Path(__file__).parent.parent
COMMITTED = sorted((ROOT / "reports" / "ladder").glob("*/results.jsonl"))


def changed(a: RunConfig, b: RunConfig) -> dict:
    return {k: v for k, v in asdict(b).items() if asdict(a)[k] != v}


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_each_rung_adds_only_its_own_saver(method):
    rungs = ladder.rungs(RunConfig(model="llama-2-7b", method=method, seq_len=2048, layers=2))
    keys = [s.key for s, _ in rungs]
    assert keys == [k for k in ladder.KEYS if not (method == "full" and k == "no-adapter-dropout")]
    for (_, before), (saver, after) in zip(rungs, rungs[1:], strict=False):
        delta = changed(before, after)
        delta.pop("layers", None)  # every-other checkpointing is measured deeper
        if saver.cuda_only:
            assert delta.pop("device") == "cuda"
        assert delta == saver.changes.get(method, saver.changes.get("*")), saver.key
    depth = dict((s.key, c.layers) for s, c in rungs)
    assert depth["ckpt-every-other"] == 4 and depth["ckpt-every-layer"] == 2


def test_a_rung_that_changes_nothing_is_left_out():
    keys = [s.key for s, _ in ladder.rungs(RunConfig(method="qlora", lora_dropout=0.0))]
    assert "no-adapter-dropout" not in keys and keys[0] == "baseline"


def _within_5_percent(base: RunConfig):
    for saver, cfg in ladder.rungs(base):
        if saver.cuda_only:
            continue
        measured = measure_once(cfg)["bytes"]["peak"]
        assert estimate_bytes(cfg)["bytes"]["peak"] == pytest.approx(measured, rel=0.05), saver.key


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_the_estimate_of_every_rung_is_within_5_percent_on_the_tiny_model(tiny, method):
    _within_5_percent(tiny(method=method, seq_len=256, steps=1))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_the_estimate_of_every_rung_is_within_5_percent_on_smollm2(method):
    _within_5_percent(RunConfig(model="smollm2-135m", method=method, seq_len=512, batch_size=2, steps=1))


def test_the_ladder_command_measures_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "ladder"
    argv = ["ladder", "tiny-llama", "--method", "qlora", "--seq-len", "64", "--steps", "1", "--out", str(out),
            "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    runs = record.read(out / "results.jsonl")
    assert [r["ladder"]["saver"] for r in runs] == [k for k in ladder.KEYS if k != "offload-activations"]
    assert all(r["status"] == "ok" and r["source"] == "measured" for r in runs)
    estimates = record.read(out / "estimates.jsonl")
    assert {r["config"]["device"] for r in estimates} == {"cpu", "cuda"}
    assert [r["ladder"]["saver"] for r in estimates if r["config"]["device"] == "cuda"] == list(ladder.KEYS)
    table = (out / "report" / "ladder.md").read_text()
    assert printed == table
    assert "| 8 | activation offloading | estimated only (CUDA) |" in table
    assert "| 0 | baseline | measured |" in table
    assert "| 2 | chunked cross-entropy |" in table and "(" in table.split("| 2 | chunked cross-entropy |")[1]
    assert (out / "report" / "ladder-tiny-llama-qlora-1x64.png").is_file()
    # again: nothing measured twice, same estimates, same table
    assert main(argv) == 0
    assert "0 to run" in capsys.readouterr().err
    assert len(record.read(out / "results.jsonl")) == len(runs)
    assert record.read(out / "estimates.jsonl") == estimates
    assert (out / "report" / "ladder.md").read_text() == table


@pytest.mark.parametrize("argv, message", [
    (["--method", "all"], "ladder takes one --method"),
    (["--method", "qlora", "--confirm"], "--confirm measures the last rung again at full depth"),
    (["--method", "qlora", "--estimates-only"], "holds no rungs"),
    (["--method", "qlora", "--layers", "3", "--seq-len", "64"], "layers must be <= 2"),
])
def test_bad_ladder_input_is_one_line(tmp_path, capsys, argv, message):
    assert main(["ladder", "tiny-llama", *argv, "--out", str(tmp_path / "l"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("layers, depths", [("2", "1 and 2"), ("5", "2 and 5")])
def test_extrapolation_refuses_depths_that_split_the_checkpointing_pattern(capsys, layers, depths):
    assert main(["measure", "llama-2-7b", "--layers", layers, "--grad-checkpointing", "--ckpt-every", "2",
                 "--quiet"]) == 2
    assert f"both depths measured ({depths}) must be multiples of 2; use --layers 4" in capsys.readouterr().err


@pytest.mark.parametrize("results", COMMITTED, ids=lambda p: p.parent.name)
def test_the_committed_ladders_regenerate_from_their_records(tmp_path, results):
    """Each committed ladder's report is `qlora-bench report` of its folder, byte for byte, and its estimates are
    the estimator's figures for its rungs today."""
    folder = results.parent
    for r in record.read(folder / "estimates.jsonl"):
        cfg = RunConfig.from_dict(r["config"])
        assert estimate_bytes(cfg)["bytes"] == r["bytes"], r["ladder"]
    out = tmp_path / "report"
    assert main(["report", str(folder / "results.jsonl"), str(folder / "estimates.jsonl"), "--out", str(out)]) == 0
    for name in ("ladder.md",):
        assert (out / name).read_text().replace(str(folder), "") == (folder / "report" / name).read_text()


def test_the_ladder_report_reads_records_only(tmp_path):
    """Hand-made records of two rungs and a CUDA estimate are enough for the table: nothing is recomputed."""
    base = RunConfig(model="tiny-llama", method="lora", seq_len=32)
    rungs = ladder.rungs(base)
    lines = []
    for i, (saver, cfg) in enumerate(rungs[:2]):
        b = {c: 1000 * (2 - i) for c in ("weights", "quant_state", "adapter", "gradients", "optimizer",
                                         "activations", "other")}
        b["peak"] = sum(b.values())
        for source, device in (("measured", "cpu"), ("estimated", "cuda")):
            c = RunConfig.from_dict({**cfg.to_dict(), "device": device})
            lines.append(record.make(c.to_dict(), source=source, status="ok", bytes_=b, step_seconds=1.0 + i,
                                     ladder=ladder.tag(c, saver)))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["report", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "r")]) == 0
    table = (tmp_path / "r" / "ladder.md").read_text()
    assert "-0.000 (-50.0%)" in table and "+100%" in table
    assert not (tmp_path / "r" / "claims.md").exists()
