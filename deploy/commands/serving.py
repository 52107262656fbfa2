"""``zenith serve`` (the scoring worker) and ``zenith model list | show | pin | unpin`` (the registry)."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

RegistryDir = Annotated[
    Path | None,
    typer.Option("--registry", help="Model registry directory (default: ZENITH_REGISTRY_DIR or <home>/registry)."),
]


def _registry(path: Path | None) -> Any:
    from deploy.config import Settings
    from model.registry import LocalDirRegistry

    root = path or Settings().registry
    if not root.is_dir():
        typer.echo(f"no model registry at {root}: start a trainer (it creates it) or pass --registry", err=True)
        raise typer.Exit(2)
    return LocalDirRegistry(root)


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%m-%d %H:%M:%S")


def _ago(ms: int) -> str:
    s = time.time() - ms / 1000
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min" if s < 7200 else f"{s / 3600:.1f}h"


def _verify(registry: Any, version: int, seq_len: int) -> str | None:
    """None if ``version`` loads exactly as a scorer would load it, else the reason it would be refused."""
    from model.registry import RegistryError, load_version
    from model.spec import default_live_spec

    try:
        load_version(registry, version, default_live_spec(seq_len=seq_len), "cpu")
    except RegistryError as exc:
        return str(exc)
    return None


def _log_swap(new: Any, old: Any) -> None:
    """The progress line of each swap (module-level: with --workers N each worker process runs it)."""
    from deploy.scorer.workers import worker_index

    m = new.manifest
    src = f"deltas on v{old.version}" if new.how == "delta" and old else \
        f"loaded from full v{m.base}" + ("" if m.base == m.version else " + deltas")
    index = worker_index()
    who = "" if index is None else f"worker {index}: "
    typer.echo(f"[{datetime.now():%H:%M:%S}] {who}serving v{new.version} ({src}, {1e3 * new.load_s:.0f} ms) · "
               f"published {_ago(m.created_ms)} ago · data watermark {_clock(m.watermark_ms)} "
               f"(age {_ago(m.watermark_ms)}) · {m.samples_trained:,} samples", err=True)


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        host: Annotated[str | None, typer.Option(help="Bind address (default: ZENITH_SCORER_HOST, 127.0.0.1).")] = None,
        port: Annotated[int | None, typer.Option(help="HTTP port (default: ZENITH_SCORER_PORT or 8080).")] = None,
        registry: RegistryDir = None,
        redis_url: Annotated[str | None, typer.Option(help="Redis with the live state (default: REDIS_URL, else "
                                                           "the local stack's).")] = None,
        max_candidates: Annotated[int | None, typer.Option(help="Most candidates per request (413 above).")] = None,
        poll_s: Annotated[float | None, typer.Option(help="Registry poll interval, seconds.")] = None,
        threads: Annotated[int | None, typer.Option(help="torch CPU threads (per worker; with --workers N the "
                                                        "default is cores / N).")] = None,
        workers: Annotated[int | None, typer.Option(
            "--workers", min=1,
            help="Scorer processes sharing the port via SO_REUSEPORT (default: ZENITH_SCORER_WORKERS or 1). "
                 "Each loads and hot-swaps models on its own; the kernel picks a worker per connection, so "
                 "/healthz, /v1/model and /metrics answer for that worker only (see the X-Zenith-Worker-Pid "
                 "header, \"worker\" in /v1/model, zenith_scorer_worker_info).")] = None,
        loglevel: Annotated[str, typer.Option(help="Python log level.")] = "info",
    ) -> None:
        """Run a scoring worker (or --workers N on one port): POST /v1/rank, GET /healthz, /v1/model, /metrics;
        hot-swaps model versions."""
        import logging

        from deploy.config import Settings
        from deploy.scorer import ScorerConfig, run_workers

        logging.basicConfig(level=loglevel.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        settings = Settings()
        url = redis_url or settings.redis_url
        if not url:
            from deploy.infra import ensure_running

            url = ensure_running(settings.home).redis_url
        config = ScorerConfig.from_settings(settings, url, host=host, port=port,
                                            registry_dir=registry, max_candidates=max_candidates, poll_s=poll_s,
                                            torch_threads=threads, workers=workers)

        def on_ready() -> None:
            group = "" if config.workers == 1 else f"  ({config.workers} workers on one port)"
            typer.echo(f"zenith scorer on http://{config.host}:{config.port}{group}  registry {config.registry_dir}  "
                       f"redis {url}  (polling every {config.poll_s}s; /healthz is 503 until a version loads)",
                       err=True)

        code = run_workers(config, on_swap=_log_swap, on_ready=on_ready)
        if code:
            raise typer.Exit(code)

    model = typer.Typer(help="Model versions: list, show, pin (serve an older one: rollback), unpin.",
                        no_args_is_help=True)
    app.add_typer(model, name="model")

    @model.command("list")
    def list_versions(
        registry: RegistryDir = None,
        limit: Annotated[int, typer.Option(help="Show the newest N.")] = 20,
        verify: Annotated[bool, typer.Option(help="Load each version as a scorer would (slower).")] = False,
        seq_len: Annotated[int, typer.Option(help="Feature spec sequence length, for --verify.")] = 20,
    ) -> None:
        """The registry's versions, newest first: kind, parent, times, samples, size, pinned/latest."""
        from rich.console import Console
        from rich.table import Table

        from model.registry import RegistryError

        reg = _registry(registry)
        versions = reg.list_versions()
        try:
            pinned = reg.pinned()
        except RegistryError as exc:
            typer.echo(str(exc), err=True)
            pinned = None
        table = Table(title=f"{reg.root}: {len(versions)} versions, latest {reg.latest()}, "
                            f"pinned {pinned if pinned is not None else '-'}")
        numeric = ("version", "parent", "samples", "rows", "size")
        for col in ("version", "kind", "parent", "created", "watermark", "samples", "rows", "size", "status"):
            table.add_column(col, justify="right" if col in numeric else "left")
        for v in reversed(versions[-limit:] if limit > 0 else versions):
            status = []
            if v == pinned:
                status.append("[bold yellow]PINNED[/]")
            if v == versions[-1]:
                status.append("latest")
            try:
                m = reg.read_manifest(v)
            except RegistryError as exc:
                table.add_row(str(v), "?", "", "", "", "", "", "", f"[red]{exc}[/]")
                continue
            if verify:
                reason = _verify(reg, v, seq_len)
                status.append("[green]ok[/]" if reason is None else f"[red]CORRUPT: {reason}[/]")
            table.add_row(str(v), m.kind.value, str(m.parent if m.parent is not None else "-"), _clock(m.created_ms),
                          _clock(m.watermark_ms), f"{m.samples_trained:,}", f"{m.extra.get('touched_rows', 'all')}",
                          f"{reg.size_bytes(v) / 1e6:.1f} MB", " ".join(status))
        Console(width=160).print(table)

    @model.command("show")
    def show(
        version: Annotated[int, typer.Argument(help="Version id.")],
        registry: RegistryDir = None,
        seq_len: Annotated[int, typer.Option(help="Feature spec sequence length used to verify.")] = 20,
    ) -> None:
        """A version's manifest, its delta chain, and whether a scorer would accept it (exit 1 if not)."""
        from model.registry import RegistryError

        reg = _registry(registry)
        try:
            m = reg.read_manifest(version)
            typer.echo(m.to_json())
            chain = reg.chain(version)
            typer.echo("chain: " + " -> ".join(f"v{c.version} ({c.kind.value})" for c in chain), err=True)
        except RegistryError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        reason = _verify(reg, version, seq_len)
        if reason is not None:
            typer.echo(f"CORRUPT: {reason}", err=True)
            raise typer.Exit(1)
        typer.echo(f"verified: checksums, shapes and spec fingerprint match ({m.config.arch.value} "
                   f"{m.config.size.value}); a scorer would serve it", err=True)

    @model.command("pin")
    def pin(
        version: Annotated[int, typer.Argument(help="Version scorers must serve instead of the latest.")],
        registry: RegistryDir = None,
        force: Annotated[bool, typer.Option(help="Pin without verifying the version first.")] = False,
        seq_len: Annotated[int, typer.Option(help="Feature spec sequence length used to verify.")] = 20,
    ) -> None:
        """Pin (roll back to) a version: every scorer switches to it within its poll interval."""
        from model.registry import RegistryError

        reg = _registry(registry)
        if not force:
            reason = _verify(reg, version, seq_len)
            if reason is not None:
                typer.echo(f"not pinned: {reason} (scorers would refuse it; --force pins anyway)", err=True)
                raise typer.Exit(1)
        try:
            reg.pin(version)
        except RegistryError as exc:
            typer.echo(f"not pinned: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"pinned v{version} (latest is v{reg.latest()}); scorers switch within their poll interval; "
                   f"`zenith model unpin` returns them to the latest", err=True)

    @model.command("unpin")
    def unpin(registry: RegistryDir = None) -> None:
        """Remove the pin: scorers go back to serving the latest version."""
        reg = _registry(registry)
        reg.unpin()
        typer.echo(f"unpinned; scorers serve the latest version (v{reg.latest()})", err=True)

