"""Session-wide real infrastructure for the tests: a Kafka broker and a Redis server.

Where they come from (logic in deploy/infra/provision.py): KAFKA_BOOTSTRAP_SERVERS / REDIS_URL if set,
else testcontainers when a Docker engine answers, else a local broker and redis-server on free ports.
Each is started only when a test asks for it, and torn down at the end of the session.
Tests that use these fixtures are marked ``integration`` (``-m "not integration"`` skips them).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

_INFRA_FIXTURES = {"kafka_bootstrap", "redis_url", "redis_client", "kafka_topic_factory", "redis_cluster_url"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs the real Kafka broker and Redis server")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _INFRA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a real Kafka 4.x broker (KRaft, auto-create on, 4 partitions by default)."""
    from deploy.infra.provision import provide_kafka

    with provide_kafka(tmp_path_factory.mktemp("kafka")) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://host:port/0`` of a real Redis server."""
    from deploy.infra.provision import provide_redis

    with provide_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://127.0.0.1:PORT/0`` of one node of a real Redis Cluster (three masters, no replicas, all
    16384 slots assigned); ``redis.cluster.RedisCluster.from_url`` discovers the other nodes from it.

    ZENITH_TEST_REDIS_CLUSTER_URL set: that cluster is used and nothing is started (tests write keys there).
    Else three cluster-mode redis-servers on free loopback ports, formed with ``redis-cli --cluster create``
    (see ``deploy.infra.redis.LocalRedisCluster``) and stopped at the end of the session.
    """
    explicit = os.environ.get("ZENITH_TEST_REDIS_CLUSTER_URL")
    if explicit:
        yield explicit
        return
    from deploy.infra import ephemeral_redis_cluster

    with ephemeral_redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as url:
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[object]:
    """A ``redis.Redis`` (bytes responses) on an emptied database: FLUSHDB before each test.

    With REDIS_URL set this flushes that database, so point REDIS_URL at a Redis meant for tests.
    """
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def kafka_topic_factory(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """``make(prefix="test", partitions=4, config=None) -> name``: a new, uniquely named topic with leaders
    ready; the topics are deleted after the test."""
    from deploy.infra import create_topic, delete_topics

    created: list[str] = []

    def make(prefix: str = "test", partitions: int = 4, config: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        create_topic(kafka_bootstrap, name, partitions, config=config)
        created.append(name)
        return name

    yield make
    delete_topics(kafka_bootstrap, created)
