"""The real local infrastructure: broker and Redis round trips, and `zenith infra up/status/down`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy.infra import (
    ENV_HOME,
    ENV_KAFKA,
    ENV_REDIS,
    InfraError,
    LocalKafka,
    LocalRedis,
    LocalStack,
    broker_answers,
    ephemeral_redis,
    fetch_jars,
    free_ports,
    port_is_free,
    redis_answers,
)
from deploy.infra.kafka import java_executable
from deploy.infra.process import pid_alive

pytestmark = pytest.mark.integration


# -- through the session fixtures ----------------------------------------------------------------------
def test_kafka_produce_consume_round_trip(kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]) -> None:
    from confluent_kafka import Consumer, Producer

    topic = kafka_topic_factory("roundtrip", partitions=3)
    errors: list[str] = []
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5})
    sent = [(f"user-{i % 7}".encode(), json.dumps({"seq": i}).encode()) for i in range(300)]
    for key, value in sent:
        producer.produce(topic, value=value, key=key,
                         on_delivery=lambda err, _msg: errors.append(str(err)) if err else None)
    assert producer.flush(30) == 0
    assert errors == []

    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"g-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    got: list[tuple[bytes, bytes, int]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while len(got) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append((msg.key(), msg.value(), msg.partition()))
    finally:
        consumer.close()

    assert sorted((k, v) for k, v, _ in got) == sorted(sent)
    # Keyed records: one partition per key, and per-key order kept (what the stream's user-keying relies on).
    partitions_per_key: dict[bytes, set[int]] = {}
    seq_per_key: dict[bytes, list[int]] = {}
    for key, value, partition in got:
        partitions_per_key.setdefault(key, set()).add(partition)
        seq_per_key.setdefault(key, []).append(json.loads(value)["seq"])
    assert all(len(p) == 1 for p in partitions_per_key.values())
    assert all(seqs == sorted(seqs) for seqs in seq_per_key.values())
    assert len({p for ps in partitions_per_key.values() for p in ps}) > 1  # spread over partitions


def test_kafka_auto_creates_topics_with_default_partitions(kafka_bootstrap: str) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient

    topic = f"auto-{uuid.uuid4().hex[:12]}"
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, b"x")
    assert producer.flush(30) == 0
    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(topic=topic, timeout=10)
    assert len(md.topics[topic].partitions) == 4


def test_redis_round_trip(redis_client) -> None:  # noqa: ANN001 (redis.Redis)
    r = redis_client
    assert r.ping()
    r.set("k", "v")
    assert r.get("k") == b"v"
    r.hset("user:1", mapping={"watch_s": 12, "likes": 3})
    assert r.hgetall("user:1") == {b"watch_s": b"12", b"likes": b"3"}
    with r.pipeline(transaction=True) as pipe:
        pipe.incr("n").incr("n").lpush("hist", "a", "b")
        assert pipe.execute() == [1, 2, 2]
    assert r.lrange("hist", 0, -1) == [b"b", b"a"]
    assert r.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1, "n", 40) == 42


def test_redis_client_starts_empty(redis_client) -> None:  # noqa: ANN001
    assert redis_client.dbsize() == 0


# -- `zenith infra` through the real CLI --------------------------------------------------------------
def _zenith(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("zenith")
    cmd = [exe, *args] if exe else [sys.executable, "-c", "from deploy.cli import main; main()", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: its own ZENITH_HOME and no KAFKA_BOOTSTRAP_SERVERS / REDIS_URL."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_KAFKA, ENV_REDIS)}
    env[ENV_HOME] = str(tmp_path / "home")
    env["COLUMNS"] = "200"  # rich wraps the status table to the terminal width
    return env


def test_cli_up_status_down(cli_env: dict[str, str]) -> None:
    home = Path(cli_env[ENV_HOME])
    kport, cport, rport = free_ports(3)
    pids: dict[str, int] = {}
    try:
        up = _zenith("infra", "up", "--kafka-port", str(kport), "--kafka-controller-port", str(cport),
                     "--redis-port", str(rport), env=cli_env)
        assert up.returncode == 0, up.stderr
        assert f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{kport}" in up.stdout
        assert f"REDIS_URL=redis://127.0.0.1:{rport}/0" in up.stdout

        pids = LocalStack(home).recorded_pids()
        assert set(pids) == {"kafka", "redis"}
        assert all(pid_alive(pid) for pid in pids.values())  # outlived the CLI process
        assert broker_answers(f"127.0.0.1:{kport}")
        assert redis_answers(f"redis://127.0.0.1:{rport}/0")
        assert (home / "kafka" / "logs" / "server.log").exists()

        again = _zenith("infra", "up", env=cli_env)  # idempotent: adopts, starts nothing new
        assert again.returncode == 0, again.stderr
        assert LocalStack(home).recorded_pids() == pids

        status = _zenith("infra", "status", env=cli_env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert str(kport) in status.stdout and str(rport) in status.stdout
        assert str(pids["kafka"]) in status.stdout
    finally:
        down = _zenith("infra", "down", env=cli_env)
    assert down.returncode == 0, down.stderr
    assert pids and not any(pid_alive(pid) for pid in pids.values())
    assert port_is_free(kport) and port_is_free(cport) and port_is_free(rport)
    assert LocalStack(home).recorded_pids() == {}
    stopped = _zenith("infra", "status", env=cli_env)
    assert stopped.returncode == 1 and "stopped" in stopped.stdout


def test_cli_up_fails_clearly_when_port_taken(cli_env: dict[str, str]) -> None:
    home = Path(cli_env[ENV_HOME])
    (rport,) = free_ports(1)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        result = _zenith("infra", "up", "--kafka-port", str(taken), "--redis-port", str(rport), env=cli_env)
    assert result.returncode == 2
    assert f"port {taken}" in result.stderr and "already taken" in result.stderr
    assert "--kafka-port" in result.stderr
    # redis-server, started first, was stopped again: a failed `up` leaves nothing running.
    assert LocalStack(home).recorded_pids() == {}
    assert port_is_free(rport)


def test_cli_up_uses_env_servers_and_starts_nothing(cli_env: dict[str, str], kafka_bootstrap: str,
                                                   redis_url: str) -> None:
    env = {**cli_env, ENV_KAFKA: kafka_bootstrap, ENV_REDIS: redis_url}
    up = _zenith("infra", "up", env=env)
    assert up.returncode == 0, up.stderr
    assert f"using KAFKA_BOOTSTRAP_SERVERS={kafka_bootstrap}" in up.stderr
    assert f"using REDIS_URL={redis_url}" in up.stderr
    assert up.stdout.split() == [f"{ENV_KAFKA}={kafka_bootstrap}", f"{ENV_REDIS}={redis_url}"]
    assert LocalStack(cli_env[ENV_HOME]).recorded_pids() == {}
    status = _zenith("infra", "status", env=env)
    assert status.returncode == 0, status.stdout
    assert "env" in status.stdout


# -- clear errors from the Python API ------------------------------------------------------------------
def test_redis_port_taken_is_named(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(InfraError, match=rf"port {port} .*already taken.*--redis-port"):
            LocalRedis(port=port, data_dir=tmp_path).start()


def test_missing_tools_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.setenv("ZENITH_CACHE", str(tmp_path / "cache"))  # nothing cached: Maven would be needed
    monkeypatch.delenv("ZENITH_KAFKA_LIBS", raising=False)
    java_executable.cache_clear()
    try:
        kport, cport = free_ports(2)
        with pytest.raises(InfraError, match=r"Java \(`java`\) is not on PATH"):
            LocalKafka(port=kport, controller_port=cport, data_dir=tmp_path / "k").start()
        with pytest.raises(InfraError, match=r"Maven \(`mvn`\) is not on PATH"):
            fetch_jars()
        with pytest.raises(InfraError, match=r"`redis-server` is not on PATH.*make setup"):
            LocalRedis(port=free_ports(1)[0], data_dir=tmp_path / "r").start()
    finally:
        java_executable.cache_clear()


def test_broker_that_dies_at_start_shows_its_log(tmp_path: Path) -> None:
    kport, cport = free_ports(2)
    kafka = LocalKafka(port=kport, controller_port=cport, data_dir=tmp_path, heap="1k")  # JVM refuses
    try:
        kafka.start()
        with pytest.raises(InfraError, match=r"(?s)exited during start-up.*kafka\.out"):
            kafka.wait_ready(30)
    finally:
        kafka.stop()


def test_ephemeral_redis_is_torn_down(tmp_path: Path) -> None:
    with ephemeral_redis(tmp_path) as url:
        assert redis_answers(url)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert not redis_answers(url)
    assert port_is_free(port)


def test_cli_up_fails_when_the_servers_named_by_the_environment_do_not_answer(cli_env: dict[str, str]) -> None:
    env = {**cli_env, ENV_KAFKA: "127.0.0.1:1", ENV_REDIS: "redis://127.0.0.1:1/0"}
    run = _zenith("infra", "up", "--timeout", "5", env=env, timeout=60)
    assert run.returncode != 0, run.stdout
    assert "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1 does not answer" in run.stderr
    assert "KAFKA_BOOTSTRAP_SERVERS=" not in run.stdout  # nothing to export
