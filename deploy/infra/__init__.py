"""Real local infrastructure: a single-node Kafka 4.x broker (KRaft, from Maven-resolved jars) and a
redis-server, started and stopped by the project itself.

Public API (import from here):

- ``ensure_running(state_dir=None) -> Endpoints``: the main job's stack (env vars, else reuse, else start).
- ``ephemeral_stack(tmpdir) -> ContextManager[Endpoints]``, ``ephemeral_redis(tmpdir) -> ContextManager[str]``,
  ``ephemeral_kafka(tmpdir) -> ContextManager[str]``, ``ephemeral_redis_cluster(tmpdir) -> ContextManager[str]``
  (a three-master Redis Cluster; yields one node's URL): throwaway servers on free ports, always torn down.
- ``LocalStack(state_dir)``: ``up() / down() / status()`` behind ``zenith infra``.
- ``LocalKafka``, ``LocalRedis``: one server each; ``fetch_jars()`` resolves the broker's jars.
- ``LocalRedisCluster(ports, data_dir)``: cluster-mode redis-servers formed into one cluster
  (``start() / stop() / kill_node(i) / restart_node(i)``).
- ``create_topic(bootstrap, name, partitions)``, ``delete_topics(bootstrap, names)``: admin helpers.
- ``InfraError``: every failure here, with a message that says what is missing and what to do.

Heavy client imports (confluent_kafka, redis) happen inside functions, so importing this is cheap.
"""

from deploy.infra.kafka import (
    KAFKA_VERSION,
    LocalKafka,
    broker_answers,
    create_topic,
    delete_topics,
    fetch_jars,
    libs_dir,
)
from deploy.infra.process import InfraError, free_port, free_ports, port_is_free
from deploy.infra.redis import LocalRedis, LocalRedisCluster, ephemeral_redis_cluster, redis_answers
from deploy.infra.stack import (
    ENV_HOME,
    ENV_KAFKA,
    ENV_REDIS,
    ComponentStatus,
    Endpoints,
    LocalStack,
    default_state_dir,
    ensure_running,
    ephemeral_kafka,
    ephemeral_redis,
    ephemeral_stack,
)

__all__ = [
    "ENV_HOME", "ENV_KAFKA", "ENV_REDIS", "KAFKA_VERSION",
    "ComponentStatus", "Endpoints", "InfraError", "LocalKafka", "LocalRedis", "LocalRedisCluster", "LocalStack",
    "broker_answers", "create_topic", "default_state_dir", "delete_topics", "ensure_running",
    "ephemeral_kafka", "ephemeral_redis", "ephemeral_redis_cluster", "ephemeral_stack", "fetch_jars",
    "free_port", "free_ports", "libs_dir", "port_is_free", "redis_answers",
]
