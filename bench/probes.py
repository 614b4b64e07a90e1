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
