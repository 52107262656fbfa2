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
    LocalRedisCluster,
    LocalStack,
    broker_answers,
    ephemeral_redis,
    ephemeral_redis_cluster,
    fetch_jars,
    free_ports,
    port_is_free,
    redis_answers,
)
from deploy.infra.kafka import java_executable
from deploy.infra.process import pid_alive
from deploy.infra.redis import cluster_info

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


# -- Redis Cluster -------------------------------------------------------------------------------------
_PAIR_LUA = "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); " \
            "return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}"


def test_redis_cluster_routes_by_slot(redis_cluster_url: str) -> None:
    import asyncio
    import hashlib

    import redis
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    rc = RedisCluster.from_url(redis_cluster_url)
    try:
        primaries = rc.get_primaries()
        assert len(primaries) == 3
        assert all(cluster_info(f"redis://{n.host}:{n.port}/0").get("cluster_state") == "ok" for n in primaries)

        # Keys spread over all masters, each stored on the master that owns its slot.
        run = uuid.uuid4().hex[:8]
        keys = [f"spread:{run}:{i}" for i in range(60)]
        for k in keys:
            rc.set(k, k)
        by_node: dict[str, list[str]] = {}
        for k in keys:
            by_node.setdefault(rc.get_node_from_key(k).name, []).append(k)
        assert len(by_node) == 3
        for node in primaries:
            direct = redis.Redis(host=node.host, port=node.port)
            try:
                assert all(direct.get(k) == k.encode() for k in by_node[node.name])
            finally:
                direct.close()
        assert rc.delete(*keys) == len(keys)  # redis-py splits a multi-slot DEL per slot

        # Keys in different slots in one command: the server answers CROSSSLOT (redis-py's own check, before
        # sending, raises RedisClusterException, which is not a RedisError).
        a, b = f"x:{run}:a", f"x:{run}:b"
        assert rc.keyslot(a) != rc.keyslot(b)
        with pytest.raises(redis.exceptions.ClusterCrossSlotError, match="same slot"):
            rc.execute_command("MSET", a, "1", b, "2", target_nodes=rc.get_node_from_key(a))
        with pytest.raises(redis.exceptions.ClusterCrossSlotError, match="same slot"):
            rc.execute_command("EVAL", _PAIR_LUA, 2, a, b, "1", target_nodes=rc.get_node_from_key(a))
        with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
            rc.mset({a: "1", b: "2"})
        with pytest.raises(redis.exceptions.CrossSlotTransactionError):
            tx = rc.pipeline(transaction=True)
            tx.set(a, "1")
            tx.set(b, "2")
            tx.execute()

        # A shared hash tag: one slot, so MULTI/EXEC and a two-key EVAL work.
        ka, kb = "{u:alice}:a", "{u:alice}:b"
        assert rc.keyslot(ka) == rc.keyslot(kb)
        rc.delete(ka, kb)
        tx = rc.pipeline(transaction=True)
        tx.set(ka, "1")
        tx.incr(kb)
        tx.get(ka)
        set_reply, incr_reply, get_reply = tx.execute()
        assert set_reply in (True, b"OK")  # redis-py 8.2's sync cluster MULTI hands back SET's raw b"OK"
        assert (incr_reply, get_reply) == (1, b"1")
        assert rc.eval(_PAIR_LUA, 2, ka, kb, "v") == [b"v", b"v"]
        rc.delete(ka, kb)
    finally:
        rc.close()

    async def async_pipeline_with_evalsha() -> None:
        arc = AsyncRedisCluster.from_url(redis_cluster_url)
        try:
            await arc.initialize()
            # SCRIPT LOAD goes to every primary by default in redis-py's cluster clients (one SHA back);
            # target_nodes=PRIMARIES says so explicitly.
            sha = await arc.execute_command("SCRIPT LOAD", _PAIR_LUA, target_nodes=AsyncRedisCluster.PRIMARIES)
            assert sha == await arc.script_load(_PAIR_LUA)
            for node in arc.get_primaries():
                assert await arc.execute_command("SCRIPT EXISTS", sha, target_nodes=node) == [True]

            tags = ["{u:alice}", "{u:bob}", "{u:carol}"]
            pipe = arc.pipeline()
            for i, tag in enumerate(tags):
                pipe.evalsha(sha, 2, f"{tag}:a", f"{tag}:b", str(i))
            for tag in tags:
                pipe.get(f"{tag}:b")
            assert await pipe.execute() == [[str(i).encode()] * 2 for i in range(3)] + [b"0", b"1", b"2"]

            async with arc.pipeline(transaction=True) as tx:  # MULTI/EXEC on one slot
                tx.evalsha(sha, 2, "{u:alice}:a", "{u:alice}:b", "t")
                tx.get("{u:alice}:a")
                assert await tx.execute() == [[b"t", b"t"], b"t"]

            unknown = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
            with pytest.raises(redis.exceptions.NoScriptError):
                await arc.evalsha(unknown, 2, "{u:alice}:a", "{u:alice}:b", "x")
            pipe = arc.pipeline()
            pipe.evalsha(unknown, 2, "{u:alice}:a", "{u:alice}:b", "x")
            with pytest.raises(redis.exceptions.NoScriptError):
                await pipe.execute()
            with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
                await arc.evalsha(sha, 2, "{u:alice}:a", "{u:bob}:a", "x")
            for tag in tags:
                await arc.delete(f"{tag}:a", f"{tag}:b")
        finally:
            await arc.aclose()

    asyncio.run(async_pipeline_with_evalsha())


