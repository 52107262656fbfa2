"""Pick where a test session's Kafka and Redis come from: env vars, else Docker, else local processes.

Order (DESIGN.md, "Real components"): an explicit ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` wins; else
testcontainers when a Docker engine answers; else the local broker and redis-server on free ports.
Each context manager yields an address and always tears down what it started.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from deploy.infra.kafka import KAFKA_VERSION, broker_answers
from deploy.infra.process import InfraError, free_port
from deploy.infra.redis import redis_answers
from deploy.infra.stack import ENV_KAFKA, ENV_REDIS, ephemeral_kafka, ephemeral_redis

KAFKA_IMAGE = f"apache/kafka:{KAFKA_VERSION}"  # same broker version as the local jars and compose
REDIS_IMAGE = "redis:7"


@functools.lru_cache(maxsize=1)
def docker_engine_answers(timeout: float = 5.0) -> bool:
    """True when a Docker engine answers ``docker info`` quickly (a client alone is not enough)."""
    if os.environ.get("ZENITH_NO_DOCKER"):
        return False
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        proc = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return proc.returncode == 0


@contextlib.contextmanager
def provide_kafka(tmpdir: Path | str) -> Iterator[str]:
    """A Kafka bootstrap address for a test session (see module doc for the order)."""
    explicit = os.environ.get(ENV_KAFKA)
    if explicit:
        yield explicit
    elif docker_engine_answers():
        with _kafka_container() as bootstrap:
            yield bootstrap
    else:
        with ephemeral_kafka(tmpdir) as bootstrap:
            yield bootstrap


@contextlib.contextmanager
def provide_redis(tmpdir: Path | str) -> Iterator[str]:
    """A Redis URL for a test session (see module doc for the order)."""
    explicit = os.environ.get(ENV_REDIS)
    if explicit:
        yield explicit
    elif docker_engine_answers():
        with _redis_container() as url:
            yield url
    else:
        with ephemeral_redis(tmpdir) as url:
            yield url


@contextlib.contextmanager
def _kafka_container(timeout: float = 90.0) -> Iterator[str]:
    # testcontainers' KafkaContainer drives Confluent images; the apache/kafka image is configured through
    # KAFKA_* variables instead. The broker port is the same inside and outside the container so the
    # advertised listener is right without knowing the mapped port in advance.
    from testcontainers.core.container import DockerContainer

    port = free_port()
    container = DockerContainer(KAFKA_IMAGE).with_bind_ports(port, port)
    host = container.get_docker_client().host()
    env = {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://localhost:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{host}:{port}",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_NUM_PARTITIONS": "4",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "8",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "true",
        "KAFKA_HEAP_OPTS": "-Xmx512m -Xms512m",
    }
    for key, value in env.items():
        container.with_env(key, value)
    container.start()
    try:
        bootstrap = f"{host}:{port}"
        deadline = time.monotonic() + timeout
        while not broker_answers(bootstrap):
            if time.monotonic() > deadline:
                out, err = container.get_logs()
                raise InfraError(f"{KAFKA_IMAGE} did not answer at {bootstrap} within {timeout:.0f} s:\n"
                                 f"{(out + err).decode(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield bootstrap
    finally:
        container.stop()


@contextlib.contextmanager
def _redis_container(timeout: float = 30.0) -> Iterator[str]:
    from testcontainers.community.redis import RedisContainer

    container = RedisContainer(REDIS_IMAGE)
    container.start()  # waits for PING itself
    try:
        url = f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        deadline = time.monotonic() + timeout
        while not redis_answers(url):
            if time.monotonic() > deadline:
                raise InfraError(f"{REDIS_IMAGE} did not answer PING at {url} within {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        container.stop()
