"""The labelled sample record on the ``samples`` topic: fixed-width binary, batch-decodable in one call.

Each record is one row of a numpy structured dtype derived from the feature spec, so the trainer turns a
poll of N messages into column arrays with a single ``np.frombuffer`` over the joined bytes, no per-field
parsing. The header carries a format version and the spec fingerprint: a trainer built for another
layout refuses the record instead of learning garbage.

>>> spec = default_live_spec()
>>> codec = SampleCodec(spec)
>>> row = FeatureRow(np.ones(spec.n_ids, np.int64), np.zeros((spec.n_seqs, spec.seq_len), np.int64),
...                  np.zeros(spec.n_dense, np.float32))
>>> raw = codec.encode("imp-1", row, Labels(entered=True, watch_s=42.0), event_ms=1, emitted_ms=2)
>>> d = codec.decode([raw, raw])
>>> d.arrays.labels[0].tolist(), d.impression_ids[0]
([1.0, 1.0, 0.0, 0.0, 0.0], 'imp-1')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.batch import SampleArrays
from model.spec import FeatureSpec, default_live_spec
from stream.features import FeatureRow

__all__ = ["Labels", "SampleCodec", "DecodedSamples", "SampleFormatError", "LONG_VIEW_S", "default_live_spec"]

FORMAT_VERSION = 1
LONG_VIEW_S = 30.0  # a watch at least this long counts as a long view
_ID_BYTES = 48


class SampleFormatError(ValueError):
    pass


@dataclass
class Labels:
    """Everything the label join learned about one impression within its attribution window."""

    entered: bool = False
    watch_s: float = 0.0
    liked: bool = False
    commented: bool = False
    followed: bool = False
    gifted: bool = False
    gift_value: float = 0.0

    def columns(self) -> dict[str, float]:
        return {
            "entered": float(self.entered),
            "long_view": float(self.watch_s >= LONG_VIEW_S),
            "liked": float(self.liked),
            "commented": float(self.commented),
            "followed": float(self.followed),
            "gifted": float(self.gifted),
        }


@dataclass
class DecodedSamples:
    arrays: SampleArrays
    impression_ids: list[str]
    emitted_ms: np.ndarray  # when the stream emitted each sample (freshness: event -> sample)
    watch_s: np.ndarray


class SampleCodec:
    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.fingerprint = spec.fingerprint()
        self.dtype = np.dtype([
            ("version", "u1"), ("fingerprint", "<u4"), ("impression_id", f"S{_ID_BYTES}"),
            ("event_ms", "<i8"), ("emitted_ms", "<i8"), ("watch_s", "<f4"),
            ("labels", "<f4", (len(spec.tasks),)),
            ("ids", "<i8", (spec.n_ids,)),
            ("seqs", "<i8", (spec.n_seqs, spec.seq_len)),
            ("dense", "<f4", (spec.n_dense,)),
        ])
        self._user_col = spec.id_index("user_id")

    @property
    def record_size(self) -> int:
        return self.dtype.itemsize

    def encode(self, impression_id: str, row: FeatureRow, labels: Labels, event_ms: int,
               emitted_ms: int) -> bytes:
        rec = np.zeros((), dtype=self.dtype)
        cols = labels.columns()
        rec["version"], rec["fingerprint"] = FORMAT_VERSION, self.fingerprint
        rec["impression_id"] = impression_id.encode()[:_ID_BYTES]
        rec["event_ms"], rec["emitted_ms"], rec["watch_s"] = event_ms, emitted_ms, labels.watch_s
        rec["labels"] = [cols[name] for name in self.spec.label_names]
        rec["ids"], rec["seqs"], rec["dense"] = row.ids, row.seqs, row.dense
        return rec.tobytes()

    def decode(self, records: Sequence[bytes]) -> DecodedSamples:
        bad = next((i for i, r in enumerate(records) if len(r) != self.record_size), None)
        if bad is not None:
            raise SampleFormatError(
                f"record {bad} has {len(records[bad])} bytes, this spec's records have {self.record_size}; "
                "the producer runs another feature spec"
            )
        rows = np.frombuffer(b"".join(records), dtype=self.dtype)
        if len(rows) and ((rows["version"] != FORMAT_VERSION).any()
                          or (rows["fingerprint"] != self.fingerprint).any()):
            raise SampleFormatError("sample format version or feature-spec fingerprint does not match this build")
        arrays = SampleArrays(
            ids=rows["ids"].copy(), seqs=rows["seqs"].copy(), dense=rows["dense"].copy(),
            labels=rows["labels"].copy(), user=rows["ids"][:, self._user_col].copy(),
            event_ms=rows["event_ms"].copy(),
        )
        ids = [x.decode() for x in rows["impression_id"]]
        return DecodedSamples(arrays, ids, rows["emitted_ms"].copy(), rows["watch_s"].copy())