def test_redis_cluster_master_killed_comes_back_with_its_slots(tmp_path: Path) -> None:
    import redis
    from redis.cluster import RedisCluster

    ports = free_ports(6)
    cluster = LocalRedisCluster(ports=ports[:3], bus_ports=ports[3:], data_dir=tmp_path)
    try:
        cluster.start()
        assert cluster.is_running()
        assert cluster.url == f"redis://127.0.0.1:{ports[0]}/0"
        assert cluster.node_urls == [f"redis://127.0.0.1:{p}/0" for p in ports[:3]]
        victim = redis.Redis.from_url(cluster.node_urls[1])
        node_id = victim.execute_command("CLUSTER MYID")
        slots_before = victim.execute_command("CLUSTER SLOTS")
        victim.close()

        rc = RedisCluster.from_url(cluster.url)
        keys = [f"k{i}" for i in range(30)]
        for k in keys:
            rc.set(k, k)
        assert any(rc.get_node_from_key(k).port == ports[1] for k in keys)
        rc.close()

        cluster.kill_node(1)
        assert not cluster.is_running()
        deadline = time.monotonic() + 15  # node timeout 2 s: the others mark it failed, slots uncovered
        while cluster_info(cluster.url).get("cluster_state") != "fail":
            assert time.monotonic() < deadline, cluster_info(cluster.url)
            time.sleep(0.1)

        cluster.restart_node(1)  # same port, same dir: nodes.conf and the AOF bring it back as it was
        assert cluster.is_running()
        victim = redis.Redis.from_url(cluster.node_urls[1])
        assert victim.execute_command("CLUSTER MYID") == node_id
        assert victim.execute_command("CLUSTER SLOTS") == slots_before
        victim.close()
        rc = RedisCluster.from_url(cluster.url)
        assert [rc.get(k) for k in keys] == [k.encode() for k in keys]
        rc.close()
    finally:
        cluster.stop()
    assert not cluster.is_running()
    assert all(port_is_free(p) for p in ports)


def test_ephemeral_redis_cluster_is_torn_down(tmp_path: Path) -> None:
    with ephemeral_redis_cluster(tmp_path) as url:
        assert cluster_info(url).get("cluster_state") == "ok"
        port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert not redis_answers(url)
    assert port_is_free(port)


def test_redis_cluster_missing_cli_or_failed_create_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = shutil.which("redis-server")
    assert server is not None
    only_server = tmp_path / "bin"
    only_server.mkdir()
    (only_server / "redis-server").symlink_to(server)
    monkeypatch.setenv("PATH", str(only_server))
    ports = free_ports(6)
    cluster = LocalRedisCluster(ports=ports[:3], bus_ports=ports[3:], data_dir=tmp_path / "a")
    with pytest.raises(InfraError, match=r"`redis-cli` is not on PATH.*make setup.*redis-tools"):
        cluster.start()
    assert not any(n.is_running() for n in cluster.nodes)  # nothing started

    failing_cli = only_server / "redis-cli"
    failing_cli.write_text("#!/bin/sh\necho '[ERR] Node is not empty (stub)'\nexit 1\n")
    failing_cli.chmod(0o755)
    cluster = LocalRedisCluster(ports=ports[:3], bus_ports=ports[3:], data_dir=tmp_path / "b")
    try:
        with pytest.raises(InfraError, match=r"(?s)cluster create` failed \(exit code 1\).*Node is not empty \(stub\)"):
            cluster.start(timeout=10)
    finally:
        cluster.stop()
    assert all(port_is_free(p) for p in ports[:3])
