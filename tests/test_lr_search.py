"""Learning rates chosen on a validation split carved from the training examples, never the held-out ones; the
choice and the grid's scores in the records and the summary."""

import pytest

from bench.cli import main
from bench.render import quality as render_quality
from bench.running import lr_search, quality
from qlora.config import ConfigError, RunConfig
from qlora.tasks import Example, Task


def task(n_train: int = 100, n_held: int = 20) -> Task:
    def ex(i, side):
        return Example(prompt=f"{side} {i}?", choices=(" yes", " no"), answer=i % 2)
    return Task("toy", "accuracy", [ex(i, "train") for i in range(n_train)], [ex(i, "held") for i in range(n_held)],
                "hand-made")


def test_the_grid_is_parsed_or_refused_by_name():
    assert lr_search.parse_grid("default", ["full", "lora"]) == {"full": (1e-5, 2e-5, 5e-5),
                                                                 "lora": (1e-4, 2e-4, 5e-4)}
    assert lr_search.parse_grid("lora=1e-4:3e-4", ["full", "lora"])["lora"] == (1e-4, 3e-4)
    assert lr_search.parse_grid({"full": [1e-5, 3e-5]}, ["full"]) == {"full": (1e-5, 3e-5)}
    assert lr_search.parse_grid(None, ["full"]) is None
    for bad in ("lora=1e-4", "lora=-1:2", "fuller=1:2", "lora=x:y"):
        with pytest.raises(ConfigError, match="--lr-grid"):
            lr_search.parse_grid(bad, ["lora"])


def test_the_validation_split_is_carved_from_training_stably_and_disjoint_from_held_out():
    t = task()
    rest, valid = lr_search.carve(t)
    assert len(valid) == 10 and len(rest.train) == 90 and rest.heldout == t.heldout
    assert not set(map(repr, valid)) & set(map(repr, rest.train))
    assert not set(map(repr, valid)) & set(map(repr, t.heldout))
    assert lr_search.carve(t)[1] == valid  # the same split on every run
    with pytest.raises(ConfigError, match="too few"):
        lr_search.carve(task(n_train=12))


def fake_runs(monkeypatch, best: dict[str, float]):
    """train_and_score stand-in: accuracy peaks at `best[method]`'s rate; records what it trained and scored on."""
    from bench.measuring import record

    seen, env = [], {"git_commit": record.git_state()["git_commit"]}  # runs resume under the code that made them

    def fake(cfg, t, examples, *, measure_memory=True, with_base=False, log=print):
        seen.append((cfg.method, cfg.lr, cfg.seed, list(t.train), list(examples)))
        right = 0.9 if cfg.lr == best[cfg.method] else 0.6
        n = len(examples)
        tuned = {"correct": [1 if i < right * n else 0 for i in range(n)], "nll": [1.0] * n, "tokens": [1] * n}
        out = {"config": cfg.to_dict(), "tuned": tuned, "trainable_parameters": 1, "train_losses": [2.0, 1.0],
               "step_seconds": 0.1, "tokens": 10, "target_tokens": 2, "schedule_digest": "x", "env": env}
        if with_base:
            out["base"] = {**tuned, "correct": [1 if i < 0.5 * n else 0 for i in range(n)]}
        return out

    monkeypatch.setattr(quality, "train_and_score", fake)
    return seen


def test_the_search_scores_validation_only_and_the_final_runs_use_the_chosen_rate(monkeypatch, tmp_path):
    seen = fake_runs(monkeypatch, {"full": 5e-5, "lora": 1e-4})
    t = task()
    cfgs = [RunConfig(model="smollm2-135m-instruct", method=m, steps=2, batch_size=2) for m in ("full", "lora")]
    grid = lr_search.parse_grid("default", ["full", "lora"])
    records = quality.run(cfgs, t, 20, 2, tmp_path, log=lambda line: None, lr_grid=grid)
    held = set(map(repr, t.heldout))
    searching = [s for s in seen if len(s[4]) == 10]
    assert len(searching) == 6 and all(not set(map(repr, s[4])) & held for s in searching)
    final = [s for s in seen if len(s[4]) == 20]
    assert {(m, lr) for m, lr, *_ in final} == {("full", 5e-5), ("lora", 1e-4)}
    valid = set(map(repr, searching[0][4]))
    assert all(not valid & set(map(repr, s[3])) for s in final)  # final runs never train on the split
    by = {r["config"]["method"]: r for r in records}
    s = by["full"]["quality"]["lr_search"]
    assert s["chosen"] == 5e-5 and s["grid"] == [1e-5, 2e-5, 5e-5] and s["scores"][2] == pytest.approx(0.9)
    assert by["lora"]["config"]["lr"] == 1e-4 and by["lora"]["quality"]["train"]["lr"] == 1e-4
    page = render_quality.markdown(records)
    assert "Learning rates chosen on 10 validation examples" in page
    # Both choices are ends of their grids (5e-5 the highest of full's, 1e-4 the lowest of LoRA's): said so.
    assert "full 5e-05, the grid's highest: a rate beyond it might do better" in page
    assert "lora 0.0001, the grid's lowest" in page
    # Resumed: the search and the final runs are read back, nothing trains again.
    seen.clear()
    quality.run(cfgs, t, 20, 2, tmp_path, log=lambda line: None, lr_grid=grid)
    assert seen == []


def test_a_rate_and_a_grid_together_are_refused(capsys):
    assert main(["quality", "smollm2-135m-instruct", "--lr", "1e-4", "--lr-grid", "default"]) == 2
    assert "--lr or --lr-grid" in capsys.readouterr().err


def test_a_task_with_groups_is_carved_in_whole_groups():
    """party's speakers: no speaker's paragraphs on both sides of the validation split."""
    from dataclasses import replace

    t = task()
    groups = [f"speaker-{i % 30}" for i in range(len(t.train))]  # 3 or 4 paragraphs each
    rest, valid = lr_search.carve(replace(t, train_groups=groups))
    chosen = {groups[i] for i, e in enumerate(t.train) if e in valid}
    assert 2 <= len(valid) <= 10 and len(rest.train) + len(valid) == len(t.train)
    assert not chosen & set(rest.train_groups) and len(rest.train_groups) == len(rest.train)
