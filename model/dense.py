"""How dense statistics reach the network: rates on the logit scale, then a running standardisation.

The stream writes dense features as they are natural to compute: rates in ``(0, 1)`` (a CTR) and
``log1p`` counts that range from 0 to about 10. Fed raw, a rate's useful range (0.05 vs 0.3) is a tiny
step next to a count's, and a linear model needs ``logit(rate)`` to add evidence the way a logistic
regression does. So ``DenseInput``:

1. maps every :attr:`~model.spec.DenseKind.RATE` feature to ``logit(clip(x, 1e-3, 1 - 1e-3))``;
2. standardises every feature with running mean and variance (Welford, merged per batch), updated by
   training-mode forwards *after* the batch was transformed with the statistics as they were -- so the
   training forward still equals the pre-update scoring pass, and a scorer (eval mode) never moves them.

Approximation, stated: the statistics are over all rows seen, with the effective count capped at
``max_count`` so they keep adapting to a drifting stream (an exponential forgetting once the cap is hit).
Before any row was seen the transform is the identity. The statistics are persistent buffers, so they
travel with every checkpoint and published model version.

>>> import torch
>>> from model.spec import default_live_spec
>>> spec = default_live_spec()
>>> norm = DenseInput(spec).train()
>>> x = torch.rand(256, spec.n_dense) * 0.5 + 0.2
>>> torch.equal(norm(x)[:, 0], x[:, 0])       # first batch: nothing seen yet, identity (of the transform)
True
>>> y = norm(x)                                 # second batch: standardised with the first batch's stats
>>> bool(y.mean().abs() < 0.05) and bool((y.std(0) - 1).abs().max() < 0.05)
True
"""

from __future__ import annotations

import torch
from torch import nn

from model.spec import DenseKind, FeatureSpec

_RATE_EPS = 1e-3
_CLAMP = 8.0  # a standardised value beyond ±8 is an outlier; clip it rather than let it dominate a step


class DenseInput(nn.Module):
    def __init__(self, spec: FeatureSpec, normalize: bool = True, max_count: float = 1e5) -> None:
        super().__init__()
        self.normalize, self.max_count = normalize, max_count
        rate = [d.kind is DenseKind.RATE for d in spec.dense]
        self._any_rate = any(rate)  # a Python bool: no device sync per forward
        self.register_buffer("_rate", torch.tensor(rate, dtype=torch.bool), persistent=False)
        n = spec.n_dense
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(n, dtype=torch.float64))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed part: rates to logits."""
        if not self._any_rate:
            return x
        p = x.clamp(_RATE_EPS, 1 - _RATE_EPS)
        return torch.where(self._rate, torch.log(p) - torch.log1p(-p), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform(x.float())
        if not self.normalize:
            return x
        # torch.where rather than `if self.count > 1`: no host sync on the serving/training hot path
        std = (self.m2 / (self.count - 1).clamp_min(1.0)).clamp_min(1e-6).sqrt()
        standardised = ((x.double() - self.mean) / std).clamp(-_CLAMP, _CLAMP).to(x.dtype)
        y = torch.where(self.count > 1, standardised, x)  # identity until two rows were seen
        if self.training and torch.is_grad_enabled():
            self._update(x.detach().double())
        return y

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n_a = self.count.clone()
        total = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta**2 * n_a * n_b / total
        self.count.copy_(total)
        if total > self.max_count:  # forget: keep the moments, shrink the weight of the past
            self.m2 *= self.max_count / total
            self.count.fill_(self.max_count)
