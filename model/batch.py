"""Column-oriented sample arrays (numpy) and the tensor batch the models consume.

``SampleArrays`` is what the stream's sample codec decodes into and what offline datasets are cached as;
``Batch`` is the same thing as tensors on a device. Rows are in time order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.spec import FeatureSpec


@dataclass
class SampleArrays:
    ids: np.ndarray  # int64 [N, n_ids]
    seqs: np.ndarray  # int64 [N, n_seqs, seq_len]
    dense: np.ndarray  # float32 [N, n_dense]
    labels: np.ndarray  # float32 [N, n_tasks], columns in spec.tasks order
    user: np.ndarray  # int64 [N], for user-averaged AUC
    event_ms: np.ndarray  # int64 [N], impression time (the data watermark)

    def __len__(self) -> int:
        return len(self.user)

    def __getitem__(self, rows: slice | np.ndarray) -> SampleArrays:
        return SampleArrays(
            self.ids[rows], self.seqs[rows], self.dense[rows], self.labels[rows], self.user[rows],
            self.event_ms[rows],
        )

    def batches(self, size: int) -> Iterator[SampleArrays]:
        for start in range(0, len(self), size):
            yield self[start : start + size]

    def check(self, spec: FeatureSpec) -> None:
        n = len(self)
        assert self.ids.shape == (n, spec.n_ids), f"ids shape {self.ids.shape} != ({n}, {spec.n_ids})"
        assert self.seqs.shape == (n, spec.n_seqs, spec.seq_len), f"seqs shape {self.seqs.shape} is off"
        assert self.dense.shape == (n, spec.n_dense), f"dense shape {self.dense.shape} is off"
        assert self.labels.shape == (n, len(spec.tasks)), f"labels shape {self.labels.shape} is off"

    @staticmethod
    def concat(parts: list[SampleArrays]) -> SampleArrays:
        return SampleArrays(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))

    def save(self, path: str | Path) -> None:
        np.savez(path, **{f: getattr(self, f) for f in _FIELDS})

    @staticmethod
    def load(path: str | Path) -> SampleArrays:
        with np.load(path) as z:
            return SampleArrays(*(z[f] for f in _FIELDS))


_FIELDS = ("ids", "seqs", "dense", "labels", "user", "event_ms")


@dataclass
class Batch:
    ids: torch.Tensor
    seqs: torch.Tensor
    dense: torch.Tensor
    labels: torch.Tensor
    user: torch.Tensor

    @staticmethod
    def from_arrays(a: SampleArrays, device: torch.device | str = "cpu") -> Batch:
        def t(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x)).to(device, non_blocking=True)

        return Batch(t(a.ids), t(a.seqs), t(a.dense), t(a.labels), t(a.user))

    def __len__(self) -> int:
        return self.ids.shape[0]
