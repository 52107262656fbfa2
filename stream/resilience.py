"""Retry a step of the stream until its dependency answers: no acknowledgement without effect.

A batch whose effects are not all done must not be acknowledged, and a loop that crashes on a Redis or Kafka
error would be restarted past it. ``Guard.run`` keeps the stream worker's batch loop on the failing step
until it succeeds: it retries with capped exponential backoff for as long as the dependency is down (the
loop consumes nothing further and commits nothing meanwhile, so consumption pauses), exposes the outage as
metrics (``zenith_stream_dependency_up``, ``..._outage_seconds_total``, ``..._retries_total``) and one log
line at its start and one at its end, then resumes where it stopped.

Every retried step is idempotent (state and join writes by input position, sends of the same record), so a
step that failed half way is simply done again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from stream import metrics

log = logging.getLogger("zenith.stream")

T = TypeVar("T")


class Dependency(enum.StrEnum):
    REDIS = "redis"
    KAFKA = "kafka"
    OTHER = "other"  # anything else: a bug or an unexpected error; retried all the same, never acked


def dependency_of(exc: BaseException) -> Dependency:
    """Which dependency an exception came from (by the library that raised it)."""
    module = type(exc).__module__ or ""
    if module.startswith("redis"):
        return Dependency.REDIS
    if module.startswith(("aiokafka", "kafka", "confluent_kafka", "faust.exceptions")):
        return Dependency.KAFKA
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return Dependency.REDIS if "redis" in str(exc).lower() else Dependency.KAFKA
    return Dependency.OTHER


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.1
    max_s: float = 5.0  # the bound: a dependency back up is noticed within this long
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s or self.factor < 1:
            raise ValueError(f"Backoff needs 0 < initial_s <= max_s and factor >= 1, got {self}")

    def delays(self) -> list[float]:
        out, d = [], self.initial_s
        while d < self.max_s:
            out.append(d)
            d *= self.factor
        return out


class Guard:
    """Runs steps until they succeed; ``pause``/``resume`` stop and restart fetching during an outage."""

    def __init__(self, backoff: Backoff, pause: Callable[[], None] | None = None,
                 resume: Callable[[], None] | None = None) -> None:
        self.backoff = backoff
        self._pause, self._resume = pause, resume
        self._down: dict[Dependency, float] = {}  # dependency -> wall time its outage began
        for dep in Dependency:
            metrics.DEPENDENCY_UP.labels(dep.value).set(1)

    @property
    def outage(self) -> bool:
        return bool(self._down)

    async def run(self, step: Callable[[], Awaitable[T]], what: str) -> T:
        delays = self.backoff.delays()
        attempt = 0
        while True:
            try:
                result = await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                dep = dependency_of(exc)
                metrics.DEPENDENCY_RETRIES.labels(dep.value).inc()
                self._begin(dep, what, exc)
                delay = delays[attempt] if attempt < len(delays) else self.backoff.max_s
                attempt += 1
                await asyncio.sleep(delay)
                continue
            if self._down:
                self._end()
            return result

    def _begin(self, dep: Dependency, what: str, exc: Exception) -> None:
        if dep in self._down:
            return
        first = not self._down
        self._down[dep] = time.time()
        metrics.DEPENDENCY_UP.labels(dep.value).set(0)
        metrics.OUTAGES.labels(dep.value).inc()
        log.error("%s unavailable while %s (%s: %s): consumption paused, nothing acknowledged; retrying every "
                  "<= %.1fs", dep.value, what, type(exc).__name__, exc, self.backoff.max_s,
                  exc_info=dep is Dependency.OTHER)
        if first and self._pause is not None:
            try:
                self._pause()
            except Exception:  # pausing is an optimisation; the blocked loop already holds the input
                log.exception("pausing the input partitions failed")

    def _end(self) -> None:
        now = time.time()
        for dep, since in self._down.items():
            metrics.DEPENDENCY_UP.labels(dep.value).set(1)
            metrics.OUTAGE_SECONDS.labels(dep.value).inc(now - since)
            log.warning("%s is back after %.1fs: resuming consumption where it stopped", dep.value, now - since)
        self._down.clear()
        if self._resume is not None:
            try:
                self._resume()
            except Exception:
                log.exception("resuming the input partitions failed")
