"""Progressive validation (test-then-train) over a time-ordered log: the one evaluation loop that neural
models and the reference baselines share.

A :class:`Learner` is anything with a ``spec`` and a ``step(part) -> StepResult`` that returns its
predictions for ``part`` made *before* learning from ``part``'s labels. :func:`run_prequential` feeds a
:class:`~model.batch.SampleArrays` through it batch by batch, in order, and reports AUC / UAUC / logloss per
task, overall and over a trailing window, plus a curve over time -- so every number is one the model could
have served.

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
from typing import Any, Protocol

import numpy as np

from model.batch import SampleArrays
from model.metrics import MultiTaskMetrics
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

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else float("nan")

    def main(self) -> dict[str, float]:
        return self.tasks[self.main_task]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_s": self.samples_per_s}


def run_prequential(learner: Learner, arrays: SampleArrays, batch_size: int = 256,
                    progress: Callable[[int, int], None] | None = None, window: int = 10_000,
                    curve_points: int = 20) -> PrequentialReport:
    """Test-then-train over ``arrays`` in order, in mini-batches of ``batch_size``.

    ``progress(done, total)`` is called after every batch; ``curve_points`` evenly spaced points of the
    trailing-window AUC/logloss of the main task (``spec.tasks[0]``) are recorded.
    """
    spec = learner.spec
    arrays.check(spec)
    names = [t.name for t in spec.tasks]
    metrics = MultiTaskMetrics(names, window=window)
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
        metrics.update(part.labels, res.probs, part.user)
        done += len(part)
        if done >= next_point or done == total:
            main = metrics.tasks[names[0]]
            curve.append({"samples": done, "event_ms": int(part.event_ms[-1]),
                          "window_auc": main.window_auc.get(), "window_logloss": main.window_logloss.get()})
            next_point += every
        if progress is not None:
            progress(done, total)
    return PrequentialReport(
        tasks=metrics.get(), main_task=names[0], samples=done, train_seconds=train_s,
        wall_seconds=time.perf_counter() - wall0, mean_loss=loss_sum / max(n_batches, 1),
        mean_aux_loss=aux_sum / max(n_batches, 1), curve=curve,
    )


__all__ = ["Learner", "PrequentialReport", "StepResult", "run_prequential"]
