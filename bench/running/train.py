"""`qlora-bench train`: build a model, train cfg.steps steps on the built-in corpus (qlora.train), and summarise
the run: losses, step time, tokens per second and the process's peak anonymous memory (build included)."""

from __future__ import annotations

import statistics

from qlora.config import RunConfig


def summary(cfg: RunConfig) -> dict:
    """Build cfg's model, train cfg.steps steps on the built-in corpus, and summarise (JSON-ready)."""
    from bench import progress
    from bench.measuring.measure import build_shown
    from bench.measuring.probes import PeakRssAnon
    from qlora.build import count_trainable
    from qlora.optim import make_optimizer
    from qlora.train import corpus_blocks, train

    with PeakRssAnon() as rss:
        built = build_shown(cfg)
        optimizer = make_optimizer(cfg, built.model)
        with progress.bar(cfg.steps, f"{cfg.method}: training", unit="step") as shown:
            steps = train(built, cfg, optimizer, corpus_blocks(built, cfg),
                          on_step=lambda s: shown.update(loss=f"{s.loss:.3f}"))
    # The first step allocates optimizer state and warms caches: time the later ones.
    timed = steps[1:] or steps
    median = statistics.median(s.seconds for s in timed)
    return {
        "config": cfg.to_dict(),
        "trainable_parameters": count_trainable(built.model),
        "stored_parameters": sum(p.numel() for p in built.model.parameters()),
        "losses": [round(s.loss, 4) for s in steps],
        "step_seconds": median,
        "tokens_per_second": timed[0].tokens / median,
        "rss_anon_peak": rss.peak,
    }
