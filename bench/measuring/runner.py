"""The one runner for isolated runs: a function of a RunConfig, called in a fresh Python process.

Every measured run goes through `isolated` (`measure`, `sweep`, `validate`, `train --method all`): memory starts
clean, whatever one run leaves behind cannot inflate the next, and a run that dies cannot take the caller with it.
The child is a plain subprocess (`python -m bench.measuring.runner`), never a multiprocessing pool: a pool whose
worker is killed (the kernel's OOM killer sends SIGKILL) never returns, and the caller hangs forever.

How a child's end becomes a result:
- it returns: its JSON result;
- it raises: ConfigError is raised again here (bad input, exit 2); an out-of-memory raises `RunFailed("oom")`;
  anything else `RunFailed("error")`, with the exception's first line;
- it is killed by a signal: `RunFailed("oom")` only with evidence that the kernel's OOM killer did it (an
  `oom_kill` counter of the memory cgroup or of /proc/vmstat went up while it ran); otherwise `RunFailed("error")`
  naming the signal;
- it runs past `timeout_s`: its whole process group is killed, `RunFailed("error")`.

Its output (stdout and stderr, merged) never reaches this process's stdout: the tail is kept for the messages above,
and while progress bars are on (bench.progress) all of it is passed on to stderr as it comes, bars included.
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench import progress
from qlora.config import ConfigError, RunConfig

# RSS follows live memory only with glibc's dynamic mmap threshold off; it must be set before the process starts.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}


OOM_MESSAGES = ("can't allocate memory", "CUDA out of memory", "CUDA error: out of memory",
                "CUBLAS_STATUS_ALLOC_FAILED")


class RunFailed(Exception):
    """A run that did not return: `status` is "oom" or "error"; `extra` holds record fields (e.g. oom_bytes)."""

    def __init__(self, status: str, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def is_oom(e: BaseException) -> bool:
    """Whether an exception is an out-of-memory: torch's, Python's, or the CPU allocator's message."""
    if isinstance(e, RunFailed):
        return e.status == "oom"
    if isinstance(e, MemoryError):  # the ledger's BudgetExceeded too
        return True
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return True
    except ImportError:
        pass
    # torch's CPU allocator; CUDA out-of-memory outside the caching allocator (a kernel's own cudaMalloc, cuBLAS
    # creating its workspace) arrives as a plain RuntimeError with one of these messages.
    return isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES)


# ---- evidence of the kernel's OOM killer -------------------------------------------------------------------------


