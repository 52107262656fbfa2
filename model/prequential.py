"""Progressive validation (test-then-train) over a time-ordered log: the one evaluation loop that neural
models and the reference baselines share.

A :class:`Learner` is anything with a ``spec`` and a ``step(part) -> StepResult`` that returns its
predictions for ``part`` made *before* learning from ``part``'s labels. :func:`run_prequential` feeds a
:class:`~model.batch.SampleArrays` through it batch by batch, in order, and reports AUC / UAUC / logloss per
task, overall and over a trailing window, plus a curve over time -- so every number is one the model could
have served.

An :class:`EvalSplit` restricts the *metrics* to the later part of the log (rows at or after a time and/or
after the first ``warmup_rows``) while the learner still learns test-then-train on every row: the model
warms up on the earlier part, and the reported numbers are a time slice, as an online model is judged.

>>> from model.spec import default_live_spec
>>> from model.config import preset
>>> from model.factory import build_model
>>> from model.learner import OnlineLearner
>>> from model.synthetic import make_synthetic
>>> spec = default_live_spec()
>>> model = build_model(spec, preset("zenith", "S", spec), device="cpu")
>>> report = run_prequential(OnlineLearner(model, spec), make_synthetic(spec, 512).arrays, batch_size=128)
>>> report.samples, 0.0 < report.main()["logloss"] < 1.0
(512, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from model.batch import SampleArrays
from model.metrics import MultiTaskMetrics, WindowAUC, WindowLogLoss
from model.spec import FeatureSpec


@dataclass
class StepResult:
    probs: np.ndarray  # [B, n_tasks] predictions made BEFORE this batch was learned from
    loss: float  # sum over tasks of the mean BCE of those predictions
    aux_loss: float  # MoE balancing loss (already weighted), 0 for models without one
    task_losses: np.ndarray  # [n_tasks]


class Learner(Protocol):
    """What :func:`run_prequential` drives: score a batch, then learn from it."""

    spec: FeatureSpec

    def step(self, part: SampleArrays) -> StepResult: ...


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds from an ISO-8601 time (naive means UTC) or from epoch milliseconds.

    >>> parse_time_ms("2022-04-28T00:00:00"), parse_time_ms("2022-04-28T02:00:00+02:00"), parse_time_ms("1651104000000")
    (1651104000000, 1651104000000, 1651104000000)
    """
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"not an ISO time or epoch milliseconds: {text!r}") from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(round(t.timestamp() * 1000))


@dataclass(frozen=True)
class EvalSplit:
    """Which rows the metrics count: ``event_ms >= after_ms`` (when set) and row index ``>= warmup_rows``.

    Every row is still scored and learned from; only the metrics skip the warm-up part.

    >>> import numpy as np
    >>> EvalSplit(after_ms=20).mask(np.array([10, 20, 30])).tolist()
    [False, True, True]
    >>> EvalSplit(warmup_rows=2).mask(np.array([10, 20, 30])).tolist()
    [False, False, True]
    """

    after_ms: int | None = None
    warmup_rows: int = 0

    def __post_init__(self) -> None:
        if self.warmup_rows < 0:
            raise ValueError(f"warmup_rows must be >= 0, got {self.warmup_rows}")

    @property
    def active(self) -> bool:
        return self.after_ms is not None or self.warmup_rows > 0

    def mask(self, event_ms: np.ndarray, start_row: int = 0) -> np.ndarray:
        """Counted rows among ``event_ms``, the rows ``start_row, start_row + 1, ...`` of the log."""
        keep = np.arange(start_row, start_row + len(event_ms)) >= self.warmup_rows
        if self.after_ms is not None:
            keep &= np.asarray(event_ms) >= self.after_ms
        return keep

    def describe(self) -> str:
        parts = []
        if self.after_ms is not None:
            parts.append("impressions from " + datetime.fromtimestamp(self.after_ms / 1000, UTC)
                         .strftime("%Y-%m-%d %H:%M:%S UTC"))
        if self.warmup_rows:
            parts.append(f"after the first {self.warmup_rows} rows")
        return " and ".join(parts) if parts else "all rows"


