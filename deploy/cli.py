"""The ``zenith`` command: one front door for every process.

Each area registers its own subcommands (``register(app)``) so this file stays a table of contents.
Heavy imports (torch, faust) happen inside the commands, so ``zenith --help`` is instant.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(help="Zenith Live: streaming online-learning ranker for live rooms.", no_args_is_help=True)
bench = typer.Typer(help="Benchmarks: print a table, write --json, compare against an in-run baseline.",
                    no_args_is_help=True)
app.add_typer(bench, name="bench")

# (module, target) pairs; a module registers its commands on the target app.
_COMMANDS: list[tuple[str, typer.Typer]] = [
    ("deploy.commands.infra", app),
    ("deploy.commands.workload", app),
    ("deploy.commands.stream_worker", app),
    ("deploy.commands.training", app),
    ("deploy.commands.up", app),
    ("deploy.commands.serving", app),
    ("deploy.commands.drill", app),
    ("deploy.bench.quality", bench),
    ("deploy.bench.model_speed", bench),
    ("deploy.bench.stream", bench),
    ("deploy.bench.serve", bench),
    ("deploy.bench.freshness", bench),
]

for _module, _target in _COMMANDS:
    try:
        importlib.import_module(_module).register(_target)
    except ModuleNotFoundError as exc:  # an area not built yet must not break the others
        if exc.name != _module:
            raise


def main() -> None:
    app()


if __name__ == "__main__":
    main()
