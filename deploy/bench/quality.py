"""``zenith bench quality``: models x sizes on one time-ordered stream, test-then-train.

Every row sees the same samples in the same order and starts from the same seed. Per row: dense and
embedding parameters, forward FLOPs per sample (measured with FlopCounterMode), prequential AUC / UAUC /
logloss of the main task (overall and trailing window), training samples/s, and the average pairwise
cosine similarity between tokens after each layer (the Zenith paper's heterogeneity diagnostic; layer 0
is the tokenizer's output). ``--plot`` draws logloss against parameters and against FLOPs (the scaling
curves); ``--json`` writes every number, per task, with the learning curves.

Reference rows come first: ``counting`` (smoothed per-user and per-item rates combined in logit space)
and ``lr-ftrl`` (online logistic regression, FTRL-Proximal, via River when installed) from
``model.reference``, on the same samples through the same test-then-train loop, so a reader always sees the
floor next to the models. ``--split-time`` / ``--warmup-rows`` report metrics on the later part of the log
only (every model still learns on all of it). The table shows click (the main task) and long-view AUC;
AUC and logloss are the headline, UAUC is context.

Data: ``--source sim`` (default) and ``--data PATH.csv`` (KuaiRand) go through ``deploy.datasets``, which
turns the stream into samples with the stream's own feature code; ``--source synthetic`` uses the
in-process planted-signal generator (``model.synthetic``) and needs nothing else running.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict
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


LONG_VIEW = "long_view"
METRICS = ("auc", "uauc", "logloss", "window_auc", "window_uauc", "window_logloss")
UAUC_NOTE = ("AUC and logloss are the headline; UAUC is context: on a log of per-user running rates, user-averaged "
             "AUC is biased below 0.5 even for a correct model (a user's past and current labels are negatively "
             "correlated once the user's total is fixed).")


def _task_metrics(report: Any, main: str, second: str | None) -> dict[str, float]:
    """The numbers a row carries per seed: the main task's METRICS plus the second task's AUC/logloss."""
    out = {k: report.tasks[main][k] for k in METRICS}
    if second is not None:
        out.update({f"{second}_auc": report.tasks[second]["auc"], f"{second}_logloss": report.tasks[second]["logloss"]})
    return out


def _mean_std(per_seed: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    import statistics

    row = {k: statistics.fmean(p[k] for p in per_seed) for k in keys}
    if len(per_seed) > 1:
        row.update({f"{k}_std": statistics.stdev(p[k] for p in per_seed) for k in keys if "window" not in k})
    return row


def run_references(refs: list[str], spec: Any, arrays: Any, batch_size: int, window: int, split: Any,
                   second: str | None, progress: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """Reference rows (deterministic, so one run each) and notes for the ones that could not run."""
    from model.prequential import run_prequential
    from model.reference import Reference, make_reference, river_available

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    main = spec.tasks[0].name
    for name in refs:
        kind = Reference(name)
        if kind is Reference.FTRL and not river_available():
            notes.append("lr-ftrl skipped: River is not installed (pip install 'zenith-live[bench]' or river)")
            typer.secho(f"note: {notes[-1]}", fg="yellow", err=True)
            continue
        learner = make_reference(kind, spec)
        t0 = time.perf_counter()
        report = run_prequential(learner, arrays, batch_size=batch_size, window=window, split=split)
        per_seed = [_task_metrics(report, main, second)]
        row: dict[str, Any] = {
            "arch": kind.value, "size": "-", "reference": True, "dense_params": 0, "embedding_params": 0,
            "flops_per_sample": 0, **_mean_std(per_seed, list(per_seed[0])), "seeds": 1, "per_seed": per_seed,
            "samples_per_s": report.samples_per_s, "seconds": time.perf_counter() - t0, "token_cosine": [],
            "mean_aux_loss": 0.0, "tasks": report.tasks, "curve": report.curve,
            "config": {k: getattr(v, "value", v) for k, v in asdict(learner.config).items()},  # enums as values
        }
        rows.append(row)
        if progress:
            typer.echo(f"  {kind.value:<11} -  logloss {row['logloss']:.4f}  auc {row['auc']:.4f}  "
                       f"({row['seconds']:.0f}s)", err=True)
    return rows, notes


def run_quality(archs: list[str], sizes: list[str], source: str, n: int, seed: int, batch_size: int,
                window: int, device: str, progress: bool = True, seeds: int = 1,
                references: list[str] | None = None, split: Any = None) -> dict[str, Any]:
    """Reference rows first, then one row per (arch, size); with ``seeds > 1`` each model row is the mean over
    model seeds ``seed..seed+k-1`` (same data, same order) and carries the standard deviation, to tell a
    difference from seed noise. ``references`` defaults to every :class:`model.reference.Reference`;
    ``split`` (a :class:`model.prequential.EvalSplit`) restricts every metric to the later part of the log."""
    import statistics

    import torch

    from model.batch import Batch
    from model.config import Arch, Size, preset
    from model.factory import build_model, count_params, flops_per_sample
    from model.learner import OnlineLearner
    from model.prequential import EvalSplit, run_prequential
    from model.reference import Reference

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    split = split or EvalSplit()
    spec, arrays, described = load_stream(source, n, seed)
    main = spec.tasks[0].name
    second = LONG_VIEW if LONG_VIEW in {t.name for t in spec.tasks} and main != LONG_VIEW else None
    refs = [r.value for r in Reference] if references is None else references
    rows, notes = run_references(refs, spec, arrays, batch_size, window, split, second, progress)
    if seeds > 1 and rows:
        notes.append("reference rows are deterministic (no model seed): one run each, so no ±")
    dev = torch.device(device)
    probe = Batch.from_arrays(arrays[-min(len(arrays), 2048):], dev)  # for the token diagnostic, after training
    evaluated = split.mask(arrays.event_ms)
    for arch in archs:
        for size in sizes:
            runs = []
            for s in range(seed, seed + seeds):
                cfg = preset(Arch(arch), Size(size), spec, seed=s)
                model = build_model(spec, cfg, dev)
                t0 = time.perf_counter()
                report = run_prequential(OnlineLearner(model, spec, cfg, dev), arrays, batch_size=batch_size,
                                         window=window, split=split)
                runs.append((cfg, model, report, time.perf_counter() - t0))
            cfg, model, report, _ = runs[0]
            params = count_params(model)
            per_seed = [_task_metrics(r, main, second) for _, _, r, _ in runs]
            row: dict[str, Any] = {
                "arch": arch, "size": size, "reference": False, "dense_params": params.dense,
                "embedding_params": params.sparse, "flops_per_sample": flops_per_sample(model, spec),
                **_mean_std(per_seed, list(per_seed[0])),
                "samples_per_s": statistics.fmean(r.samples_per_s for _, _, r, _ in runs),
                "seconds": sum(t for *_, t in runs),
                "token_cosine": [statistics.fmean(v) for v in zip(*(m.token_similarity(probe) for _, m, _, _ in runs),
                                                                  strict=True)],
                "mean_aux_loss": report.mean_aux_loss, "seeds": seeds, "per_seed": per_seed,
                "tasks": report.tasks, "curve": report.curve, "config": cfg.to_dict(),
            }
            rows.append(row)
            if progress:
                typer.echo(f"  {arch:<11} {size}  logloss {row['logloss']:.4f}  auc {row['auc']:.4f}  "
                           f"({row['seconds']:.0f}s)", err=True)
    return {
        "bench": "quality", "source": described, "samples": len(arrays), "seed": seed, "seeds": seeds,
        "batch_size": batch_size, "window": window, "device": str(dev), "main_task": main, "second_task": second,
        "split": split.describe(), "split_after_ms": split.after_ms, "warmup_rows": split.warmup_rows,
        "evaluated": int(evaluated.sum()),
        "positive_rate": float(arrays.labels[evaluated, 0].mean()) if evaluated.any() else float("nan"),
        "torch_threads": torch.get_num_threads(), "notes": [*notes, UAUC_NOTE], "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    seeds = result.get("seeds", 1)
    second = result.get("second_task")
    seed_txt = f"seed {result['seed']}" if seeds == 1 else f"mean ± std over seeds {result['seed']}..+{seeds - 1}"
    split = result.get("split", "all rows")
    scope = (f"metrics on {result.get('evaluated', result['samples'])} rows ({split}) of {result['samples']}"
             if split != "all rows" else f"{result['samples']} samples")
    t = Table(title=f"prequential quality, task '{result['main_task']}' on {result['source']}: {scope}, "
                    f"batch {result['batch_size']}, window {result['window']}, {seed_txt}, {result['device']}")
    cols = ["model", "size", "dense params", "emb params", "FLOPs/sample", "AUC", "logloss"]
    if second:
        cols += [f"{second} AUC", f"{second} logloss"]
    cols += ["UAUC", "win AUC", "win logloss", "samples/s", "token cos by layer (0=input)"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "size") or col.startswith("token") else "right")
    best = min(r["logloss"] for r in result["rows"])
    for r in result["rows"]:
        def pm(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.4f}" + (f"±{r[key + '_std']:.4f}" if key + "_std" in r else "")

        ref = r.get("reference", False)
        ll = pm("logloss")
        cells = [f"[italic]{r['arch']}[/italic]" if ref else r["arch"], r["size"],
                 "-" if ref else _si(r["dense_params"]), "-" if ref else _si(r["embedding_params"]),
                 "-" if ref else _si(r["flops_per_sample"]), pm("auc"),
                 f"[bold]{ll}[/bold]" if r["logloss"] == best else ll]
        if second:
            cells += [pm(f"{second}_auc"), pm(f"{second}_logloss")]
        cells += [pm("uauc"), f"{r['window_auc']:.4f}", f"{r['window_logloss']:.4f}", f"{r['samples_per_s']:.0f}",
                  " ".join(f"{c:.2f}" for c in r["token_cosine"])]
        t.add_row(*cells, end_section=ref and r is _last_reference(result["rows"]))
    console = Console(width=220)
    console.print(t)
    for note in result.get("notes", [UAUC_NOTE]):
        console.print(f"[dim]note: {note}[/dim]")


def _last_reference(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    refs = [r for r in rows if r.get("reference")]
    return refs[-1] if refs else None


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    models = [r for r in result["rows"] if not r.get("reference")]
    archs = list(dict.fromkeys(r["arch"] for r in models))
    for i, ref in enumerate(r for r in result["rows"] if r.get("reference")):
        for ax in axes:  # a reference has no size: a horizontal line at its logloss
            ax.axhline(ref["logloss"], color="0.35", lw=1.0, ls=("--", ":", "-.")[i % 3],
                       label=f"{ref['arch']} (reference)")
    for arch in archs:
        rows = sorted((r for r in models if r["arch"] == arch), key=lambda r: r["dense_params"])
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
    split = result.get("split", "all rows")
    fig.suptitle(f"Scaling on {result['source']} ({result['samples']} samples"
                 + (f"; metrics on {split}" if split != "all rows" else "") + ")", fontsize=10)
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
        references: str = typer.Option("counting,lr-ftrl", "--references",
                                       help="reference rows printed first: counting, lr-ftrl, or none"),
        split_time: str | None = typer.Option(None, "--split-time",
                                              help="count metrics only on impressions at/after this time "
                                                   "(ISO, naive = UTC, or epoch ms); models learn on all rows"),
        warmup_rows: int = typer.Option(0, "--warmup-rows", help="count metrics only after the first N rows"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        threads: int = typer.Option(2, "--threads", help="torch CPU threads"),
        json_path: Path | None = typer.Option(None, "--json", help="write all numbers here"),
        plot_path: Path | None = typer.Option(None, "--plot", help="write the scaling plot (PNG) here"),
    ) -> None:
        """Prequential quality of every model and size on one stream; the Zenith scaling comparison."""
        import torch

        from model.config import Arch
        from model.prequential import EvalSplit, parse_time_ms
        from model.reference import Reference

        torch.set_num_threads(threads)
        ref_list = [r.strip() for r in references.split(",") if r.strip() and r.strip() != "none"]
        for r in ref_list:
            if r not in {x.value for x in Reference}:
                raise typer.BadParameter(f"unknown reference {r!r}; choose from {[x.value for x in Reference]} "
                                         "or none")
        try:
            split = EvalSplit(after_ms=parse_time_ms(split_time) if split_time else None, warmup_rows=warmup_rows)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
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
                             seeds=seeds, references=ref_list, split=split)
        if result["evaluated"] == 0:
            typer.secho(f"no rows after the split ({result['split']}): every metric is nan", fg="yellow", err=True)
        print_table(result)
        if json_path:
            json_path.write_text(json.dumps(result, indent=1))
            typer.echo(f"wrote {json_path}")
        if plot_path:
            plot(result, plot_path)
            typer.echo(f"wrote {plot_path}")