@dataclass
class PrequentialReport:
    tasks: dict[str, dict[str, float]]  # task -> auc, uauc, logloss, window_auc, window_uauc, window_logloss, ...
    main_task: str
    samples: int
    train_seconds: float  # time inside learner.step (scoring + learning), metrics excluded
    wall_seconds: float
    mean_loss: float
    mean_aux_loss: float
    curve: list[dict[str, float]] = field(default_factory=list)  # {samples, event_ms, window_auc, window_logloss}
    evaluated: int = -1  # rows the metrics count (all of them, unless an EvalSplit was given)
    split: str = "all rows"  # EvalSplit.describe()
    eval_from_ms: int | None = None  # impression time of the first counted row

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else float("nan")

    def main(self) -> dict[str, float]:
        return self.tasks[self.main_task]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_s": self.samples_per_s}


def run_prequential(learner: Learner, arrays: SampleArrays, batch_size: int = 256,
                    progress: Callable[[int, int], None] | None = None, window: int = 10_000,
                    curve_points: int = 20, split: EvalSplit | None = None) -> PrequentialReport:
    """Test-then-train over ``arrays`` in order, in mini-batches of ``batch_size``.

    ``progress(done, total)`` is called after every batch; ``curve_points`` evenly spaced points of the
    trailing-window AUC/logloss of the main task (``spec.tasks[0]``, over all rows, warm-up included) are
    recorded. With ``split``, the per-task metrics (overall and trailing window) count only the rows it
    keeps; the learner learns from every row either way.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    spec = learner.spec
    arrays.check(spec)
    split = split or EvalSplit()
    names = [t.name for t in spec.tasks]
    metrics = MultiTaskMetrics(names, window=window)
    curve_auc, curve_ll = WindowAUC(window), WindowLogLoss(window)  # the curve follows the whole log
    evaluated, eval_from_ms = 0, None
    total = len(arrays)
    every = max(total // max(curve_points, 1), 1)
    next_point, curve = every, []
    train_s, loss_sum, aux_sum, n_batches = 0.0, 0.0, 0.0, 0
    wall0 = time.perf_counter()
    done = 0
    for part in arrays.batches(batch_size):
        t0 = time.perf_counter()
        res = learner.step(part)  # probs come back as numpy, so a GPU step has finished when this returns
        train_s += time.perf_counter() - t0
        loss_sum, aux_sum, n_batches = loss_sum + res.loss, aux_sum + res.aux_loss, n_batches + 1
        keep = split.mask(part.event_ms, done)
        if keep.any():
            metrics.update(part.labels[keep], res.probs[keep], part.user[keep])
            if eval_from_ms is None:
                eval_from_ms = int(part.event_ms[keep][0])
            evaluated += int(keep.sum())
        curve_auc.update(part.labels[:, 0], res.probs[:, 0])
        curve_ll.update(part.labels[:, 0], res.probs[:, 0])
        done += len(part)
        if done >= next_point or done == total:
            curve.append({"samples": done, "event_ms": int(part.event_ms[-1]),
                          "window_auc": curve_auc.get(), "window_logloss": curve_ll.get()})
            next_point += every
        if progress is not None:
            progress(done, total)
    return PrequentialReport(
        tasks=metrics.get(), main_task=names[0], samples=done, train_seconds=train_s,
        wall_seconds=time.perf_counter() - wall0, mean_loss=loss_sum / max(n_batches, 1),
        mean_aux_loss=aux_sum / max(n_batches, 1), curve=curve, evaluated=evaluated, split=split.describe(),
        eval_from_ms=eval_from_ms,
    )


__all__ = ["EvalSplit", "Learner", "PrequentialReport", "StepResult", "parse_time_ms", "run_prequential"]
