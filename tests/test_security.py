"""Security settings: typed in deploy/config.py, passed to every client; a redis-server with ``requirepass``
serves the stream worker and the scorer through them; metrics listen on loopback unless told otherwise."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from deploy.config import Settings
from deploy.infra import free_port
from deploy.infra.redis import LocalRedis
from state.store import AsOf, LiveState, RedisAuth
from stream.events import Impression
from stream.kafka_security import KafkaSecurity, SaslMechanism, SecurityProtocol
from stream.producer import EventProducer
from stream.simulator import SimConfig, Simulator
from stream.topics import Topics, ensure_topics

PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]


def test_settings_render_kafka_and_redis_security(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZENITH_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("ZENITH_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("ZENITH_KAFKA_SASL_USERNAME", "zenith")
    monkeypatch.setenv("ZENITH_KAFKA_SASL_PASSWORD", "pw1")
    monkeypatch.setenv("ZENITH_REDIS_PASSWORD", "pw2")
    monkeypatch.setenv("ZENITH_REDIS_TLS", "true")
    s = Settings()
    sec = s.kafka_security()
    assert sec.protocol is SecurityProtocol.SASL_SSL and sec.sasl_mechanism is SaslMechanism.SCRAM_SHA_256
    assert sec.confluent() == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256",
                               "sasl.username": "zenith", "sasl.password": "pw1"}
    assert "pw1" not in repr(sec) and "pw1" not in repr(s) and "pw2" not in repr(s)
    creds = sec.faust_credentials()
    assert creds.protocol.value == "SASL_SSL" and creds.username == "zenith"
    auth = s.redis_auth()
    assert auth.client_kwargs() == {"password": "pw2"} and auth.url("redis://h:1/0") == "rediss://h:1/0"
    assert s.stream_metrics_port and s.metrics_host == "127.0.0.1"  # loopback unless told otherwise


def test_inconsistent_security_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="needs a SASL username and password"):
        KafkaSecurity(protocol=SecurityProtocol.SASL_PLAINTEXT)
    with pytest.raises(ValueError, match="does not use TLS"):
        KafkaSecurity(ssl_cafile=Path("/ca.pem"))
    with pytest.raises(ValueError, match="TLS is off"):
        RedisAuth(tls_ca_file="/ca.pem")


def test_metrics_servers_bind_loopback_by_default(kafka_bootstrap: str, tmp_path: Path) -> None:
    """The stream worker's metrics port answers on 127.0.0.1 and not on the machine's other addresses."""
    import socket

    port = free_port()
    prefix = f"m{uuid.uuid4().hex[:8]}."
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "REDIS_URL": "redis://127.0.0.1:1/0",
           "ZENITH_TOPIC_PREFIX": prefix, "ZENITH_STREAM_METRICS_PORT": str(port)}
    worker = subprocess.Popen([sys.executable, "-m", "deploy.cli", "stream", "worker"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and worker.poll() is None, "metrics never came up"
                time.sleep(0.2)
        listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
        local = [line.split()[1] for line in listening if line.split()[3] == "0A"]  # LISTEN
        mine = [addr for addr in local if int(addr.split(":")[1], 16) == port]
        assert mine == ["0100007F:" + f"{port:04X}"], mine  # 127.0.0.1 only, not 0.0.0.0
    finally:
        worker.terminate()
        worker.wait(30)


@pytest.fixture
def protected_redis(tmp_path: Path):
    server = LocalRedis(free_port(), tmp_path / "redis", password=PASSWORD)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_the_stack_works_through_redis_requirepass(protected_redis: LocalRedis, kafka_bootstrap: str,
                                                     tmp_path: Path) -> None:
    from tests.test_stream_integration import consume

    url = protected_redis.url  # no password in the URL: it comes from ZENITH_REDIS_PASSWORD
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url).set("x", 1)  # the server does demand it

    prefix = f"s{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix)
    ensure_topics(kafka_bootstrap, topics)
    events = list(Simulator(SimConfig(n_users=40, n_authors=15, seed=8, start_ms=int(time.time() * 1000) - 60_000,
                                      requests_per_s=8, late_fraction=0.0, max_watch_s=10.0)
                            ).events(max_impressions=200))
    producer = EventProducer(kafka_bootstrap, topics)
    for ev in events:
        producer.send(ev)
    producer.flush()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "REDIS_URL": url, "ZENITH_TOPIC_PREFIX": prefix,
           "ZENITH_REDIS_PASSWORD": PASSWORD, "ZENITH_WINDOW_S": "3", "ZENITH_LATENESS_S": "1",
           "ZENITH_IDLE_ADVANCE_S": "2", "ZENITH_STREAM_METRICS_PORT": "0"}
    worker = subprocess.Popen([sys.executable, "-m", "deploy.cli", "stream", "worker"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        n = sum(isinstance(e, Impression) for e in events)
        got = consume(kafka_bootstrap, topics.samples, n, timeout_s=120)
        assert len(got) == n and worker.poll() is None
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=30)
    authed = redis.Redis.from_url(url, password=PASSWORD)
    first = next(e for e in events if isinstance(e, Impression))
    assert authed.hget(f"zl:{{u:{first.user_id}}}", "impressions"), err.decode()[-2000:]

    # The scorer's state client, configured the same way (Settings -> StateConfig -> RedisAuth).
    settings = Settings(redis_password=PASSWORD)

    async def read() -> int:
        state = LiveState.from_url(url, settings.state_config())
        try:
            first = next(e for e in events if isinstance(e, Impression))
            snaps = await state.read([AsOf(first.user_id, first.room_id, first.author_id, int(time.time() * 1000))])
            return int(snaps[0].user.get("impressions", 0))
        finally:
            await state.aclose()

    assert asyncio.run(read()) >= 1


def test_compose_keeps_credentials_in_an_env_file_and_publishes_little() -> None:
    import yaml

    root = Path(__file__).resolve().parents[1]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "ports" not in services["redis"], "Redis must not be published on the host"
    published = {name: svc.get("ports", []) for name, svc in services.items()}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every host interface"
    assert set(n for n, p in published.items() if p) == {"kafka", "scorer", "prometheus", "grafana"}
    grafana_pw = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert grafana_pw.startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert "${REDIS_PASSWORD:?" in services["redis"]["environment"]["REDIS_PASSWORD"]
    assert "requirepass" in " ".join(services["redis"]["command"])
    example = (root / "deploy" / "compose.env.example").read_text()
    assert "REDIS_PASSWORD=" in example and "GRAFANA_ADMIN_PASSWORD=" in example
    assert ".env" in (root / ".gitignore").read_text().split()


def test_the_stream_works_through_a_sasl_broker(tmp_path: Path, redis_url: str, redis_client) -> None:
    """A broker whose only client listener demands SASL/PLAIN: plaintext clients are refused, and the stream
    worker (Faust/aiokafka) and the confluent-kafka clients get through with the typed settings."""
    from confluent_kafka import Consumer

    from deploy.infra import LocalKafka, broker_answers, free_ports

    port, cport = free_ports(2)
    broker = LocalKafka(port=port, controller_port=cport, data_dir=tmp_path / "kafka",
                        sasl_plain_users={"admin": "admin-pw", "zenith": PASSWORD})
    broker.start()
    try:
        broker.wait_ready(90)
        assert not broker_answers(broker.bootstrap, timeout=3), "a plaintext client must not get metadata"
        security = KafkaSecurity(protocol=SecurityProtocol.SASL_PLAINTEXT, sasl_mechanism=SaslMechanism.PLAIN,
                                 sasl_username="zenith", sasl_password=PASSWORD)
        prefix = f"k{uuid.uuid4().hex[:8]}."
        topics = Topics(prefix)
        ensure_topics(broker.bootstrap, topics, security=security)
        events = list(Simulator(SimConfig(n_users=30, n_authors=10, seed=9, start_ms=int(time.time() * 1000) - 60_000,
                                          requests_per_s=8, late_fraction=0.0, max_watch_s=10.0)
                                ).events(max_impressions=100))
        producer = EventProducer(broker.bootstrap, topics, security)
        for ev in events:
            producer.send(ev)
        producer.flush()
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "REDIS_URL": redis_url,
               "ZENITH_TOPIC_PREFIX": prefix, "ZENITH_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
               "ZENITH_KAFKA_SASL_MECHANISM": "PLAIN", "ZENITH_KAFKA_SASL_USERNAME": "zenith",
               "ZENITH_KAFKA_SASL_PASSWORD": PASSWORD, "ZENITH_WINDOW_S": "3", "ZENITH_LATENESS_S": "1",
               "ZENITH_IDLE_ADVANCE_S": "2", "ZENITH_STREAM_METRICS_PORT": "0"}
        worker = subprocess.Popen([sys.executable, "-m", "deploy.cli", "stream", "worker"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        n = sum(isinstance(e, Impression) for e in events)
        c = Consumer({"bootstrap.servers": broker.bootstrap, **security.confluent(), "group.id": f"chk-{uuid.uuid4()}",
                      "auto.offset.reset": "earliest"})
        c.subscribe([topics.samples])
        got, deadline = 0, time.monotonic() + 120
        try:
            while got < n and time.monotonic() < deadline and worker.poll() is None:
                got += sum(1 for m in c.consume(500, timeout=0.5) if not m.error())
        finally:
            c.close()
            worker.terminate()
            _, err = worker.communicate(timeout=30)
        assert got == n, err.decode()[-3000:]
    finally:
        broker.stop()
