"""Smoke tests of the quality and speed benchmarks on tiny inputs (the real runs are `zenith bench ...`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deploy.bench import model_speed, quality

torch.set_num_threads(2)


def test_quality_bench_runs_and_plots(tmp_path: Path, capsys) -> None:
    result = quality.run_quality(["zenith", "dlrm"], ["S"], "synthetic", 600, seed=0, batch_size=200,
                                 window=300, device="cpu", progress=False)
    # the reference rows come first, then the models
    assert [r["arch"] for r in result["rows"]] == ["counting", "lr-ftrl", "zenith", "dlrm"]
    assert [r["reference"] for r in result["rows"]] == [True, True, False, False]
    assert all(0.5 < r["auc"] < 1 and "long_view_auc" in r for r in result["rows"])
    row = result["rows"][2]
    assert row["dense_params"] > 0 and row["flops_per_sample"] > 0 and 0 < row["auc"] < 1
    assert len(row["token_cosine"]) == 3  # tokenizer + 2 Zenith layers
    json.dumps(result)  # everything is JSON-serialisable
    quality.print_table(result)
    out = capsys.readouterr().out
    assert "zenith" in out and out.index("counting") < out.index("zenith") and "UAUC is context" in out
    quality.plot(result, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_model_speed_bench_one_row() -> None:
    row = model_speed.bench_one("zenith++", "S", torch.device("cpu"), batch_size=64, train_steps=1, reps=2,
                                bf16=False)
    assert row["train_samples_per_s"] > 0
    assert set(row["latency_ms"]) == set(model_speed.CANDIDATES)
    assert all(v["p50"] > 0 for v in row["latency_ms"].values())
    json.dumps(row)
