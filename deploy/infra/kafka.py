"""A real single-node Apache Kafka 4.x broker (KRaft), run from jars that Maven resolves.

Why jars and not a container: the development machines and CI have no Docker engine. The broker's jars
come from Maven Central through ``deploy/maven/pom.xml`` into a per-user cache
(``${ZENITH_CACHE:-~/.cache/zenith}/kafka-<version>/libs``) so every clone on a machine shares one download.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from deploy.infra.process import (
    LOOPBACK,
    InfraError,
    pid_matches,
    require_free_port,
    spawn,
    tail,
    tcp_answers,
    terminate,
)

KAFKA_VERSION = "4.1.1"
SCALA_BINARY = "2.13"
MIN_JAVA = 17  # Kafka 4 brokers need Java 17+
POM = Path(__file__).resolve().parent.parent / "maven" / "pom.xml"


def cache_root() -> Path:
    return Path(os.environ.get("ZENITH_CACHE") or "~/.cache/zenith").expanduser()


def libs_dir(version: str = KAFKA_VERSION) -> Path:
    """Where the broker's jars live: ``$ZENITH_KAFKA_LIBS`` if set (e.g. a Kafka tarball's libs/), else the
    Maven-filled cache."""
    override = os.environ.get("ZENITH_KAFKA_LIBS")
    if override:
        return Path(override).expanduser()
    return cache_root() / f"kafka-{version}" / "libs"


def _kafka_jar(libs: Path, version: str) -> Path:
    return libs / f"kafka_{SCALA_BINARY}-{version}.jar"


def fetch_jars(version: str = KAFKA_VERSION, *, force: bool = False) -> Path:
    """Resolve the broker's jars (idempotent; a finished download is marked and reused). Returns libs/."""
    libs = libs_dir(version)
    if os.environ.get("ZENITH_KAFKA_LIBS"):
        if not any(libs.glob(f"kafka_{SCALA_BINARY}-*.jar")):
            raise InfraError(f"ZENITH_KAFKA_LIBS={libs} holds no kafka_{SCALA_BINARY}-*.jar; unset it to let "
                             "`zenith infra fetch` resolve the jars with Maven.")
        return libs
    done = libs.parent / ".complete"
    if done.exists() and _kafka_jar(libs, version).exists() and not force:
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError(
            "Maven (`mvn`) is not on PATH: it downloads the Kafka broker's jars from Maven Central. "
            "Install it (`apt-get install -y maven`, or run `make setup`), or point ZENITH_KAFKA_LIBS at the "
            "libs/ folder of an Apache Kafka 4.x distribution."
        )
    if not POM.exists():
        raise InfraError(f"{POM} is missing: the package was installed without its data files.")
    libs.parent.mkdir(parents=True, exist_ok=True)
    # A lock, and a temp dir renamed into place: two clones fetching at once neither clash nor leave a
    # half-filled libs/ that a later run would trust.
    with open(libs.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists() and _kafka_jar(libs, version).exists() and not force:
            return libs
        tmp = libs.parent / f"libs.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(POM), f"-Dkafka.version={version}",
               "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not _kafka_jar(tmp, version).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            out = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
            raise InfraError(f"Maven could not resolve org.apache.kafka:kafka_{SCALA_BINARY}:{version} "
                             f"(exit {proc.returncode}). Is Maven Central reachable?\n{out}")
        shutil.rmtree(libs, ignore_errors=True)
        done.unlink(missing_ok=True)
        tmp.rename(libs)
        done.write_text(f"{version}\n")
    return libs


@functools.lru_cache(maxsize=1)
def java_executable() -> str:
    """Path of a ``java`` that can run a Kafka 4 broker, or a clear error."""
    java = shutil.which("java")
    if java is None:
        raise InfraError(
            "Java (`java`) is not on PATH: the Kafka broker is a JVM program and needs Java "
            f"{MIN_JAVA} or newer. Install it (`apt-get install -y openjdk-17-jre-headless`, or run "
            "`make setup`)."
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if m:
        major = int(m.group(1)) if m.group(1) != "1" else int(m.group(2) or 0)  # "1.8" means 8
        if major < MIN_JAVA:
            raise InfraError(f"{java} is Java {major}; Kafka 4 needs Java {MIN_JAVA} or newer.")
    return java


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64 without padding, as Kafka's Uuid prints it."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # Kafka avoids these too: they read as a CLI flag
            return cid


def _quiet_logger() -> logging.Logger:
    # librdkafka reports every refused connection while a broker boots; probes must not spam the console.
    log = logging.getLogger("zenith.infra.kafka.probe")
    if not log.handlers:
        log.addHandler(logging.NullHandler())
        log.propagate = False
    return log


def broker_answers(bootstrap: str, timeout: float = 2.0, client_config: dict | None = None) -> bool:
    """True when a Kafka broker at ``bootstrap`` returns metadata listing at least one broker.
    ``client_config``: extra librdkafka properties (security) for brokers that demand them."""
    from confluent_kafka.admin import AdminClient  # heavy import; keep `zenith --help` fast

    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if not tcp_answers(host or LOOPBACK, int(port)):
        return False
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": int(timeout * 1000),
                         **(client_config or {}), "logger": _quiet_logger()})
    try:
        md = admin.list_topics(timeout=timeout)
    except Exception:  # KafkaException while the broker is still fenced or electing
        return False
    return len(md.brokers) > 0


