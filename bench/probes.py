"""What the machine itself says about memory, kept apart from the project's own accounting.

On CPU: anonymous resident memory (RssAnon in /proc/self/status). Not ru_maxrss / VmHWM, which also count
memory-mapped checkpoint pages that are not the model's working memory. Linux keeps no peak of RssAnon, so a
sampling thread tracks it.
"""

from __future__ import annotations

import threading
from pathlib import Path

STATUS = Path("/proc/self/status")


def rss_anon_bytes() -> int | None:
    """Current anonymous RSS of this process in bytes, or None where /proc is not available."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakRssAnon:
    """Context manager sampling RssAnon every `interval_s`; `.peak` is the largest value seen (bytes) or None.

    Sampling can miss a spike shorter than the interval; allocations that large take longer than 2 ms to touch.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        v = rss_anon_bytes()
        if v is not None and (self.peak is None or v > self.peak):
            self.peak = v

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakRssAnon:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class DeviceProbe:
    """The device's own memory figures around a measured step; fields are None where they do not apply.

    CUDA: the torch allocator's max allocated / max reserved (reset at `start()`), and NVML's used memory for the
    whole device (includes the CUDA context and other processes). CPU: peak anonymous RSS of this process.
    """

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._rss: PeakRssAnon | None = None

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss = PeakRssAnon().__enter__()

    def stop(self) -> dict:
        import torch

        out = {"cuda_max_allocated": None, "cuda_max_reserved": None, "nvml_used": None, "rss_anon_peak": None}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            out["cuda_max_allocated"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_max_reserved"] = torch.cuda.max_memory_reserved(self.device)
            out["nvml_used"] = nvml_used(self.device)
        elif self._rss is not None:
            self._rss.__exit__(None, None, None)
            out["rss_anon_peak"] = self._rss.peak
        return out


def nvml_used(device) -> int | None:
    """Bytes in use on the whole device according to NVML, or None without NVML (no driver, no GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            index = device.index if device.index is not None else 0
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVMLError_LibraryNotFound and friends: no NVML here
        return None


def device_info(device) -> dict:
    """Name and total memory of the device a run used."""
    import os

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "total_bytes": int(props.total_memory)}
    name = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {"type": "cpu", "name": name, "total_bytes": total, "cores": os.cpu_count()}
