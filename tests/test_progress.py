"""The one training loop (qlora.train.timed_steps) and progress on stderr: drawn only where someone watches,
silenced by --quiet, never mixed into --json output, passed on from a run's own process."""

import json

import pytest
import torch

from bench import progress
from bench.cli import main
from bench.measuring.ledger import Ledger
from bench.measuring.runner import call, last_line
from qlora.build import build
from qlora.optim import make_optimizer
from qlora.train import timed_steps


def test_timed_steps_runs_each_batch_and_lets_a_hook_take_a_step(tiny):
    cfg = tiny(method="lora")
    built = build(cfg)
    opt = make_optimizer(cfg, built.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # six padding tokens
    batches = [ids, {"input_ids": ids, "attention_mask": mask, "labels": ids}, ids]
    ledgers, seen = {}, []

    def around(index, step):
        if index != 1:
            return None
        ledger = Ledger(built.model, opt, "cpu")
        with ledger:
            loss = step(ledger.phase)
        ledgers[index] = ledger
        return loss

    steps = timed_steps(built.model, opt, batches, around=around, on_step=seen.append)
    assert [s.index for s in steps] == [0, 1, 2] and seen == steps
    assert steps[1].seconds is None  # the hook ran it: its clock would include the ledger's work
    assert steps[0].seconds > 0 and steps[2].seconds > 0
    assert [s.tokens for s in steps] == [32, 26, 32]  # padding excluded where the batch has a mask
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in steps)
    # the hooked step really ran under the ledger: gradients and optimizer state were seen at its peak
    assert ledgers[1].peak > 0 and ledgers[1].categories()["adapter"] > 0


def test_bars_follow_the_environment_and_quiet_restores_it(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.enabled()
    with progress.bar(3, "lora: steps", unit="step") as shown:
        for _ in range(3):
            shown.update(loss="1.000")
    assert "lora: steps" in capsys.readouterr().err
    with progress.quiet():
        assert not progress.enabled() and progress.child_env() == {progress.ENV: "0"}
        with progress.bar(3, "silent") as shown:
            shown.update()
    assert progress.enabled()  # the previous setting is back
    assert "silent" not in capsys.readouterr().err
    monkeypatch.delenv(progress.ENV)
    assert progress.enabled() is False  # pytest's stderr is not a terminal


@pytest.mark.parametrize("on", [True, False])
def test_a_runs_output_is_passed_on_only_while_bars_are_on(monkeypatch, capsys, on):
    monkeypatch.setenv(progress.ENV, "1" if on else "0")
    assert call("builtins:print", ["from the run's own process"]) is None
    out, err = capsys.readouterr()
    assert out == ""  # never on stdout, where --json output goes
    assert ("from the run's own process" in err) is on


def test_the_last_line_skips_a_cleared_bar():
    assert last_line("Traceback\nValueError: bad\n\r     \r") == "ValueError: bad"
    assert last_line("") is None


def test_measure_json_stays_json_with_bars_and_quiet_draws_none(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")  # as on a terminal
    argv = ["measure", "tiny-llama", "--method", "qlora", "--seq-len", "32", "--steps", "2", "--device", "cpu",
            "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["status"] for line in out.splitlines()] == ["ok"]
    assert "qlora: building" in err and "qlora: steps" in err  # drawn by the run's own process, passed on
    assert main([*argv, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "ok"
    assert "qlora: steps" not in err
