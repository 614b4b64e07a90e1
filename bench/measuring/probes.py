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

    CUDA: `start()` first gives the step a clean baseline (garbage collected, the allocator's cache emptied, peaks
    reset) and notes what is allocated then; `stop()` reads the torch allocator's max allocated / max reserved since,
    and NVML's used memory on the device torch means (found by UUID: NVML's own indices are physical cards, not
    CUDA_VISIBLE_DEVICES' order), for the whole device at start and end and, where NVML can tell, for this process
    alone (which includes its CUDA context). CPU: peak anonymous RSS of this process.
    """

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._rss: PeakRssAnon | None = None
        self._start: dict = {}

    def start(self) -> None:
        import gc

        import torch

        if self.cuda:
            gc.collect()  # models kept alive by reference cycles (Params4bit.module) go before the baseline
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            # What CUDA itself says the card holds and has free (not nvidia-smi's marketing total): the figures
            # the fit planner's capacity and context assumptions are to be calibrated against.
            self._start = {"cuda_allocated_step_start": torch.cuda.memory_allocated(self.device),
                           "nvml_used_step_start": nvml_used(self.device),
                           "cuda_total_bytes": int(total), "cuda_free_step_start": int(free)}
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
            out["nvml_process_used"] = nvml_process_used(self.device)
            out.update(self._start)
        elif self._rss is not None:
            self._rss.__exit__(None, None, None)
            out["rss_anon_peak"] = self._rss.peak
        return out


def _nvml_handle(pynvml, device):
    """NVML's handle for the card torch calls `device`, by UUID; by index only when both see exactly one card."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is not None:
        text = str(uuid)
        for candidate in [text] if text.startswith(("GPU-", "MIG-")) else [f"GPU-{text}", f"MIG-{text}"]:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(candidate)
            except pynvml.NVMLError:
                continue
    if torch.cuda.device_count() == 1 and pynvml.nvmlDeviceGetCount() == 1:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        try:
            if pynvml.nvmlDeviceGetMigMode(handle)[0]:  # a MIG slice: the card's figures are not the slice's
                return None
        except (pynvml.NVMLError, AttributeError):
            pass
        return handle
    return None  # never guess: NVML's index N is not torch's device N under CUDA_VISIBLE_DEVICES


def _with_nvml(device, read):
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = _nvml_handle(pynvml, device)
            return None if handle is None else read(pynvml, handle)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVMLError_LibraryNotFound and friends: no NVML here
        return None


def nvml_used(device) -> int | None:
    """Bytes in use on the whole device torch calls `device` (other processes included), or None without NVML."""
    return _with_nvml(device, lambda nv, h: int(nv.nvmlDeviceGetMemoryInfo(h).used))


def nvml_process_used(device) -> int | None:
    """Bytes this process uses on the device according to NVML (its CUDA context included), or None where NVML
    cannot tell (no NVML, or a container whose process ids NVML does not see)."""
    import os

    def read(nv, h):
        for proc in nv.nvmlDeviceGetComputeRunningProcesses(h):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return None

    return _with_nvml(device, read)


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
