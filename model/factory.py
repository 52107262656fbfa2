"""Build a ranker from a spec and a config; count its parameters and measure its FLOPs.

>>> from model.spec import default_live_spec
>>> from model.config import Arch, Size, preset
>>> spec = default_live_spec()
>>> model = build_model(spec, preset(Arch.ZENITH, Size.S, spec))
>>> params = count_params(model)
>>> params.dense > 0 and params.sparse > params.dense
True
>>> flops_per_sample(model, spec) > 2 * params.dense * 0.5   # measured, roughly 2 FLOPs per dense weight
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.baselines import BASELINES
from model.batch import Batch, SampleArrays
from model.config import Arch, ModelConfig
from model.ranker import Ranker
from model.spec import FeatureSpec
from model.zenith import ZenithRanker


def build_model(spec: FeatureSpec, config: ModelConfig, device: torch.device | str | None = None) -> Ranker:
    """A freshly initialised ranker; the same (spec, config) -- including ``config.seed`` -- gives the same
    weights on every run."""
    config.validate(spec)
    with torch.random.fork_rng(devices=[]):  # seed locally: building a model never disturbs the caller's RNG
        torch.manual_seed(config.seed)
        model: Ranker = ZenithRanker(spec, config) if config.arch in (Arch.ZENITH, Arch.ZENITH_PP) \
            else BASELINES[config.arch](spec, config)
    return model.to(device or default_device())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ParamCount:
    dense: int  # everything trained by the dense optimizer (tokenizer projections, body, heads)
    sparse: int  # embedding-table rows (trained row-wise by the sparse optimizer)

    @property
    def total(self) -> int:
        return self.dense + self.sparse


def count_params(model: Ranker) -> ParamCount:
    sparse = sum(p.numel() for p in model.sparse_parameters())
    return ParamCount(dense=sum(p.numel() for p in model.dense_parameters()), sparse=sparse)


def random_arrays(spec: FeatureSpec, n: int, seed: int = 0, id_range: int = 10_000) -> SampleArrays:
    """Shape-correct random feature records (no signal): for FLOP counts, latency benches and shape tests."""
    rng = np.random.default_rng(seed)
    seqs = rng.integers(1, id_range, (n, spec.n_seqs, spec.seq_len))
    seqs[:, :, spec.seq_len // 2:] = 0  # realistic padding
    return SampleArrays(
        ids=rng.integers(1, id_range, (n, spec.n_ids)), seqs=seqs,
        dense=rng.random((n, spec.n_dense), dtype=np.float32),
        labels=(rng.random((n, len(spec.tasks))) < 0.2).astype(np.float32),
        user=rng.integers(0, 100, n), event_ms=np.arange(n, dtype=np.int64),
    )


def flops_per_sample(model: Ranker, spec: FeatureSpec, batch_size: int = 16) -> float:
    """Forward (inference) FLOPs per sample, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    It counts matrix products (linear, einsum, bmm, attention); embedding gathers and elementwise ops are
    not FLOPs to it. Training costs about 3x this (forward + two backward products).
    """
    device = next(model.parameters()).device
    batch = Batch.from_arrays(random_arrays(spec, batch_size), device)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(batch)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / batch_size
