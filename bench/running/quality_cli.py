"""The quality commands of `qlora-bench`: `quality` (same-budget fine-tunes per method, scored on held-out data),
`rescore` (a quality folder's records made again from its per-example scores) and `nf4-cost` (what NF4 costs a
model before training). bench.cli adds them with `add_parsers`.
"""

from __future__ import annotations

import json
import sys

from bench.options import add_quiet, check_out_dir, default_device
from qlora.config import RunConfig


def cmd_quality(args) -> int:
    from pathlib import Path

    from bench.render import quality as render_quality
    from bench.running import quality, quality_plan
    from bench.running.plan import SPEC_KEYS

    check_out_dir(args.out)
    spec = {k: getattr(args, k) for k in SPEC_KEYS if getattr(args, k, None) is not None}
    plan = quality_plan.prepare(spec, args.device or default_device())
    if plan.eval_examples > len(plan.task.heldout):
        print(f"qlora-bench: {plan.task.name} has {len(plan.task.heldout)} held-out examples; scoring all of them",
              file=sys.stderr)
    out = Path(args.out) if args.out else None
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    records = quality.run(plan.configs, plan.task, plan.eval_examples, plan.seeds, out, log=log, lr_grid=plan.lr_grid)
    if out is not None:
        quality.save(out, records)
    if args.json:
        for r in records:
            print(json.dumps(r, allow_nan=False))
    else:
        print(render_quality.markdown(records), end="")
    return 0


def cmd_rescore(args) -> int:
    from pathlib import Path

    from bench.render import quality as render_quality
    from bench.running import quality

    records = quality.rescore(Path(args.out), log=lambda line: print(line, file=sys.stderr, flush=True))
    print(render_quality.markdown(records), end="")
    return 0


def cmd_nf4_cost(args) -> int:
    from pathlib import Path

    from bench.running import nf4_cost

    check_out_dir(args.out)
    out = Path(args.out) if args.out else None
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    for r in nf4_cost.run(args.models, args.task, args.examples, out, log=log):
        c = r["nf4_cost"]
        if args.json:
            print(json.dumps(r, allow_nan=False))
            continue
        w, h = c["weight_error"], c["hidden_error"]
        loss = f"; loss fp32 {c['loss']['fp32']:.4f}, NF4 +{c['loss']['nf4_increase']:.4f} nats" if "loss" in c else ""
        print(f"{r['config']['model']}: {c['quantised_layers']} layers; distinct values per {c['grid_block']} weights "
              f"{c['grid_levels']:g}; weight error NF4 {w['nf4']:.4f} (bf16 {w['bf16']:.4f}); last hidden state "
              f"error NF4 {h['nf4']:.4f} (bf16 {h['bf16']:.4f}){loss}")
    return 0


def add_parsers(sub) -> None:
    """The quality commands' parsers, on bench.cli's subparsers."""
    q = sub.add_parser("quality", help="same-budget fine-tunes per method from one base, scored on held-out data")
    q.add_argument("model", help="a pretrained model: smollm2-135m-instruct, all-minilm-l6-v2 (an fp32 encoder, "
                   "trained as a sequence classifier on choice tasks), or a directory of safetensors")
    q.add_argument("--method", "--methods", dest="methods",
                   help="comma-separated methods, or all (the default: full,lora,qlora)")
    q.add_argument("--task", help="built-in task: shakespeare, sentiment, party or support (default: sentiment)")
    q.add_argument("--data", help="JSONL of {text} | {prompt, completion} | {prompt, choices, answer} examples")
    q.add_argument("--eval-data", help="held-out JSONL for --data (default: a stable 20%% of --data)")
    q.add_argument("--setting", help="quick (the default: 1 seed, 40 steps, 200 held-out examples; minutes on CPU), "
                   "long (3 seeds, 100 steps, 1000 held-out; about an hour on CPU) or gpu (3 seeds, 500 steps of 16, "
                   "2000 held-out)")
    q.add_argument("--steps", type=int, help="training steps per method and seed (overrides the setting)")
    q.add_argument("--seeds", type=int, help="seeds per method (overrides the setting)")
    q.add_argument("--eval-examples", type=int, help="held-out examples to score (overrides the setting)")
    q.add_argument("--batch-size", type=int, help="examples per step (overrides the setting)")
    q.add_argument("--seq-len", type=int, help="tokens per example at most (overrides the setting)")
    q.add_argument("--lr", help="learning rate, or per method: full=2e-5,lora=2e-4,qlora=2e-4 (the defaults)")
    q.add_argument("--lr-grid", help="choose each method's rate first, on a validation split carved from the training "
                   "examples (never the held-out ones): 'default' (full 1e-5:2e-5:5e-5, lora and qlora "
                   "1e-4:2e-4:5e-4) or method=rate:rate:rate pairs")
    q.add_argument("--precision", help="mixed (the default: bf16 model, fp32 master weights), bf16 or fp32; pure "
                   "bf16 rounds away most of Full FT's updates at its learning rate")
    q.add_argument("--lora-r", type=int, help=f"LoRA rank (default {RunConfig().lora_r}; alpha = 2r)")
    q.add_argument("--seed", type=int, help="first seed (default 0)")
    q.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    q.add_argument("--out", help="directory: results.jsonl (a record per method), quality-runs.jsonl, summary.md")
    q.add_argument("--json", action="store_true", help="print one result record per method")
    add_quiet(q)
    q.set_defaults(func=cmd_quality)
    rs = sub.add_parser("rescore", help="a quality folder's records made again from its per-example scores "
                        "(OUT/quality-runs.jsonl), without training: after a change to the statistics")
    rs.add_argument("out", help="the folder a quality run wrote (--out), e.g. reports/quality/NAME")
    rs.set_defaults(func=cmd_rescore)
    n = sub.add_parser("nf4-cost", help="what NF4 costs real weights before training: weight, hidden-state and "
                       "(decoders) loss error against fp32, and whether the weights already sit on a 4-bit grid")
    n.add_argument("models", nargs="+",
                   help="pretrained models: smollm2-135m-instruct, all-minilm-l6-v2, or directories of safetensors")
    n.add_argument("--task", default="sentiment", help="held-out prompts of this built-in task (default: sentiment)")
    n.add_argument("--examples", type=int, default=200, help="held-out prompts to run (default 200)")
    n.add_argument("--out", help="directory: nf4-cost.jsonl (a record per model), beside a quality run's records")
    n.add_argument("--json", action="store_true", help="print one record per model")
    n.set_defaults(func=cmd_nf4_cost)
