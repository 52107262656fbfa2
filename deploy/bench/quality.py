"""``zenith bench quality``: models x sizes on one time-ordered stream, test-then-train.

Every row sees the same samples in the same order and starts from the same seed. Per row: dense and
embedding parameters, forward FLOPs per sample (measured with FlopCounterMode), prequential AUC / UAUC /
logloss of the main task (overall and trailing window), training samples/s, and the average pairwise
cosine similarity between tokens after each layer (the Zenith paper's heterogeneity diagnostic; layer 0
is the tokenizer's output). ``--plot`` draws logloss against parameters and against FLOPs (the scaling
curves); ``--json`` writes every number, per task, with the learning curves.

Data: ``--source sim`` (default) and ``--data PATH.csv`` (KuaiRand) go through ``deploy.datasets``, which
turns the stream into samples with the stream's own feature code; ``--source synthetic`` uses the
in-process planted-signal generator (``model.synthetic``) and needs nothing else running.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

import typer

QUICK = dict(n=20_000, sizes="S,M,L", batch_size=256, window=5_000)
FULL = dict(n=60_000, sizes="S,M,L", batch_size=256, window=10_000)


def load_stream(source: str, n: int, seed: int):
    """(spec, SampleArrays, description) for ``source``: "sim", "synthetic" or a KuaiRand CSV path."""
    from model.spec import default_live_spec

    spec = default_live_spec()
    if source == "synthetic":
        from model.synthetic import make_synthetic

        return spec, make_synthetic(spec, n, seed=seed).arrays, "synthetic (model.synthetic, planted signal)"
    try:
        datasets = importlib.import_module("deploy.datasets")
    except ModuleNotFoundError as exc:
        if exc.name != "deploy.datasets":
            raise
        if source != "sim":
            raise typer.BadParameter("deploy.datasets is not available, so a CSV cannot be replayed yet; "
                                     "use --source synthetic") from exc
        typer.secho("deploy.datasets is not available yet: falling back to --source synthetic", fg="yellow",
                    err=True)
        return load_stream("synthetic", n, seed)
    spec = getattr(datasets, "spec_for", lambda _s: spec)(source)
    arrays = datasets.load_samples(source, n, seed)
    arrays.check(spec)
    return spec, arrays, f"{source} via deploy.datasets"


def run_quality(archs: list[str], sizes: list[str], source: str, n: int, seed: int, batch_size: int,
                window: int, device: str, progress: bool = True, seeds: int = 1) -> dict[str, Any]:
    """One row per (arch, size); with ``seeds > 1`` each row is the mean over model seeds ``seed..seed+k-1``
    (same data, same order) and carries the standard deviation, to tell a difference from seed noise."""
    import statistics

    import torch

    from model.batch import Batch
    from model.config import Arch, Size, preset
    from model.factory import build_model, count_params, flops_per_sample
    from model.learner import OnlineLearner
    from model.prequential import run_prequential

    spec, arrays, described = load_stream(source, n, seed)
    dev = torch.device(device)
    probe = Batch.from_arrays(arrays[-min(len(arrays), 2048):], dev)  # for the token diagnostic, after training
    rows: list[dict[str, Any]] = []
    metrics = ("auc", "uauc", "logloss", "window_auc", "window_uauc", "window_logloss")
    for arch in archs:
        for size in sizes:
            runs = []
            for s in range(seed, seed + seeds):
                cfg = preset(Arch(arch), Size(size), spec, seed=s)
                model = build_model(spec, cfg, dev)
                t0 = time.perf_counter()
                report = run_prequential(OnlineLearner(model, spec, cfg, dev), arrays, batch_size=batch_size,
                                         window=window)
                runs.append((cfg, model, report, time.perf_counter() - t0))
            cfg, model, report, _ = runs[0]
            params = count_params(model)
            per_seed = [{k: r.main()[k] for k in metrics} for _, _, r, _ in runs]
            row: dict[str, Any] = {
                "arch": arch, "size": size, "dense_params": params.dense, "embedding_params": params.sparse,
                "flops_per_sample": flops_per_sample(model, spec),
                **{k: statistics.fmean(p[k] for p in per_seed) for k in metrics},
                "samples_per_s": statistics.fmean(r.samples_per_s for _, _, r, _ in runs),
                "token_cosine": [statistics.fmean(v) for v in zip(*(m.token_similarity(probe) for _, m, _, _ in runs),
                                                                  strict=True)],
                "mean_aux_loss": report.mean_aux_loss, "seeds": seeds, "per_seed": per_seed,
                "tasks": report.tasks, "curve": report.curve, "config": cfg.to_dict(),
            }
            if seeds > 1:
                row.update({f"{k}_std": statistics.stdev(p[k] for p in per_seed) for k in ("auc", "uauc", "logloss")})
            rows.append(row)
            if progress:
                typer.echo(f"  {arch:<11} {size}  logloss {row['logloss']:.4f}  auc {row['auc']:.4f}  "
                           f"({sum(t for *_, t in runs):.0f}s)", err=True)
    return {
        "bench": "quality", "source": described, "samples": len(arrays), "seed": seed, "seeds": seeds,
        "batch_size": batch_size, "window": window, "device": str(dev), "main_task": spec.tasks[0].name,
        "positive_rate": float(arrays.labels[:, 0].mean()), "torch_threads": torch.get_num_threads(), "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    seeds = result.get("seeds", 1)
    seed_txt = f"seed {result['seed']}" if seeds == 1 else f"mean ± std over seeds {result['seed']}..+{seeds - 1}"
    t = Table(title=f"prequential quality, task '{result['main_task']}' on {result['source']}: "
                    f"{result['samples']} samples, batch {result['batch_size']}, window {result['window']}, "
                    f"{seed_txt}, {result['device']}")
    for col in ("model", "size", "dense params", "emb params", "FLOPs/sample", "AUC", "UAUC", "logloss",
                "win AUC", "win logloss", "samples/s", "token cos by layer (0=input)"):
        t.add_column(col, justify="left" if col in ("model", "size") or col.startswith("token") else "right")
    best = min(r["logloss"] for r in result["rows"])
    for r in result["rows"]:
        def pm(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.4f}" + (f"±{r[key + '_std']:.4f}" if key + "_std" in r else "")

        ll = pm("logloss")
        t.add_row(r["arch"], r["size"], _si(r["dense_params"]), _si(r["embedding_params"]),
                  _si(r["flops_per_sample"]), pm("auc"), pm("uauc"),
                  f"[bold]{ll}[/bold]" if r["logloss"] == best else ll, f"{r['window_auc']:.4f}",
                  f"{r['window_logloss']:.4f}", f"{r['samples_per_s']:.0f}",
                  " ".join(f"{c:.2f}" for c in r["token_cosine"]))
    Console(width=200).print(t)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    archs = list(dict.fromkeys(r["arch"] for r in result["rows"]))
    for arch in archs:
        rows = sorted((r for r in result["rows"] if r["arch"] == arch), key=lambda r: r["dense_params"])
        for ax, key in zip(axes, ("dense_params", "flops_per_sample"), strict=True):
            ax.errorbar([r[key] for r in rows], [r["logloss"] for r in rows], marker="o", label=arch, capsize=3,
                        yerr=[r.get("logloss_std", 0.0) for r in rows] if "logloss_std" in rows[0] else None)
            for r in rows:
                ax.annotate(r["size"], (r[key], r["logloss"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, label in zip(axes, ("dense parameters", "forward FLOPs per sample"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"prequential logloss ({result['main_task']})")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Scaling on {result['source']} ({result['samples']} samples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def register(bench: typer.Typer) -> None:
    @bench.command("quality")
    def quality(
        quick: bool = typer.Option(False, "--quick", help=f"small run for 2 CPU cores: {QUICK}"),
        source: str = typer.Option("sim", "--source", help="sim (live simulator) | synthetic (in-process)"),
        data: Path | None = typer.Option(None, "--data", help="KuaiRand CSV to replay instead of --source"),
        n: int | None = typer.Option(None, "--n", help="impressions in the stream (default 60k, quick 20k)"),
        models: str = typer.Option("dlrm,dcnv2,rankmixer,transformer,zenith,zenith++", "--models",
                                   help="comma-separated architectures"),
        sizes: str | None = typer.Option(None, "--sizes", help="comma-separated sizes among S,M,L"),
        batch_size: int | None = typer.Option(None, "--batch-size"),
        window: int | None = typer.Option(None, "--window", help="trailing window for windowed metrics"),
        seed: int = typer.Option(0, "--seed"),
        seeds: int = typer.Option(1, "--seeds", help="model seeds per row (mean ± std when > 1)"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        threads: int = typer.Option(2, "--threads", help="torch CPU threads"),
        json_path: Path | None = typer.Option(None, "--json", help="write all numbers here"),
        plot_path: Path | None = typer.Option(None, "--plot", help="write the scaling plot (PNG) here"),
    ) -> None:
        """Prequential quality of every model and size on one stream; the Zenith scaling comparison."""
        import torch

        from model.config import Arch

        torch.set_num_threads(threads)
        preset_ = QUICK if quick else FULL
        arch_list = [a.strip() for a in models.split(",") if a.strip()]
        size_list = [s.strip() for s in (sizes or str(preset_["sizes"])).split(",") if s.strip()]
        for a in arch_list:
            if a not in {x.value for x in Arch}:
                raise typer.BadParameter(f"unknown model {a!r}; choose from {[x.value for x in Arch]}")
        for s in size_list:
            if s not in {"S", "M", "L"}:
                raise typer.BadParameter(f"unknown size {s!r}; choose from S, M, L")
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        result = run_quality(arch_list, size_list, str(data) if data else source, n or int(preset_["n"]), seed,
                             batch_size or int(preset_["batch_size"]), window or int(preset_["window"]), dev,
                             seeds=seeds)
        print_table(result)
        if json_path:
            json_path.write_text(json.dumps(result, indent=1))
            typer.echo(f"wrote {json_path}")
        if plot_path:
            plot(result, plot_path)
            typer.echo(f"wrote {plot_path}")
