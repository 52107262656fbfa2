"""``zenith bench model``: training throughput and ranking latency of every model and size, per device.

Per model, size and device: training samples/s (median over test-then-train steps of ``--batch-size``),
the latency to score 100 / 500 / 1000 candidate rooms for one user (p50 and p95 over repeats, eval mode,
no grad), and the achieved FLOP/s of both (forward FLOPs counted with FlopCounterMode; training counted as 3x forward).
Achieved FLOP/s is set against two references: the device's datasheet peak where it is known (NVIDIA
GPUs by name; for a CPU it is not known here and shows "n/a"), and a measured large-matmul rate on the same
device and thread count, which is what a perfect kernel could reach in practice.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import typer

CANDIDATES = (100, 500, 1000)

# Dense datasheet peaks in TFLOP/s (fp32 non-tensor, bf16 tensor core), by substring of the device name.
GPU_PEAKS_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (67.0, 989.0), "H100 PCIe": (51.0, 756.0), "H100": (67.0, 989.0), "A100": (19.5, 312.0),
    "L40S": (91.6, 362.0), "L4": (30.3, 121.0), "A10": (31.2, 125.0), "V100": (15.7, 125.0), "T4": (8.1, 65.0),
}


def device_peak_flops(device: Any, bf16: bool) -> float | None:
    import torch

    if device.type != "cuda":
        return None  # CPU datasheet peaks depend on SKU, clocks and AVX units: not guessed
    name = torch.cuda.get_device_name(device)
    for key, (fp32, b16) in GPU_PEAKS_TFLOPS.items():
        if key in name:
            return (b16 if bf16 else fp32) * 1e12
    return None


def measured_matmul_flops(device: Any, bf16: bool, trials: int = 5) -> float:
    """FLOP/s of a large square matmul on ``device``, best of ``trials``: a practical ceiling for these models.
    Best-of, because on a shared machine any single timing can be slowed by other processes."""
    import torch

    n = 4096 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if (bf16 and device.type == "cuda") else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    best = 0.0
    for _ in range(trials):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_user_candidates(spec: Any, n: int, seed: int = 0):
    """``n`` candidate rooms for one user: user, context and history identical, candidate fields vary."""
    from model.factory import random_arrays

    a = random_arrays(spec, n, seed=seed)
    shared = [spec.id_index(f.name) for f in spec.ids if f.name in ("user_id", "hour", "device", "tab")]
    a.ids[:, shared] = a.ids[0, shared]
    a.seqs[:] = a.seqs[0]
    a.user[:] = a.user[0]
    return a


def bench_one(arch: str, size: str, device: Any, batch_size: int, train_steps: int, reps: int,
              bf16: bool) -> dict[str, Any]:
    import torch

    from model.batch import Batch
    from model.config import Arch, Size, preset
    from model.factory import build_model, count_params, flops_per_sample, random_arrays
    from model.learner import OnlineLearner
    from model.spec import default_live_spec

    spec = default_live_spec()
    cfg = preset(Arch(arch), Size(size), spec, bf16_autocast=bf16)
    model = build_model(spec, cfg, device)
    flops = flops_per_sample(model, spec)
    learner = OnlineLearner(model, spec, cfg, device)
    batches = [Batch.from_arrays(random_arrays(spec, batch_size, seed=i), device) for i in range(train_steps + 2)]
    for b in batches[:2]:  # warm-up (allocator, lazy init, cuDNN/cuBLAS heuristics)
        learner.step(b)
    step_s = []
    for b in batches[2:]:  # per-step times; the median resists bursts from other processes on a shared box
        _sync(device)
        t0 = time.perf_counter()
        learner.step(b)
        _sync(device)
        step_s.append(time.perf_counter() - t0)
    train_sps = batch_size / statistics.median(step_s)
    row: dict[str, Any] = {"arch": arch, "size": size, "device": str(device), "dense_params": count_params(model).dense,
                           "flops_per_sample": flops, "train_samples_per_s": train_sps,
                           "train_flops_per_s": 3 * flops * train_sps, "latency_ms": {}}
    model.eval()
    autocast = bf16 and device.type == "cuda"
    for n in CANDIDATES:
        batch = Batch.from_arrays(one_user_candidates(spec, n), device)
        times = []
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            for i in range(reps + 3):
                _sync(device)
                t = time.perf_counter()
                torch.sigmoid(model(batch)[0])
                _sync(device)
                if i >= 3:
                    times.append(time.perf_counter() - t)
        times.sort()
        p50 = statistics.median(times)
        row["latency_ms"][n] = {"p50": 1e3 * p50, "p95": 1e3 * times[min(len(times) - 1, int(0.95 * len(times)))],
                                "flops_per_s": flops * n / p50}
    return row


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from deploy.bench.quality import _si

    for dev in result["devices"]:
        peak, ref = dev["peak_flops"], dev["matmul_flops"]
        t = Table(title=f"{dev['name']} ({dev['device']}, {result['threads']} threads, "
                        f"{'bf16 autocast' if result['bf16'] else 'fp32'}): training batch {result['batch_size']}; "
                        f"datasheet peak {(_si(peak) + 'FLOP/s') if peak else 'n/a'}, "
                        f"measured matmul {_si(ref)}FLOP/s")
        cols = ["model", "size", "dense params", "FLOPs/sample", "train samples/s", "train FLOP/s",
                *[f"{n} cand p50/p95 ms" for n in CANDIDATES], "1000-cand FLOP/s", "% of matmul", "% of peak"]
        for c in cols:
            t.add_column(c, justify="left" if c in ("model", "size") else "right")
        for r in (r for r in result["rows"] if r["device"] == dev["device"]):
            lat = r["latency_ms"]
            fl = lat[CANDIDATES[-1]]["flops_per_s"]
            t.add_row(r["arch"], r["size"], _si(r["dense_params"]), _si(r["flops_per_sample"]),
                      f"{r['train_samples_per_s']:.0f}", _si(r["train_flops_per_s"]),
                      *[f"{lat[n]['p50']:.2f}/{lat[n]['p95']:.2f}" for n in CANDIDATES], _si(fl),
                      f"{100 * fl / ref:.1f}%", f"{100 * fl / peak:.2f}%" if peak else "n/a")
        Console(width=220).print(t)


def register(bench: typer.Typer) -> None:
    @bench.command("model")
    def model_speed(
        models: str = typer.Option("dlrm,dcnv2,rankmixer,transformer,zenith,zenith++", "--models"),
        sizes: str = typer.Option("S,M,L", "--sizes"),
        device: str = typer.Option("all", "--device", help="all (CPU, and CUDA if present) | cpu | cuda"),
        batch_size: int = typer.Option(256, "--batch-size", help="training batch"),
        train_steps: int = typer.Option(7, "--train-steps", help="timed training steps per model (median)"),
        reps: int = typer.Option(20, "--reps", help="timed scoring repeats per candidate count"),
        threads: int = typer.Option(2, "--threads", help="torch CPU threads"),
        bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast on CUDA (ignored on CPU)"),
        json_path: Path | None = typer.Option(None, "--json", help="write all numbers here"),
    ) -> None:
        """Training samples/s and ranking latency (100/500/1000 candidates) per model, size and device."""
        import platform

        import torch

        torch.set_num_threads(threads)
        want = {"all": ["cpu", "cuda"], "cpu": ["cpu"], "cuda": ["cuda"]}.get(device)
        if want is None:
            raise typer.BadParameter("--device must be all, cpu or cuda")
        if "cuda" in want and not torch.cuda.is_available():
            if device == "cuda":
                raise typer.BadParameter("no CUDA device is available; use --device cpu")
            want.remove("cuda")
        result: dict[str, Any] = {"bench": "model", "threads": threads, "batch_size": batch_size, "bf16": bf16,
                                  "torch": torch.__version__, "devices": [], "rows": []}
        for d in want:
            dev = torch.device(d)
            name = torch.cuda.get_device_name(dev) if d == "cuda" else (platform.processor() or platform.machine())
            info = {"device": d, "name": name, "peak_flops": device_peak_flops(dev, bf16),
                    "matmul_flops": measured_matmul_flops(dev, bf16)}
            result["devices"].append(info)
            for arch in [m.strip() for m in models.split(",") if m.strip()]:
                for size in [s.strip() for s in sizes.split(",") if s.strip()]:
                    row = bench_one(arch, size, dev, batch_size, train_steps, reps, bf16)
                    result["rows"].append(row)
                    typer.echo(f"  {d} {arch:<11} {size}  train {row['train_samples_per_s']:.0f}/s  "
                               f"1000 cand {row['latency_ms'][1000]['p50']:.1f} ms", err=True)
            info["matmul_flops"] = max(info["matmul_flops"], measured_matmul_flops(dev, bf16))  # again, after
        print_table(result)
        if json_path:
            json_path.write_text(json.dumps(result, indent=1))
            typer.echo(f"wrote {json_path}")
