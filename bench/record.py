"""Result records (DESIGN.md contract): one self-describing JSON object per run, written atomically."""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

SCHEMA = 1
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "qlora-bench")
SOURCES = ("measured", "extrapolated", "estimated")
STATUSES = ("ok", "oom", "error")


def git_state() -> dict:
    """Commit and dirty flag of the checkout this code runs from, or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        # Results written under reports/ do not change what produced them; anything else uncommitted does.
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!reports").stdout.strip() != ""
        return {"git_commit": head.stdout.strip(), "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def environment(device) -> dict:
    """Package versions, torch build, device and git state: what a figure is only comparable under."""
    import platform

    import torch

    from bench.probes import device_info

    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "packages": versions,
        "python": platform.python_version(),
        "torch_build": {"version": torch.__version__, "cuda": torch.version.cuda},
        "device": device_info(device),
        **git_state(),
    }


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def make(config: dict, *, source: str, status: str, bytes_: dict | None, device_figures: dict | None = None,
         step_seconds: float | None = None, tokens_per_second: float | None = None, error: str | None = None,
         quality: dict | None = None, env: dict | None = None, **extra) -> dict:
    """A result record. `bytes_` holds the DESIGN.md categories and `peak` (None when the run did not finish)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    created = now()
    digest = hashlib.sha1(json.dumps([config, source, created], sort_keys=True).encode()).hexdigest()[:12]
    figures = {"cuda_max_allocated": None, "cuda_max_reserved": None, "nvml_used": None, "rss_anon_peak": None}
    figures.update(device_figures or {})
    return {
        "schema": SCHEMA,
        "id": digest,
        "source": source,
        "config": config,
        "status": status,
        "error": error,
        "bytes": bytes_,
        **figures,
        "step_seconds": step_seconds,
        "tokens_per_second": tokens_per_second,
        "quality": quality,
        **extra,
        "env": env,
        "created": created,
    }


def append(path: str | Path, record: dict) -> None:
    """Append one record as a JSON line, atomically: readers see the old file or the new one, never half a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)  # writers of one folder take turns; no lock file left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=f".{path.name}.") as tmp:
            tmp.write(old + json.dumps(record, allow_nan=False).encode() + b"\n")
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
    finally:
        os.close(lock)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace a whole file at once: readers (and a run killed mid-write) see the old text or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
