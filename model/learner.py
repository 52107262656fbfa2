"""Online learning with progressive validation (test-then-train): the one step offline benches and the
online trainer share.

Every batch is *scored first* with the weights as they are, and only then learned from, so each sample's
reported prediction is one the model made before it saw that sample's label -- exactly what the scorer
would have served. :func:`model.prequential.run_prequential` drives a time-ordered
:class:`~model.batch.SampleArrays` through ``OnlineLearner.step`` (or any other
:class:`~model.prequential.Learner`, such as the reference baselines in :mod:`model.reference`).

>>> from model.spec import default_live_spec
>>> from model.config import preset
>>> from model.factory import build_model
>>> from model.synthetic import make_synthetic
>>> spec = default_live_spec()
>>> learner = OnlineLearner(build_model(spec, preset("zenith", "S", spec), device="cpu"), spec)
>>> res = learner.step(make_synthetic(spec, 128).arrays)
>>> res.probs.shape == (128, len(spec.tasks)), learner.samples
(True, 128)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model.batch import Batch, SampleArrays
from model.config import ModelConfig
from model.embedding import RowWiseAdagrad, make_sparse_optimizer
from model.prequential import StepResult
from model.ranker import Ranker
from model.spec import FeatureSpec

__all__ = ["OnlineLearner", "StepResult"]  # StepResult lives in model.prequential; re-exported


class OnlineLearner:
    """Owns a model's optimizers, one per learning regime (see ``Ranker.dense_parameters``): AdamW for the
    deep body's dense weights, a row-wise sparse optimizer for the deep embedding rows, and row-wise
    Adagrad at ``wide_lr`` for the wide path (per-coordinate steps, so an id's bias moves from its first
    samples, as in FTRL).

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
        self.sparse_opt = make_sparse_optimizer(cfg.sparse_optim, model.deep_sparse_parameters(), cfg.emb_lr)
        wide = model.wide
        self.wide_opt = None if wide is None else RowWiseAdagrad(
            [{"params": [wide.table.weight]}, {"params": wide.linear_parameters(), "lr": cfg.wide_dense_lr}],
            lr=cfg.wide_lr, eps=cfg.wide_beta)
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
        logits, aux, task_losses = self._learn(batch)
        self.steps += 1
        self.samples += len(batch)
        if pre_probs is None:
            pre_probs = torch.sigmoid(logits.detach())
        else:  # report the loss of what was actually scored
            labels = batch.labels.to(pre_probs.dtype)
            task_losses = F.binary_cross_entropy(pre_probs.clamp(1e-7, 1 - 1e-7), labels, reduction="none").mean(0)
        return StepResult(probs=pre_probs.float().cpu().numpy(), loss=float(task_losses.detach().sum()),
                          aux_loss=float(aux.detach()), task_losses=task_losses.detach().float().cpu().numpy())

    def _learn(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step on ``batch``; returns the logits, aux loss and per-task losses of its forward."""
        self.model.train()
        logits, aux = self._forward(batch)
        labels = batch.labels.to(logits.dtype)
        task_losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)
        optimizers = self.optimizers().values()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        (task_losses.sum() + aux).backward()
        if self.wide_opt is not None:  # see ModelConfig.wide_beta: the wide path steps on summed gradients
            for p in self.model.wide_parameters():
                if p.grad is not None:
                    p.grad.mul_(len(batch))
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.model.dense_parameters()), self.config.grad_clip)
        for opt in optimizers:
            opt.step()
        return logits, aux, task_losses

    # ---- optimizer state, for checkpoints ------------------------------------------------------------
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Name -> optimizer; the names key their state in checkpoints."""
        opts: dict[str, torch.optim.Optimizer] = {"dense": self.dense_opt, "sparse": self.sparse_opt}
        if self.wide_opt is not None:
            opts["wide"] = self.wide_opt
        return opts

    def optimizer_state(self) -> dict[str, Any]:
        return {**{name: opt.state_dict() for name, opt in self.optimizers().items()},
                "steps": self.steps, "samples": self.samples}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers().items():
            if name not in state:
                raise ValueError(f"the saved optimizer state has no {name!r} part (it has {sorted(state)}): "
                                 "it was saved for a model with another config; start its optimizers fresh")
            opt.load_state_dict(state[name])
        self.steps, self.samples = int(state.get("steps", 0)), int(state.get("samples", 0))