@dataclass
class LocalKafka:
    """One combined broker+controller KRaft node on loopback, its data and logs under ``data_dir``.

    ``start()`` then ``wait_ready()``; ``stop()`` ends it. A stack manager that keeps servers across CLI
    calls passes the recorded ``pid`` to adopt a running broker.
    """

    port: int
    controller_port: int
    data_dir: Path
    version: str = KAFKA_VERSION
    heap: str = "512m"
    num_partitions: int = 4
    # SASL/PLAIN users (name -> password) for a client listener that requires authentication (tests of the
    # clients' security settings); None: PLAINTEXT. The first user is also the broker's own identity.
    sasl_plain_users: dict[str, str] | None = field(default=None, repr=False)
    pid: int | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()

    # -- paths ---------------------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def server_properties(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log4j_config(self) -> Path:
        return self.data_dir / "log4j2.properties"

    @property
    def kraft_dir(self) -> Path:
        return self.data_dir / "kraft-data"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def console_log(self) -> Path:
        """JVM stdout/stderr: warnings and errors only, plus anything the JVM itself prints."""
        return self.logs_dir / "kafka.out"

    @property
    def server_log(self) -> Path:
        return self.logs_dir / "server.log"

    # -- config --------------------------------------------------------------------------------------
    def write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        # Static voters rather than `format --standalone`: a standalone format records the controller's
        # endpoint in the log, so a later start on another controller port could not find its quorum.
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{LOOPBACK}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{LOOPBACK}:{self.port},CONTROLLER://{LOOPBACK}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.kraft_dir),
            "metadata.log.dir": str(self.kraft_dir),
            "num.partitions": str(self.num_partitions),
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            # One node: every replication factor and ISR minimum is 1.
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Fewer internal partitions than the 50 default: created faster on first use, same semantics.
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.num.partitions": "8",
            # No 3 s wait for more members before the first rebalance: consumers start at once.
            "group.initial.rebalance.delay.ms": "0",
            # Modest thread counts: this shares a 2-core machine with the stream worker and trainer.
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "4",
        }
        if self.sasl_plain_users:
            listener = "SASL_PLAINTEXT"
            first, first_pw = next(iter(self.sasl_plain_users.items()))
            users = " ".join(f'user_{u}="{pw}"' for u, pw in self.sasl_plain_users.items())
            props |= {
                "listeners": f"{listener}://{LOOPBACK}:{self.port},CONTROLLER://{LOOPBACK}:{self.controller_port}",
                "advertised.listeners": f"{listener}://{LOOPBACK}:{self.port}",
                "listener.security.protocol.map": f"{listener}:{listener},CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name": listener,
                "sasl.enabled.mechanisms": "PLAIN",
                "sasl.mechanism.inter.broker.protocol": "PLAIN",
                "listener.name.sasl_plaintext.plain.sasl.jaas.config":
                    "org.apache.kafka.common.security.plain.PlainLoginModule required "
                    f'username="{first}" password="{first_pw}" {users};',
            }
        self.server_properties.write_text(
            "# Written by deploy/infra/kafka.py; regenerated on every start.\n"
            + "".join(f"{k}={v}\n" for k, v in props.items())
        )
        self.log4j_config.write_text(_LOG4J2.format(logs=self.logs_dir))

    def _formatted(self) -> bool:
        return (self.kraft_dir / "meta.properties").exists()

    def format_storage(self, libs: Path) -> None:
        """Format the KRaft log dir once; a formatted dir keeps its cluster id and data across restarts."""
        if self._formatted():
            return
        cmd = [java_executable(), "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
               f"-Dlog4j2.configurationFile={self.log4j_config}", "-cp", f"{libs}/*",
               "kafka.tools.StorageTool", "format", "-t", new_cluster_id(), "-c", str(self.server_properties)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise InfraError(f"Kafka storage format failed (exit {proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}".strip())

    def _jvm_argv(self, libs: Path) -> list[str]:
        return [
            java_executable(), f"-Xmx{self.heap}", f"-Xms{self.heap}",
            # Kafka's own launcher defaults (kafka-run-class.sh).
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_config}", f"-Dkafka.logs.dir={self.logs_dir}",
            "-cp", f"{libs}/*", "kafka.Kafka", str(self.server_properties),
        ]

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self, *, detach: bool = False) -> None:
        """Check prerequisites, write config, format storage if new, and launch the broker (no waiting)."""
        if self.is_running():
            return
        java_executable()
        require_free_port(self.port, "the Kafka broker", "--kafka-port")
        require_free_port(self.controller_port, "the Kafka controller", "--kafka-controller-port")
        libs = fetch_jars(self.version)
        self.write_config()
        self.format_storage(libs)
        self._proc = spawn(self._jvm_argv(libs), log_path=self.console_log, cwd=self.data_dir, detach=detach)
        self.pid = self._proc.pid

    def is_running(self) -> bool:
        if self.pid is None:
            return False
        if self._proc is not None:  # our own child: poll() is exact (no cmdline race right after fork)
            return self._proc.poll() is None
        return pid_matches(self.pid, "kafka.Kafka", str(self.server_properties))

    def healthy(self, timeout: float = 2.0) -> bool:
        return self.is_running() and broker_answers(self.bootstrap, timeout, self.client_config())

    def client_config(self) -> dict[str, str]:
        """librdkafka properties a client needs for this broker (SASL/PLAIN as the first user, if any)."""
        if not self.sasl_plain_users:
            return {}
        user, pw = next(iter(self.sasl_plain_users.items()))
        return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": user,
                "sasl.password": pw}

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the broker serves metadata; raise with the log tail if it died or took too long."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                code = self._proc.poll() if self._proc is not None else None
                raise InfraError(f"the Kafka broker exited during start-up (exit code {code}).\n"
                                 f"{tail(self.console_log)}\n{tail(self.server_log, 15)}")
            if broker_answers(self.bootstrap, timeout=2.0, client_config=self.client_config()):
                return
            if time.monotonic() >= deadline:
                raise InfraError(f"the Kafka broker at {self.bootstrap} did not answer within {timeout:.0f} s "
                                 f"(pid {self.pid} still runs).\n{tail(self.server_log, 20)}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a clean shutdown flushes logs), SIGKILL after ``timeout``; raises if it survives."""
        if self.pid is None:
            return
        if (self._proc is not None or self.is_running()) and not terminate(self.pid, timeout):
            raise InfraError(f"the Kafka broker (pid {self.pid}) did not exit even after SIGKILL")
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=1)
        self._proc = None
        self.pid = None


