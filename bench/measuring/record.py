"""Result records (DESIGN.md contract): one self-describing JSON object per run, written atomically."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from bench import recipes
from bench.schema import DEVICE_FIGURES, METHODS, REQUIRED, SCHEMA, SOURCES, STATUSES
from qlora.config import ConfigError

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "qlora-bench")


def git_state() -> dict:
    """Commit and dirty flag of the checkout this code runs from, or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]  # the checkout: bench/measuring/record.py

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

    from bench.measuring.probes import device_info

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
    # Everything that tells two records apart, not only the config: estimates made in the same second share a
    # config (the longest sequence that fits two cards can be the same length) and differ in what they say of it.
    content = [config, source, created, status, bytes_, device_figures, error, quality, extra]
    digest = hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]
    figures = dict.fromkeys(DEVICE_FIGURES)
    figures.update(device_figures or {})
    return {
        "schema": SCHEMA,
        "id": digest,
        "source": source,
        "config": config,
        "recipe": recipes.match(config),  # the recipe (bench/recipes.toml) the config is, if any
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
    """Append one record as a JSON line, atomically: readers see the old file or the new one, never half a line.
    A record that is not valid JSON (NaN, infinity, an object JSON cannot hold) raises before anything is written."""
    line = json.dumps(record, allow_nan=False).encode() + b"\n"
    path = Path(path)
    with _folder_lock(path):
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        _replace(path, old + line)


def update(path: str | Path, records: list[dict]) -> None:
    """Replace the lines of `path` whose record id is among `records` by those records, atomically and under the
    folder's lock, as `append` writes: other writers' lines stay as they are."""
    by_id = {r["id"]: json.dumps(r, allow_nan=False) for r in records}
    path = Path(path)
    with _folder_lock(path):
        lines = [x for x in path.read_text().splitlines() if x.strip()]
        lines = [by_id.get(json.loads(x).get("id"), x) for x in lines]
        _replace(path, "".join(x + "\n" for x in lines).encode())


@contextlib.contextmanager
def _folder_lock(path: Path):
    """Writers of one folder take turns (an exclusive flock on the folder itself: no lock file left behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace a whole file at once: readers (and a run killed mid-write) see the old text or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, text.encode())


def _replace(path: Path, data: bytes) -> None:
    """Write data to a temporary file beside path, then rename it over path; no temporary survives a failure."""
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=f".{path.name}.") as tmp:
        try:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            os.unlink(tmp.name)
            raise
    try:
        os.replace(tmp.name, path)
    except BaseException:
        os.unlink(tmp.name)
        raise


def read(path: str | Path) -> list[dict]:
    """The result records of a JSONL file, each checked against the contract. Every consumer reads through here, so
    a torn line, a record of a newer schema or an unknown method is one ConfigError naming FILE:LINE, not a
    KeyError deep in a report."""
    return [r for _, r in read_numbered(path)]


def read_numbered(path: str | Path) -> list[tuple[int, dict]]:
    """Checked result records with their line numbers, for callers that check more and must say where."""
    return [(n, check(obj, f"{path}:{n}")) for n, obj in _objects(path)]


def read_objects(path: str | Path) -> list[dict]:
    """Every line a JSON object, checked no further: for JSONL files that hold something other than result records
    (quality's per-seed scores)."""
    return [obj for _, obj in _objects(path)]


def _objects(path: str | Path) -> list[tuple[int, dict]]:
    out = []
    # Split on newlines only, as JSONL does: splitlines() also splits on U+2028 and friends, which may stand
    # unescaped inside a JSON string and would shift every line number after them.
    for n, line in enumerate(_text(Path(path)).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=_no_constant)
        except ValueError as e:  # JSONDecodeError, and NaN/Infinity, which writers never emit (allow_nan=False)
            where = f" at column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            raise ConfigError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)}{where})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}:{n}: not a result record (a JSON {type(obj).__name__}, not an object)")
        out.append((n, obj))
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no such results file: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read results file {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        # Name the line, as for any other damage: count the newlines before the bad byte.
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})") from None


def check(r: dict, where: str) -> dict:
    """`r` if it is a result record this version reads; else ConfigError "WHERE: what is wrong"."""
    # The schema first: a newer record may have moved any other field, so checking those would mislead.
    schema = r.get("schema")
    if "schema" not in r:
        raise ConfigError(f"{where}: not a result record (no 'schema')")
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise ConfigError(f"{where}: not a result record (schema must be an integer, got {schema!r})")
    if schema > SCHEMA:
        raise ConfigError(f"{where}: schema {schema} is newer than this qlora-bench reads ({SCHEMA}); "
                          "upgrade qlora-bench")
    if schema != SCHEMA:
        raise ConfigError(f"{where}: schema {schema} is not one this qlora-bench reads ({SCHEMA})")
    missing = [k for k in REQUIRED if k not in r]
    if missing:
        raise ConfigError(f"{where}: not a result record (no {', '.join(map(repr, missing))})")
    if not isinstance(r["id"], str) or not r["id"]:
        raise ConfigError(f"{where}: id must be a non-empty string, got {r['id']!r}")
    _one_of(where, "source", r["source"], SOURCES)
    _one_of(where, "status", r["status"], STATUSES)
    _check_config(r["config"], where)
    _check_bytes(r.get("bytes"), where)
    return r


def _one_of(where: str, name: str, value, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{where}: {name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_config(config, where: str) -> None:
    """What every reader indexes without a default: the method picks code paths, the rest names the run."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config must be an object, got {config!r}")
    _one_of(where, "config.method", config.get("method"), METHODS)
    if not isinstance(config.get("model"), str) or not config["model"]:
        raise ConfigError(f"{where}: config.model must be a non-empty string, got {config.get('model')!r}")
    for name in ("batch_size", "seq_len"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: config.{name} must be an integer, got {value!r}")


def _check_bytes(bytes_, where: str) -> None:
    if bytes_ is None:
        return
    if not isinstance(bytes_, dict):
        raise ConfigError(f"{where}: bytes must be null or an object, got {bytes_!r}")
    for name, value in bytes_.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: bytes.{name} must be an integer, got {value!r}")
