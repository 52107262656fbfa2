"""``bench stream`` reference rows: other stream apps over the same pre-produced backlog and topics.

* ``reference: no-op Faust agent`` (``deploy/bench/faust_noop.py``): Faust's own per-message ceiling.
* ``reference: Quix Streams app (stateful)`` (``deploy/bench/quix_app.py``): the peer a user would pick
  instead, doing comparable stateful work; needs ``quixstreams`` (the ``bench`` extra), skipped with a note
  without it.

Each runs as a subprocess with a consumer group / app id of its own, reads the backlog from the beginning and
reports its count through a progress file (``deploy/bench/progress.py``). The rate runs from the app's first
event to its last backlog event, on the app's clock, so start-up (group join, topic creation) is excluded, as
for the worker row.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from deploy.bench import progress as prog

POLL_S = 0.2
FAUST_CASE = "reference: no-op Faust agent (take_events(500), counts only)"
QUIX_CASE = "reference: Quix Streams app (stateful: decode, per-user state, 1 record/impression)"


def quix_available() -> bool:
    return importlib.util.find_spec("quixstreams") is not None


class RefProc:
    """A reference app as a subprocess, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, module: str, args: list[str], log_path: Path, progress_path: Path) -> None:
        self.log_path, self.progress_path = log_path, progress_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
        self.spawned = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def drain(self, total: int, timeout_s: float, what: str) -> dict[str, Any]:
        """Wait until the app has counted ``total`` events; its rate from the first record to the one that
        reached ``total`` (first record: the first events handled; the app writes every 50 ms)."""
        deadline = time.monotonic() + timeout_s
        while True:
            trace = prog.read(self.progress_path) if self.progress_path.exists() else []
            if trace and trace[-1][1] >= total:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.proc.returncode}:\n{self._tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what} (counted "
                                   f"{trace[-1][1] if trace else 0} of {total}):\n{self._tail()}")
            time.sleep(POLL_S)
        first = next(i for i, (_, n) in enumerate(trace) if n > 0)
        last = next(i for i, (_, n) in enumerate(trace) if n >= total)
        t0, n0 = trace[first]
        t1, n1 = trace[last]
        wall = max(t1 - t0, 1e-9)
        return {"events": int(total), "counted": n1, "wall_s": wall, "events_per_s": (total - n0) / wall,
                "startup_s": t0 - self.spawned}

    def _tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        from deploy.infra.process import terminate

        terminate(self.proc.pid, timeout=30.0, group=False)
        self.proc.wait()
        self._log.close()


def faust_noop(bootstrap: str, topic_names: list[str], partitions: int, total: int, tmp: Path,
               timeout_s: float, app_ids: list[str] | None = None) -> dict[str, Any]:
    """The no-op Faust row; its app id is appended to ``app_ids`` (Faust names internal topics after it)."""
    run = uuid.uuid4().hex[:8]
    app_id = f"bench-faust-noop-{run}"
    if app_ids is not None:
        app_ids.append(app_id)
    d = tmp / f"faust-noop-{run}"
    d.mkdir()
    ref = RefProc("deploy.bench.faust_noop",
                  ["--bootstrap", bootstrap, "--app-id", app_id, "--partitions", str(partitions),
                   "--progress", str(d / "progress"), "--datadir", str(d / "data"), *topic_names],
                  d / "log", d / "progress")
    try:
        row = ref.drain(total, timeout_s, "the no-op Faust agent")
    finally:
        ref.stop()
    return {"case": FAUST_CASE, "kind": "reference", "app_id": app_id, **row}


def quix_stateful(bootstrap: str, topics: Any, total: int, impressions: int, tmp: Path,
                  timeout_s: float, app_ids: list[str] | None = None) -> dict[str, Any]:
    """The Quix Streams row; without quixstreams a row with ``skipped`` (and no rate). Its consumer group is
    appended to ``app_ids`` (Quix names its changelog topics after it)."""
    if not quix_available():
        return {"case": QUIX_CASE, "kind": "reference", "events": total, "events_per_s": None,
                "skipped": "quixstreams is not installed (pip install 'zenith-live[bench]' or quixstreams)"}
    run = uuid.uuid4().hex[:8]
    group = f"bench-quix-{run}"
    if app_ids is not None:
        app_ids.append(group)
    d = tmp / f"quix-{run}"
    d.mkdir()
    ref = RefProc("deploy.bench.quix_app",
                  ["--bootstrap", bootstrap, "--group", group, "--state-dir", str(d / "state"),
                   "--progress", str(d / "progress"), "--impression", topics.impression,
                   "--engagement", topics.engagement, "--live", topics.live, "--out", f"{topics.prefix}quix.out"],
                  d / "log", d / "progress")
    try:
        row = ref.drain(total, timeout_s, "the Quix Streams app")
    finally:
        ref.stop()
    return {"case": QUIX_CASE, "kind": "reference", "group": group, "impressions": impressions,
            "samples_per_s": impressions / row["wall_s"], **row}
