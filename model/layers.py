"""Small building blocks shared by the tokenizer, Zenith and the baselines.

"Tokenwise" layers hold a separate weight per token and apply all of them in one batched ``einsum``
(``[B, T, i] x [T, i, o] -> [B, T, o]``), never a Python loop over tokens.

>>> import torch
>>> lin = TokenwiseLinear(n_tokens=3, d_in=4, d_out=5)
>>> lin(torch.randn(2, 3, 4)).shape
torch.Size([2, 3, 5])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TokenwiseLinear(nn.Module):
    """``y[:, t] = x[:, t] @ W[t] + b[t]``: one independent linear map per token."""

    def __init__(self, n_tokens: int, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_tokens, d_in, d_out))
        nn.init.uniform_(self.weight, -1 / math.sqrt(d_in), 1 / math.sqrt(d_in))  # nn.Linear's default
        self.bias = nn.Parameter(torch.zeros(n_tokens, d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bti,tio->bto", x, self.weight)
        return y + self.bias if self.bias is not None else y


class TokenwiseLayerNorm(nn.Module):
    """LayerNorm over the feature dim with a separate gain/bias per token (keeps tokens distinct)."""

    def __init__(self, n_tokens: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_tokens, dim))
        self.bias = nn.Parameter(torch.zeros(n_tokens, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # addcmul: the per-token gain and bias in one pass (a broadcast mul then add took 2.4x as long).
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:], eps=self.eps), self.weight)


class MLP(nn.Sequential):
    """Linear -> SiLU -> ... -> Linear (no activation after the last layer unless ``final_act``)."""

    def __init__(self, dims: list[int], final_act: bool = False) -> None:
        assert len(dims) >= 2, f"an MLP needs at least [in, out] dims, got {dims}"
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2 or final_act:
                layers.append(nn.SiLU())
        super().__init__(*layers)


class MultiTaskHeads(nn.Module):
    """One small tower per task (``in -> hidden -> 1``), all towers computed in one batched matmul."""

    def __init__(self, d_in: int, n_tasks: int, hidden: int, residual: bool = False) -> None:
        """``residual``: the towers add to another path's logits (the wide path), so they start at exactly
        zero -- the model starts as that path -- and carry no bias of their own."""
        super().__init__()
        self.n_tasks, self.hidden = n_tasks, hidden
        self.first = nn.Linear(d_in, n_tasks * hidden)
        self.second = nn.Parameter(torch.empty(n_tasks, hidden))
        if residual:
            nn.init.zeros_(self.second)
        else:
            nn.init.uniform_(self.second, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))
        self.out_bias = nn.Parameter(torch.full((n_tasks,), 0.0 if residual else -2.0))  # near a low base rate

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.first(z)).view(z.shape[0], self.n_tasks, self.hidden)
        return torch.einsum("bnh,nh->bn", h, self.second) + self.out_bias
