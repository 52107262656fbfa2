"""The forward pass a scorer runs: one user's candidates, the user's sequences given once.

``build_forward(model, kind)`` turns a model version into ``(ids [B, n_ids], seqs [1, n_seqs, L],
dense [B, n_dense]) -> logits [B, n_tasks]``:

* ``ForwardKind.EAGER``: the model's own ``forward`` (the reference).
* ``ForwardKind.TORCHSCRIPT``: the same forward traced by TorchScript. It runs as one C++ call that releases
  the GIL, so the hundreds of small ops of a ranking forward do not take turns with the event loop and with
  each other: two requests scored at once really use two cores. Measured on the 2-core development machine,
  Zenith S, 500 candidates, 1 torch thread: 1.6-1.7x faster alone than the eager reference (most of it from
  embedding the user's sequences once), and 1.7-1.9x the throughput of the same eager forward with two
  threads (see the README's serving table). The first version of a configuration is traced (0.2-0.5 s); each version is
  a copy of that trace holding its own weights (about 20 ms), built on the loader thread.
  TorchScript is deprecated upstream in favour of ``torch.compile``/``torch.export``; on this CPU
  ``torch.compile`` took 68 s to compile and recompiled on every new version's weights (17 s), ONNX Runtime was
  1.1x eager, and dynamic int8 quantisation of the linear layers was slower than fp32: TorchScript is what
  pays today. It is verified against eager on a probe batch for every version (``tolerance``), and a version
  that fails to trace or to match is served eager instead.

Tracing records one path through Python control flow. The paths a ranking forward takes depend only on
the model's configuration and on "sequences shared by every row", which every call here has; the probe
check runs a second batch size to catch a shape baked in by mistake.
"""

from __future__ import annotations

import copy
import enum
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from model.batch import Batch
from model.ranker import Ranker

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
WARMUP_CALLS = 2


class ForwardKind(enum.StrEnum):
    EAGER = "eager"
    TORCHSCRIPT = "torchscript"


class ForwardMismatch(Exception):
    """The optimised forward did not reproduce the model's scores on the probe batch."""


@dataclass(frozen=True)
class RankingForward:
    kind: ForwardKind  # what actually runs (EAGER after a fallback)
    fn: Forward
    build_s: float
    fallback: str = ""  # why TORCHSCRIPT was asked for and EAGER runs, if it does


class _Logits(nn.Module):
    """The model as a function of the three input tensors (what tracing needs)."""

    def __init__(self, model: Ranker) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, seqs: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        return self.model(Batch(ids, seqs, dense, dense.new_zeros(n, 0), ids.new_zeros(n)))[0]


def probe_inputs(model: Ranker, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random inputs shaped like one ranking request: ``n`` candidates, one user's (partly padded) sequences,
    some candidates' authors in those sequences (so target attention really matches)."""
    spec = model.spec
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(1, 1 << 62, (n, spec.n_ids), generator=g)
    seqs = torch.randint(1, 1 << 62, (1, spec.n_seqs, spec.seq_len), generator=g)
    seqs[0, :, spec.seq_len // 2:] = 0
    if spec.n_seqs and spec.n_ids > 2:
        ids[: n // 2, 2] = seqs[0, 0, 0]
    dense = torch.randn(n, spec.n_dense, generator=g)
    return ids.to(device), seqs.to(device), dense.to(device)


class ForwardBuilder:
    """Builds each model version's ranking forward. Traces once per model configuration, then gives each new
    version a copy of that trace bound to its own weights (the graph is the same; only the tensors differ).

    Used by one thread (the scorer's loader); ``build`` verifies every result against eager on a probe batch.
    """

    def __init__(self, kind: ForwardKind = ForwardKind.TORCHSCRIPT, tolerance: float = 1e-4) -> None:
        self.kind, self.tolerance = kind, tolerance
        self._template: torch.jit.ScriptModule | None = None  # the trace each version's forward is copied from
        self._template_config: object = None

    def build(self, model: Ranker) -> RankingForward:
        """The ranking forward of ``model`` (in eval mode, never trained afterwards)."""
        eager = _Logits(model).eval()
        if self.kind is ForwardKind.EAGER:
            return RankingForward(ForwardKind.EAGER, eager, 0.0)
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "torch.jit.trace is deprecated": said in the module docstring
                if self._template is None or self._template_config != model.config:
                    self._template = torch.jit.trace(eager, probe_inputs(model, 16, seed=0), check_trace=False)
                    self._template_config = model.config
                    # TorchScript's executor profiles a graph's first call and optimises it on the second
                    # (~0.1 s); the optimised graph is shared by every copy below, so do it here, once.
                    warm = probe_inputs(model, 64, seed=2)
                    for _ in range(WARMUP_CALLS):
                        self._template(*warm)
                # A copy of the trace with this version's tensors (the copy's own tensors are replaced, the
                # template and the versions being served are untouched): ~20 ms, where tracing afresh
                # is 0.2-0.5 s and freezing 0.1 s of C++ that holds the GIL (it stalled requests).
                fn = copy.deepcopy(self._template)
                _rebind(fn, eager)
                check = probe_inputs(model, 37, seed=1)
                diff = float((fn(*check) - eager(*check)).abs().max())
            if not diff <= self.tolerance:  # also catches NaN
                raise ForwardMismatch(f"traced forward differs from eager by {diff:.3g} > {self.tolerance:g}")
        except Exception as exc:  # a model TorchScript cannot trace, or a mismatch: serve it eager
            self._template = None
            return RankingForward(ForwardKind.EAGER, eager, time.perf_counter() - t0,
                                  fallback=f"{type(exc).__name__}: {exc}"[:300])
        return RankingForward(ForwardKind.TORCHSCRIPT, fn, time.perf_counter() - t0)


def build_forward(model: Ranker, kind: ForwardKind = ForwardKind.TORCHSCRIPT) -> RankingForward:
    """One version's ranking forward, traced afresh (``ForwardBuilder`` re-uses the trace across versions)."""
    return ForwardBuilder(kind).build(model)


def _rebind(script: torch.jit.ScriptModule, module: nn.Module) -> None:
    """Point every parameter and buffer of the traced ``script`` at ``module``'s tensors of the same name."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        *path, leaf = name.split(".")
        owner = script
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, leaf, tensor)
