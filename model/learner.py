"""Online learning with progressive validation (test-then-train): the one loop offline benches and the
online trainer share.

Every batch is *scored first* with the weights as they are, and only then learned from, so each sample's
reported prediction is one the model made before it saw that sample's label -- exactly what the scorer
would have served. ``run_prequential`` drives a time-ordered :class:`~model.batch.SampleArrays` through
``OnlineLearner.step`` and reports prequential AUC / UAUC / logloss per task, overall and over a trailing
window, plus a curve over time.

>>> from model.spec import default_live_spec
>>> from model.config import preset
>>> from model.factory import build_model
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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.batch import Batch, SampleArrays
from model.config import ModelConfig
from model.embedding import make_sparse_optimizer
from model.metrics import MultiTaskMetrics
from model.ranker import Ranker
from model.spec import FeatureSpec


@dataclass
class StepResult:
    probs: np.ndarray  # [B, n_tasks] predictions made BEFORE this batch was learned from
    loss: float  # sum over tasks of the mean BCE of those predictions
    aux_loss: float  # MoE balancing loss (already weighted), 0 for models without one
    task_losses: np.ndarray  # [n_tasks]


class OnlineLearner:
    """Owns a model's optimizers: AdamW for dense weights, a row-wise sparse optimizer for embedding rows.

    ``fused_score`` (default on): when the model has no train-only randomness (``train_eval_identical``),
    the training forward *is* the pre-update scoring pass -- same weights, same inputs, same outputs -- so
    the learner scores and learns in one forward instead of two (~25% faster). With it off, or for a model
    with dropout/noise, it runs an explicit no-grad eval-mode scoring pass first. A test checks both give
    identical probabilities.
    """

    def __init__(self, model: Ranker, spec: FeatureSpec, config: ModelConfig | None = None,
                 device: torch.device | str | None = None, fused_score: bool = True) -> None:
        self.spec = spec
        self.config = cfg = config or model.config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.dense_opt = torch.optim.AdamW(list(model.dense_parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sparse_opt = make_sparse_optimizer(cfg.sparse_optim, model.sparse_parameters(), cfg.emb_lr)
        self.autocast = cfg.bf16_autocast and self.device.type == "cuda"
        self.fused_score = fused_score and model.train_eval_identical
        self.steps = 0
        self.samples = 0

    def to_batch(self, data: Batch | SampleArrays) -> Batch:
        return Batch.from_arrays(data, self.device) if isinstance(data, SampleArrays) else data

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(batch)

    @torch.no_grad()
    def score(self, data: Batch | SampleArrays) -> torch.Tensor:
        """Probabilities ``[B, n_tasks]`` with the current weights (eval mode, no grad)."""
        batch = self.to_batch(data)
        was_training = self.model.training
        self.model.eval()
        try:
            return torch.sigmoid(self._forward(batch)[0])
        finally:
            self.model.train(was_training)

    def step(self, data: Batch | SampleArrays) -> StepResult:
        """Score the batch, then learn from it. Returns the pre-update scores and their loss."""
        batch = self.to_batch(data)
        pre_probs = None if self.fused_score else self.score(batch)
        self.model.train()
        logits, aux = self._forward(batch)
        labels = batch.labels.to(logits.dtype)
        task_losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)
        loss = task_losses.sum()
        self.dense_opt.zero_grad(set_to_none=True)
        self.sparse_opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.model.dense_parameters()), self.config.grad_clip)
        self.dense_opt.step()
        self.sparse_opt.step()
        self.steps += 1
        self.samples += len(batch)
        if pre_probs is None:
            pre_probs = torch.sigmoid(logits.detach())
        else:  # report the loss of what was actually scored
            task_losses = F.binary_cross_entropy(pre_probs.clamp(1e-7, 1 - 1e-7), labels, reduction="none").mean(0)
        return StepResult(probs=pre_probs.float().cpu().numpy(), loss=float(task_losses.detach().sum()),
                          aux_loss=float(aux.detach()), task_losses=task_losses.detach().float().cpu().numpy())

    # ---- optimizer state, for checkpoints ------------------------------------------------------------
    def optimizer_state(self) -> dict[str, Any]:
        return {"dense": self.dense_opt.state_dict(), "sparse": self.sparse_opt.state_dict(),
                "steps": self.steps, "samples": self.samples}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.dense_opt.load_state_dict(state["dense"])
        self.sparse_opt.load_state_dict(state["sparse"])
        self.steps, self.samples = int(state.get("steps", 0)), int(state.get("samples", 0))


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


def run_prequential(learner: OnlineLearner, arrays: SampleArrays, batch_size: int = 256,
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
        res = learner.step(part)
        if learner.device.type == "cuda":
            torch.cuda.synchronize(learner.device)
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