def _oom_counter_files() -> list[Path]:
    """Files that count the kernel's OOM kills that could hit this process: its memory cgroup (v2 memory.events,
    v1 memory.oom_control) and the whole machine (/proc/vmstat)."""
    files = [Path("/proc/vmstat")]
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            files += [Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events", Path("/sys/fs/cgroup/memory.events")]
        elif "memory" in controllers.split(","):  # cgroup v1
            root = Path("/sys/fs/cgroup/memory")
            files += [root / path.lstrip("/") / "memory.oom_control", root / "memory.oom_control"]
    return list(dict.fromkeys(f for f in files if f.is_file()))


def oom_kill_counts() -> dict[str, int]:
    """The `oom_kill` count of every counter file that exists here (see _oom_counter_files)."""
    counts = {}
    for f in _oom_counter_files():
        try:
            for line in f.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    counts[str(f)] = int(value)
        except (OSError, ValueError):
            continue
    return counts


def oom_evidence(before: dict[str, int], after: dict[str, int]) -> str | None:
    """Which counter says the OOM killer struck between two readings, or None."""
    for f, n in after.items():
        if f in before and n > before[f]:
            return f"oom_kill in {f} went {before[f]} -> {n}"
    return None


def death_by_signal(returncode: int, before: dict[str, int], stderr: str) -> RunFailed:
    sig = -returncode
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    if sig == signal.SIGKILL and (evidence := oom_evidence(before, oom_kill_counts())):
        return RunFailed("oom", f"killed by the kernel's OOM killer ({evidence})")
    last = last_line(stderr)
    tail = f"; last output: {last[:200]}" if last else ""
    return RunFailed("error", f"the run's process was killed by {name} (no out-of-memory kill was recorded){tail}")


# ---- parent side -------------------------------------------------------------------------------------------------


def last_line(output: str) -> str | None:
    """The last line of a run's output with something on it (a progress bar clears its line with blanks)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else None


class Output(threading.Thread):
    """Reads a run's output (stdout and stderr, merged) as it comes: keeps its tail for error messages and, while
    progress bars are on (bench.progress), passes it on to this process's stderr, where the bars are drawn."""

    TAIL = 64 * 1024

    def __init__(self, stream, forward: bool):
        super().__init__(daemon=True)
        self.stream, self.forward, self.tail = stream, forward, b""

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = self.stream.fileno()
        while chunk := os.read(fd, 8192):
            self.tail = (self.tail + chunk)[-self.TAIL:]
            if self.forward:
                try:
                    sys.stderr.write(decoder.decode(chunk))
                    sys.stderr.flush()
                except (OSError, ValueError):  # our stderr is gone (closed terminal): keep reading the pipe
                    self.forward = False

    def text(self, wait_s: float = 10.0) -> str:
        """The tail, once the pipe has ended (or after wait_s: a grandchild outside the group may hold it open)."""
        self.join(wait_s)
        return self.tail.decode("utf-8", errors="replace")


def call(target: str, payload, *, timeout_s: float | None = None) -> object:
    """`target` ("package.module:function") applied to JSON `payload` (a list of arguments) in a fresh process;
    returns its JSON result. Raises ConfigError for bad input the child found, RunFailed for everything else."""
    with tempfile.TemporaryDirectory(prefix="qlora-bench-run-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.measuring.runner", target, str(result)]
        env = dict(os.environ, **CHILD_ENV, **progress.child_env(), QLORA_BENCH_PARENT=str(os.getpid()))
        before = oom_kill_counts()
        # Its own session: on a time-out the whole group goes (tokenizer threads, a grandchild), never the caller.
        # Its stdout joins its stderr: nothing a run prints may reach this process's stdout (--json output).
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        output = Output(proc.stdout, forward=progress.enabled())
        output.start()
        try:
            try:
                proc.stdin.write(json.dumps(payload).encode())
                proc.stdin.close()
            except BrokenPipeError:  # it died before reading its input: its exit status says how
                pass
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            raise RunFailed("error", f"timed out after {timeout_s:g} s") from None
        except BaseException:  # Ctrl-C, or anything else here: the run must not outlive its caller
            _kill_group(proc)
            proc.wait()
            raise
        err = output.text()  # the pipe ends when the run's process group is gone
        if not result.is_file() and proc.returncode < 0:
            raise death_by_signal(proc.returncode, before, err)
        if not result.is_file():
            last = last_line(err) or f"exit code {proc.returncode}"
            raise RunFailed("error", f"the run's process ended without a result (exit code {proc.returncode}): "
                                     f"{last[:300]}")
        answer = json.loads(result.read_text())
    if "result" in answer:
        return answer["result"]
    failure = answer["failure"]
    if failure["kind"] == "config":
        raise ConfigError(failure["message"])
    raise RunFailed(failure["kind"], failure["message"], **failure.get("extra", {}))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def isolated(fn, cfg: RunConfig, *, timeout_s: float | None = None, **kwargs):
    """fn(cfg, **kwargs) in a fresh process (see `call`); fn must be a module-level function returning JSON data."""
    target = f"{fn.__module__}:{fn.__qualname__}"
    return call("bench.measuring.runner:_apply", [target, cfg.to_dict(), kwargs], timeout_s=timeout_s)


def _apply(target: str, config: dict, kwargs: dict):
    return _resolve(target)(RunConfig.from_dict(config), **kwargs)


# ---- child side ----------------------------------------------------------------------------------------------------


def _resolve(target: str):
    import importlib

    module, _, name = target.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), however the parent ends: a run that
    outlived its sweep would hold the memory the next run is measured in, while the sweep's claim on it is gone.
    `parent`: the pid it was started by (default: $QLORA_BENCH_PARENT), to exit at once if that one is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != (parent or int(os.environ.get("QLORA_BENCH_PARENT", os.getppid()))):
        os._exit(1)  # the parent was already gone before the request was made


def failure(e: BaseException) -> dict:
    """How a run's process reports an exception to its parent: bad input (`config`), `oom` or `error`, one line."""
    if isinstance(e, ConfigError):
        return {"kind": "config", "message": str(e)}
    if isinstance(e, RunFailed):  # classified where it happened (a sharded launch's rank)
        message, extra = e.message, dict(e.extra)
    else:
        message = (f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__])[0]
        extra = {"oom_bytes": e.live} if hasattr(e, "live") else {}
    return {"kind": "oom" if is_oom(e) else "error", "message": message, "extra": extra}


def _child(target: str, result_path: str) -> None:
    _die_with_parent()
    payload = json.loads(sys.stdin.read())
    try:
        answer = {"result": _resolve(target)(*payload)}
    except BaseException as e:  # noqa: BLE001 - every failure of a run is a result, reported to the parent
        answer = {"failure": failure(e)}
    try:
        text = json.dumps(answer, allow_nan=False)
    except ValueError as e:  # NaN or infinity in the result: not valid JSON, so not a record either
        text = json.dumps({"failure": {"kind": "error", "message": f"the run's result is not valid JSON: {e}"}})
    tmp = result_path + ".tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, result_path)  # the parent sees a whole result or none
    sys.stdout.flush()
    sys.stderr.flush()
    # The result is written: leave now, so that a library's crash at interpreter exit (CUDA, bitsandbytes teardown)
    # cannot turn a finished run into a failed one.
    os._exit(0)


if __name__ == "__main__":
    # the importable module's _child, not this __main__ copy: a run that raises RunFailed (a sharded launch) must
    # raise the class `failure` checks for
    from bench.measuring.runner import _child as child

    sys.exit(child(*sys.argv[1:3]))
