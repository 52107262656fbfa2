"""The scoring worker's typed configuration (read from ``deploy.config.Settings``, overridden by the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.serving import ForwardKind
from state.store import StateConfig


@dataclass(frozen=True)
class ScorerConfig:
    registry_dir: Path
    redis_url: str
    host: str = "127.0.0.1"
    port: int = 8080
    max_candidates: int = 1000
    max_body_bytes: int = 1 << 20  # 1000 candidates with long ids are ~100 KB; 1 MiB leaves room
    poll_s: float = 0.5  # registry poll interval (the published -> served delay is at most this + load time)
    device: str = "cpu"
    torch_threads: int | None = None  # None: torch's default
    health_ping_s: float = 1.0  # /healthz pings the state store at most this often (and waits this long)
    # Requests scored at once: each forward runs on its own thread (torch releases the GIL inside its
    # kernels), so two concurrent requests use two cores instead of queueing behind one.
    infer_threads: int = 2
    forward: ForwardKind = ForwardKind.TORCHSCRIPT  # model/serving.py: what it is, what it costs
    item_refresh_s: float = 0.5  # the shared room/author snapshot is re-read this often (bound: <= 1 s)
    seq_len: int = 20  # the feature spec's sequence length (must match what the model was trained with)
    workers: int = 1  # scorer processes sharing the port (SO_REUSEPORT); 1: this process serves, nothing spawned
    state: StateConfig = field(default_factory=StateConfig)

    @staticmethod
    def from_settings(settings: Any, redis_url: str, **overrides: Any) -> ScorerConfig:
        """From ``deploy.config.Settings`` (``ZENITH_SCORER_*``), with explicit ``overrides`` winning."""
        base = dict(registry_dir=settings.registry, redis_url=redis_url, host=settings.scorer_host,
                    port=settings.scorer_port, max_candidates=settings.scorer_max_candidates,
                    max_body_bytes=settings.scorer_max_body_bytes, poll_s=settings.scorer_poll_s,
                    torch_threads=settings.scorer_threads, item_refresh_s=settings.scorer_item_refresh_s,
                    forward=_forward_kind(settings.scorer_forward), infer_threads=settings.scorer_infer_threads,
                    workers=settings.scorer_workers, state=settings.state_config())
        base.update({k: v for k, v in overrides.items() if v is not None})
        return ScorerConfig(**base)

    def __post_init__(self) -> None:
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.infer_threads < 1:
            raise ValueError(f"infer_threads must be >= 1, got {self.infer_threads}")
        if not 0 < self.item_refresh_s < 1.0:
            raise ValueError(f"item_refresh_s must be in (0, 1): the staleness bound is 1 s; got {self.item_refresh_s}")
        if self.poll_s <= 0 or self.health_ping_s <= 0:
            raise ValueError(f"poll_s and health_ping_s must be positive, got {self.poll_s}, {self.health_ping_s}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1 (scorer processes sharing the port), got {self.workers}")
        if self.workers > 1 and self.port == 0:
            raise ValueError("workers > 1 needs a fixed port: with port 0 each worker would get a different one")


def _forward_kind(value: str) -> ForwardKind:
    try:
        return ForwardKind(value)
    except ValueError:
        raise ValueError(f"ZENITH_SCORER_FORWARD={value!r}: use one of {[k.value for k in ForwardKind]}") from None
