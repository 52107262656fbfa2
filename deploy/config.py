"""All runtime configuration, read from the environment (and CLI flags) in this one place.

Environment: ``KAFKA_BOOTSTRAP_SERVERS``, ``REDIS_URL`` (explicit servers: use them, start nothing), and
``ZENITH_*`` for the rest (e.g. ``ZENITH_WINDOW_S=60``). Each process turns these settings into the typed
config of the package it runs (``StreamConfig``, ``TrainerConfig``, ``ScorerConfig``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from state.store import RedisAuth, StateConfig
from stream.config import StreamConfig
from stream.events import EventLimits
from stream.kafka_security import KafkaSecurity, SaslMechanism, SecurityProtocol
from stream.resilience import Backoff
from stream.topics import Topics


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZENITH_", extra="ignore")

    kafka_bootstrap_servers: str | None = Field(default=None, validation_alias="KAFKA_BOOTSTRAP_SERVERS")
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    home: Path = Path(".zenith")  # local stack data, logs, model registry
    topic_prefix: str = ""
    partitions: int = 4
    window_s: float = 120.0
    lateness_s: float = 5.0
    idle_advance_s: float = 5.0
    stream_batch_size: int = 2000  # messages a stream worker takes per consume()
    stream_session_timeout_s: float = 10.0  # a dead worker's partitions move to the others after this long
    dedup_horizon_s: float = 300.0  # an event id a user sent within this long is a producer's duplicate
    state_log_bucket_ms: int = 1000  # as-of reads leave out at most this much of the newest history
    state_prefix: str = "zl:"  # Redis key prefix of the live state (one Redis can hold several deployments)
    redis_cluster: bool | None = None  # REDIS_URL names a Redis Cluster node (None: ask the server)
    stream_metrics_port: int = 9101
    trainer_metrics_port: int = 9102
    metrics_host: str = "127.0.0.1"  # where the stream's and trainer's metrics listen; 0.0.0.0 in a container
    # Validation before anything touches state (stream/events.py EventLimits).
    max_future_skew_s: float = 300.0  # events further ahead of the wall clock are dead-lettered
    max_event_lag_s: float = 3600.0  # behind stream time (replays of old logs keep working); 0: off
    max_event_age_s: float = 0.0  # behind the wall clock, for live-only deployments; 0: off
    max_message_bytes: int = 64 * 1024
    retry_max_s: float = 5.0  # longest wait between retries while Redis or Kafka is down
    scorer_port: int = 8080
    scorer_host: str = "127.0.0.1"  # 0.0.0.0 in a container
    scorer_max_candidates: int = 1000  # more in one /v1/rank request -> 413
    scorer_max_body_bytes: int = 1 << 20  # larger request bodies -> 413
    scorer_poll_s: float = 0.5  # how often a scorer looks for a new (or pinned) model version
    scorer_threads: int | None = None  # torch CPU threads in a scorer (None: torch's default)
    scorer_infer_threads: int = 2  # requests a scorer process scores at once (each forward on its own thread)
    scorer_forward: str = "torchscript"  # how a scorer runs its model: torchscript | eager (model/serving.py)
    scorer_item_refresh_s: float = 0.5  # a scorer re-reads its shared room/author snapshot this often
    scorer_workers: int = 1  # scorer processes sharing the port (SO_REUSEPORT); 1: one process, as ever
    registry_dir: Path | None = None  # default: <home>/registry
    # Kafka security, passed to every client (confluent-kafka and Faust/aiokafka).
    kafka_security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    kafka_sasl_mechanism: SaslMechanism = SaslMechanism.SCRAM_SHA_512
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    # Redis AUTH/TLS; win over credentials in REDIS_URL.
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_tls: bool = False
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = None

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def registry(self) -> Path:
        return self.registry_dir or self.home / "registry"

    def kafka_security(self) -> KafkaSecurity:
        secret = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
        return KafkaSecurity(protocol=self.kafka_security_protocol, sasl_mechanism=self.kafka_sasl_mechanism,
                             sasl_username=self.kafka_sasl_username, sasl_password=secret,
                             ssl_cafile=self.kafka_ssl_cafile, ssl_certfile=self.kafka_ssl_certfile,
                             ssl_keyfile=self.kafka_ssl_keyfile)

    def redis_auth(self) -> RedisAuth:
        def path(p: Path | None) -> str | None:
            return str(p) if p else None

        return RedisAuth(username=self.redis_username,
                         password=self.redis_password.get_secret_value() if self.redis_password else None,
                         tls=self.redis_tls, tls_ca_file=path(self.redis_tls_ca_file),
                         tls_cert_file=path(self.redis_tls_cert_file), tls_key_file=path(self.redis_tls_key_file))

    def state_config(self) -> StateConfig:
        return StateConfig(prefix=self.state_prefix, auth=self.redis_auth(), log_bucket_ms=self.state_log_bucket_ms,
                           cluster=self.redis_cluster)

    def require_servers(self) -> tuple[str, str]:
        if not self.kafka_bootstrap_servers or not self.redis_url:
            raise SystemExit(
                "no Kafka/Redis given: set KAFKA_BOOTSTRAP_SERVERS and REDIS_URL, or run `zenith infra up` "
                "and export what it prints"
            )
        return self.kafka_bootstrap_servers, self.redis_url

    def stream_config(self) -> StreamConfig:
        bootstrap, redis_url = self.require_servers()
        return StreamConfig(
            bootstrap=bootstrap, redis_url=redis_url, topics=self.topics, partitions=self.partitions,
            window_ms=int(self.window_s * 1000), lateness_ms=int(self.lateness_s * 1000),
            idle_advance_s=self.idle_advance_s, metrics_port=self.stream_metrics_port, metrics_host=self.metrics_host,
            batch_size=self.stream_batch_size, session_timeout_s=self.stream_session_timeout_s,
            dedup_horizon_ms=int(self.dedup_horizon_s * 1000),
            state=self.state_config(), limits=self.event_limits(), backoff=Backoff(max_s=self.retry_max_s),
            kafka_security=self.kafka_security(),
        )

    def event_limits(self) -> EventLimits:
        return EventLimits(max_message_bytes=self.max_message_bytes,
                           max_future_skew_ms=int(self.max_future_skew_s * 1000),
                           max_lag_ms=int(self.max_event_lag_s * 1000), max_age_ms=int(self.max_event_age_s * 1000))
