"""Progress of a reference app subprocess (``faust_noop``, ``quix_app``), for ``bench stream`` to read.

The app counts the events it has handled; a daemon thread appends ``<unix time> <count>`` to a file every
``interval_s`` while the count moves. The bench reads the file and times the drain from the app's first
event to its last backlog event with the app's own clock (start-up excluded, as for the worker row).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


class Progress:
    def __init__(self, path: str | Path, interval_s: float = 0.05) -> None:
        self.n = 0
        self._path = Path(path)
        self._interval_s = interval_s
        self._path.write_text("")
        threading.Thread(target=self._run, name="bench-progress", daemon=True).start()

    def add(self, k: int = 1) -> None:
        self.n += k  # one writer (the app's loop); the reporter thread only reads

    def _run(self) -> None:
        last = -1
        with self._path.open("a") as f:
            while True:
                n = self.n
                if n != last:
                    f.write(f"{time.time():.6f} {n}\n")
                    f.flush()
                    last = n
                time.sleep(self._interval_s)


def read(path: str | Path) -> list[tuple[float, int]]:
    """The (unix time, count) records written so far (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out.append((float(parts[0]), int(parts[1])))
            except ValueError:
                continue
    return out
