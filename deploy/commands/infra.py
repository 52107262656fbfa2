"""``zenith infra up | down | status | fetch``: the local Kafka broker and redis-server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", envvar="ZENITH_HOME",
                 help="Where data, logs and stack.json live (default: $ZENITH_HOME or ./.zenith)."),
]


def register(app: typer.Typer) -> None:
    infra = typer.Typer(help="Local Kafka 4.x (KRaft) broker and redis-server: up, down, status, fetch.",
                        no_args_is_help=True)
    app.add_typer(infra, name="infra")

    @infra.command()
    def up(
        state_dir: StateDir = None,
        kafka_port: Annotated[int | None, typer.Option(help="Broker port (default: recorded, else 9092; "
                                                             "0: any free port).")] = None,
        kafka_controller_port: Annotated[int | None, typer.Option(help="KRaft controller port "
                                                                       "(default 9093).")] = None,
        redis_port: Annotated[int | None, typer.Option(help="Redis port (default: recorded, else 6379; "
                                                            "0: any free port).")] = None,
        kafka_heap: Annotated[str, typer.Option(help="Broker JVM heap (-Xmx).")] = "512m",
        timeout: Annotated[float, typer.Option(help="Seconds to wait for both to answer.")] = 90.0,
    ) -> None:
        """Start the broker and redis-server (detached; idempotent), and wait until both answer.

        stdout is only the two VAR=value lines (`export $(zenith infra up)` works); the rest goes to stderr.
        """
        from deploy.infra import InfraError, LocalStack
        from deploy.infra.stack import env_endpoints

        env_kafka, env_redis = env_endpoints()
        if env_kafka:
            typer.echo(f"kafka: using KAFKA_BOOTSTRAP_SERVERS={env_kafka} (starting no broker)", err=True)
        if env_redis:
            typer.echo(f"redis: using REDIS_URL={env_redis} (starting no redis-server)", err=True)
        stack = LocalStack(state_dir)
        t0 = time.monotonic()
        try:
            ep = stack.up(kafka_port=kafka_port, kafka_controller_port=kafka_controller_port,
                          redis_port=redis_port, kafka_heap=kafka_heap, timeout=timeout)
        except InfraError as exc:
            _fail(exc)
        # Servers named by the environment were not started here: "up" still means they answer.
        from deploy.infra import broker_answers, redis_answers

        if env_kafka and not broker_answers(env_kafka, timeout=min(timeout, 10.0)):
            _fail(InfraError(f"KAFKA_BOOTSTRAP_SERVERS={env_kafka} does not answer, and `zenith infra up` starts no "
                             "broker while it is set: start that broker, or unset the variable"))
        if env_redis and not redis_answers(env_redis, timeout=min(timeout, 5.0)):
            _fail(InfraError(f"REDIS_URL={env_redis} does not answer PING, and `zenith infra up` starts no "
                             "redis-server while it is set: start it, or unset the variable"))
        typer.echo(f"up in {time.monotonic() - t0:.1f} s (state: {stack.state_dir})", err=True)
        typer.echo(f"KAFKA_BOOTSTRAP_SERVERS={ep.kafka_bootstrap}")
        typer.echo(f"REDIS_URL={ep.redis_url}")

    @infra.command()
    def down(
        state_dir: StateDir = None,
        timeout: Annotated[float, typer.Option(help="Seconds to wait after SIGTERM before SIGKILL.")] = 30.0,
        purge: Annotated[bool, typer.Option(help="Also delete the Kafka and Redis data.")] = False,
    ) -> None:
        """Stop the broker and redis-server this state dir started (env-provided servers are left alone)."""
        from deploy.infra import InfraError, LocalStack

        try:
            stopped = LocalStack(state_dir).down(timeout=timeout, purge=purge)
        except InfraError as exc:
            _fail(exc)
        typer.echo("stopped: " + ", ".join(stopped) if stopped else "nothing was running")

    @infra.command()
    def status(state_dir: StateDir = None) -> None:
        """Show pids, addresses and health; exit 0 only when both answer."""
        from rich.console import Console
        from rich.table import Table

        from deploy.infra import InfraError, LocalStack

        stack = LocalStack(state_dir)
        try:
            rows = stack.status()
        except InfraError as exc:
            _fail(exc)
        table = Table(title=f"zenith infra ({stack.state_dir})")
        for col in ("component", "source", "address", "pid", "healthy", "logs / from"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(r.name, r.source, r.address, str(r.pid or "-"),
                          "[green]yes[/green]" if r.healthy else "[red]no[/red]", r.detail)
        Console().print(table)
        if not all(r.healthy for r in rows):
            raise typer.Exit(1)

    @infra.command()
    def fetch(force: Annotated[bool, typer.Option(help="Download again even if cached.")] = False) -> None:
        """Resolve the Kafka broker's jars from Maven Central into the cache (no server is started)."""
        from deploy.infra import KAFKA_VERSION, InfraError, fetch_jars

        t0 = time.monotonic()
        try:
            libs = fetch_jars(KAFKA_VERSION, force=force)
        except InfraError as exc:
            _fail(exc)
        jars = len(list(libs.glob("*.jar")))
        typer.echo(f"kafka {KAFKA_VERSION}: {jars} jars in {libs} ({time.monotonic() - t0:.1f} s)")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)
