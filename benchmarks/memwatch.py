"""Peak resident memory of a whole process tree, sampled in a background thread."""
from __future__ import annotations

import os
import threading
import time



def _field(path: str, key: str) -> int:
    for line in open(path):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.peak_mib`` (this process plus all descendants).

    ``peak_mib`` sums VmRSS, which counts pages shared between processes (the torch libraries
    every Ray worker maps) once per process: an upper bound. ``peak_pss_mib`` sums PSS (each shared
    page split among its sharers), the tree's real footprint, sampled every ``pss_interval`` s.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.2, pss_interval: float = 5.0):
        self.pid = pid or os.getpid()
        self.interval = interval
        # PSS is costly to read (the kernel walks every mapping): sampled every 0.5 s over a Ray
        # sweep's ~40 processes it took 40 % of a core and slowed the sweep it measured
        self.pss_interval = pss_interval
        self.peak = self.peak_pss = 0
        self._last_pss = -float("inf")
        self._stop = threading.Event()

    def _tree(self, with_pss: bool) -> tuple[int, int]:
        """Sums of VmRSS and (if asked) of PSS over the tree, read from /proc (Linux)."""
        rss, pss, todo, seen = 0, 0, [self.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                rss += _field(f"/proc/{pid}/status", "VmRSS:")
                if with_pss:
                    pss += _field(f"/proc/{pid}/smaps_rollup", "Pss:")
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                pass
        return rss, pss

    def _sample(self, force_pss: bool = False):
        now = time.monotonic()
        with_pss = force_pss or now - self._last_pss >= self.pss_interval
        rss, pss = self._tree(with_pss)
        self.peak = max(self.peak, rss)
        if with_pss:
            self._last_pss = now
            self.peak_pss = max(self.peak_pss, pss)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample(force_pss=True)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20

    @property
    def peak_pss_mib(self) -> float:
        return self.peak_pss / 2**20
