"""Progress on long work (layers built, steps done, examples scored, time left), drawn by tqdm on stderr.

Bars are drawn only when someone can watch them: stderr is a terminal, and `--quiet` was not given. Results never
go to stderr and bars never to stdout, so `--json` output stays clean whatever is drawn.

The setting lives in the environment (QLORA_BENCH_PROGRESS: "1" on, "0" off, unset: on if stderr is a terminal), so
a run's own process (bench.measuring.runner) inherits it: its stderr is a pipe the parent forwards to the
terminal, where the parent's choice, not the pipe, decides.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager

ENV = "QLORA_BENCH_PROGRESS"


def enabled() -> bool:
    value = os.environ.get(ENV)
    if value is not None:
        return value == "1"
    return sys.stderr.isatty()


@contextmanager
def quiet(active: bool = True):
    """No bars, in this process and in every run it starts, while inside (`--quiet`)."""
    previous = os.environ.get(ENV)
    if active:
        os.environ[ENV] = "0"
    try:
        yield
    finally:
        if active and previous is None:
            os.environ.pop(ENV, None)
        elif active:
            os.environ[ENV] = previous


def child_env() -> dict[str, str]:
    """What a run's own process needs to draw (or not) as this one would: its stderr is a pipe, not the terminal."""
    if not enabled():
        return {ENV: "0"}
    return {ENV: "1", "COLUMNS": str(shutil.get_terminal_size().columns)}


class _Silent:
    def update(self, n: int = 1, **postfix) -> None:
        pass

    def at(self, done: int, total: int) -> None:
        pass


class _Bar:
    def __init__(self, bar):
        self._bar = bar

    def update(self, n: int = 1, **postfix) -> None:
        """Advance by n; postfix (e.g. loss=2.31) is shown after the bar."""
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def at(self, done: int, total: int) -> None:
        """Done `done` of `total`: for callbacks that count themselves (qlora.build's on_layer)."""
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)


@contextmanager
def bar(total: int | None, what: str, unit: str = "it"):
    """A bar of `total` units (`what` names the work, e.g. "qlora: building"); yields an object whose
    `update(n, **postfix)` or `at(done, total)` advances it; a silent one when bars are off. The bar is gone when
    the work is done (leave=False): finished work is reported in lines, by whoever ran it."""
    if not enabled():
        yield _Silent()
        return
    from tqdm import tqdm

    columns = shutil.get_terminal_size().columns
    with tqdm(total=total, desc=what, unit=unit, file=sys.stderr, leave=False, ncols=columns,
              dynamic_ncols=False, mininterval=0.5) as t:
        yield _Bar(t)

