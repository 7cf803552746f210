"""The server process's peak resident memory during a block of code (Linux ``/proc``), for the tests and the
benchmark that bound one request's memory.

``with PeakMemory() as m: ...`` then ``m.growth_mb``: the peak resident set size during the block minus the
resident size at its start, in MB.  The kernel's high-water mark (``VmHWM``) is reset at the start by writing
``5`` to ``/proc/self/clear_refs``; where that is not permitted a thread samples ``VmRSS`` every 2 ms instead
(``m.method`` says which).
"""

from __future__ import annotations

import threading
from pathlib import Path

STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in {STATUS}")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start_kb = self.peak_kb = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        self.start_kb = _status_kb("VmRSS")
        if _reset_peak() and _status_kb("VmHWM") <= self.start_kb + 1024:
            self.method = "VmHWM"
        else:
            self.method = "sampled VmRSS"
            self.peak_kb = self.start_kb
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS"))

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS"))
        else:
            self.peak_kb = _status_kb("VmHWM")

    @property
    def growth_mb(self) -> float:
        return max(0, self.peak_kb - self.start_kb) / 1024