_LOG4J2 = """\
# Written by deploy/infra/kafka.py: INFO to {logs}/server.log, WARN and above to the console (kafka.out).
name = zenith-kafka
status = warn
# Kafka logs its own shutdown; log4j's hook would stop logging first and warn about it.
shutdownHook = disable
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
appender.out.filter.threshold.type = ThresholdFilter
appender.out.filter.threshold.level = WARN
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {logs}/server.log
appender.file.filePattern = {logs}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.request.additivity = false
logger.request.appenderRef.file.ref = FILE
"""


def create_topic(bootstrap: str, name: str, partitions: int = 4, *, config: dict[str, str] | None = None,
                 timeout: float = 30.0) -> None:
    """Create ``name`` (replication factor 1) and wait until every partition has a leader."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _quiet_logger()})
    future = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1,
                                           config=config or {})], request_timeout=timeout)[name]
    future.result(timeout=timeout)
    # CreateTopics returns once the controller accepted it; a producer right after could still see
    # "unknown partition" until the broker has loaded the leaders.
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(topic=name, timeout=timeout).topics.get(name)
        if md is not None and md.error is None and len(md.partitions) == partitions and all(
                p.leader >= 0 for p in md.partitions.values()):
            return
        if time.monotonic() > deadline:
            raise InfraError(f"topic {name} has no leader for every partition after {timeout:.0f} s")
        time.sleep(0.1)


def delete_topics(bootstrap: str, names: list[str], timeout: float = 30.0) -> None:
    from confluent_kafka.admin import AdminClient

    if not names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _quiet_logger()})
    for future in admin.delete_topics(names, request_timeout=timeout).values():
        with contextlib.suppress(Exception):  # already gone is fine
            future.result(timeout=timeout)
