"""Reference baselines: the floor every neural model is compared against, on the same samples and the same
test-then-train protocol (:func:`model.prequential.run_prequential`).

Both implement :class:`model.prequential.Learner` -- a ``spec`` and ``step(part) -> StepResult`` returning
the probabilities for ``part`` made *before* learning from its labels -- so the benchmark drives them and
the neural models through one loop, batch by batch.

* :class:`CountingLearner` -- smoothed per-user and per-item click rates (Bayesian average towards the
  global running rate), combined in logit space: ``logit(p_user) + logit(p_item) - logit(p_global)``,
  one set of counters per task. What a user could build in an afternoon.
* :class:`FTRLLearner` -- online logistic regression, FTRL-Proximal (McMahan et al. 2013) over hashed ids,
  their pairwise crosses and the dense features; River's ``LogisticRegression`` with
  ``optim.FTRLProximal``, one model per task. River is an optional dependency (the ``bench`` extra);
  :func:`river_available` says whether it is installed.

Progressive validation of the counting baseline on the planted-signal stream (River's
``progressive_val_score`` in spirit):

>>> from model.prequential import run_prequential
>>> from model.spec import default_live_spec
>>> from model.synthetic import make_synthetic
>>> spec = default_live_spec()
>>> arrays = make_synthetic(spec, 4000, seed=0).arrays
>>> report = run_prequential(CountingLearner(spec), arrays, batch_size=256)
>>> report.main()["auc"] > 0.6, report.main()["logloss"] < constant_rate_logloss(arrays.labels[:, 0])
(True, True)
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from model.batch import SampleArrays
from model.prequential import StepResult
from model.spec import FeatureSpec

_EPS = 1e-6


class Reference(StrEnum):
    """The reference rows of ``zenith bench quality``."""

    COUNTING = "counting"
    FTRL = "lr-ftrl"


def river_available() -> bool:
    """True when River (the ``bench`` extra) is importable, so :class:`FTRLLearner` can run."""
    return importlib.util.find_spec("river") is not None


def constant_rate_logloss(labels: np.ndarray) -> float:
    """Logloss of the best *constant* predictor (the label mean, known in hindsight): a floor to beat.

    >>> round(constant_rate_logloss(np.array([0, 0, 0, 1])), 4)
    0.5623
    """
    y = np.asarray(labels, dtype=np.float64)
    p = min(max(float(y.mean()), _EPS), 1 - _EPS)
    return float(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _result(probs: np.ndarray, labels: np.ndarray) -> StepResult:
    p = np.clip(probs, _EPS, 1 - _EPS)
    task_losses = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean(0)
    return StepResult(probs=probs.astype(np.float32), loss=float(task_losses.sum()), aux_loss=0.0,
                      task_losses=task_losses.astype(np.float32))


class _Counts:
    """Impressions and positives (per task) per id, in growable arrays indexed through a dict."""

    def __init__(self, n_tasks: int) -> None:
        self.index: dict[int, int] = {}
        self.n = np.zeros(1024)
        self.pos = np.zeros((1024, n_tasks))

    def rows(self, ids: np.ndarray, add: bool) -> np.ndarray:
        """Row of every id (-1 for unseen ones unless ``add``)."""
        get = self.index.get
        if not add:
            return np.fromiter((get(i, -1) for i in ids.tolist()), np.int64, len(ids))
        out = np.empty(len(ids), np.int64)
        for k, i in enumerate(ids.tolist()):
            r = get(i)
            if r is None:
                r = self.index[i] = len(self.index)
            out[k] = r
        if len(self.index) > len(self.n):  # grow geometrically
            size = max(2 * len(self.n), len(self.index))
            self.n = np.resize(self.n, size)
            self.n[len(self.index):] = 0  # resize repeats content; zero the new rows
            self.pos = np.concatenate([self.pos, np.zeros((size - len(self.pos), self.pos.shape[1]))])
        return out

    def stats(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = self.rows(ids, add=False)
        seen = r >= 0
        n = np.where(seen, self.n[np.maximum(r, 0)], 0.0)
        pos = np.where(seen[:, None], self.pos[np.maximum(r, 0)], 0.0)
        return n, pos

    def add(self, ids: np.ndarray, labels: np.ndarray) -> None:
        r = self.rows(ids, add=True)
        np.add.at(self.n, r, 1.0)
        np.add.at(self.pos, r, labels)


@dataclass(frozen=True)
class CountingConfig:
    prior_strength: float = 10.0  # pseudo-impressions at the global rate: how much evidence moves a rate
    user_feature: str = "user_id"
    item_feature: str = "room_id"


class CountingLearner:
    """Smoothed per-user and per-item rates combined in logit space, one set of counters per task.

    ``p_x = (positives_x + m * p_global) / (impressions_x + m)`` with ``m = prior_strength`` and
    ``p_global`` the global running rate (Laplace-smoothed), and the prediction is
    ``sigmoid(logit(p_user) + logit(p_item) - logit(p_global))`` -- naive Bayes' way of combining two
    pieces of evidence about one base rate. A batch is scored with the counts of the rows before it.

    >>> from model.spec import default_live_spec
    >>> spec = default_live_spec()
    >>> learner = CountingLearner(spec)
    >>> part = SampleArrays(np.ones((2, spec.n_ids), np.int64), np.zeros((2, spec.n_seqs, spec.seq_len), np.int64),
    ...                     np.zeros((2, spec.n_dense), np.float32), np.ones((2, len(spec.tasks)), np.float32),
    ...                     np.ones(2, np.int64), np.arange(2))
    >>> learner.step(part).probs[:, 0].tolist()   # nothing seen yet: the prior, 0.5
    [0.5, 0.5]
    >>> bool(learner.step(part).probs[0, 0] > 0.5)   # user 1 and item 1 clicked twice, global rate 3/4
    True
    """

    def __init__(self, spec: FeatureSpec, config: CountingConfig | None = None) -> None:
        self.spec = spec
        self.config = cfg = config or CountingConfig()
        if cfg.prior_strength <= 0:
            raise ValueError(f"prior_strength must be positive, got {cfg.prior_strength}")
        names = {f.name for f in spec.ids}
        for f in (cfg.user_feature, cfg.item_feature):
            if f not in names:
                raise ValueError(f"the spec has no id feature {f!r}; it has {sorted(names)}")
        self._cols = spec.id_index(cfg.user_feature), spec.id_index(cfg.item_feature)
        n_tasks = len(spec.tasks)
        self._users, self._items = _Counts(n_tasks), _Counts(n_tasks)
        self._n, self._pos = 0.0, np.zeros(n_tasks)

    def predict(self, part: SampleArrays) -> np.ndarray:
        m = self.config.prior_strength
        p_g = (self._pos + 1.0) / (self._n + 2.0)  # [T]
        z = -_logit(p_g)[None, :]
        for counts, col in zip((self._users, self._items), self._cols, strict=True):
            n, pos = counts.stats(part.ids[:, col])
            z = z + _logit((pos + m * p_g) / (n[:, None] + m))
        return 1.0 / (1.0 + np.exp(-z))

    def learn(self, part: SampleArrays) -> None:
        labels = part.labels.astype(np.float64)
        self._users.add(part.ids[:, self._cols[0]], labels)
        self._items.add(part.ids[:, self._cols[1]], labels)
        self._n += len(part)
        self._pos += labels.sum(0)

    def step(self, part: SampleArrays) -> StepResult:
        probs = self.predict(part)
        self.learn(part)
        return _result(probs, part.labels)


class DenseInput(StrEnum):
    RAW = "raw"  # the dense values as the stream writes them (already log1p / ratios)
    RAW_AND_LOGIT_RATES = "raw+logit"  # plus logit(rate) for the rate features: a linear model's natural scale


@dataclass(frozen=True)
class FTRLConfig:
    """FTRL-Proximal per-coordinate hyper-parameters (River's names and defaults) and the feature map."""

    alpha: float = 0.05
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 1.0
    hash_bits: int = 22  # ids and crosses are hashed into 2**hash_bits weights per task
    crosses: bool = True  # every pair of present id features, hashed (user x room, user x hour, ...)
    sequences: bool = True  # behaviour sequences as hashed bags of items, each weighing 1/sqrt(bag length)
    dense: DenseInput = DenseInput.RAW_AND_LOGIT_RATES
    # which dense features are rates in (0, 1); None: those the spec marks ``kind="rate"``, or for a spec
    # without kinds, the names ending in _ctr / _rate
    rate_features: tuple[str, ...] | None = None
    # River's FTRL computes a coordinate's weight from z and n *before* adding the current gradient, so the
    # weight it predicts with lags one occurrence (an id seen once still weighs 0 at its second impression).
    # On a log where most ids are seen a handful of times that costs a lot; settling the touched weights
    # after each update gives McMahan et al.'s Algorithm 1 exactly. Off: River as shipped.
    settle_weights: bool = True

    def __post_init__(self) -> None:
        if self.alpha <= 0 or self.beta < 0 or self.l1 < 0 or self.l2 < 0:
            raise ValueError(f"FTRL needs alpha > 0 and beta, l1, l2 >= 0; got {self}")
        if not 8 <= self.hash_bits <= 30:
            raise ValueError(f"hash_bits must be in [8, 30], got {self.hash_bits}")


def _rate_features(spec: FeatureSpec, names: tuple[str, ...] | None) -> tuple[str, ...]:
    if names is not None:
        return names
    kinds = {d.name: str(getattr(d, "kind", "")) for d in spec.dense}
    if any(k == "rate" for k in kinds.values()):
        return tuple(n for n, k in kinds.items() if k == "rate")
    return tuple(n for n in kinds if n.endswith(("_ctr", "_rate")))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (a good, fast hash of int64 keys)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class FTRLLearner:
    """Online logistic regression per task: River ``LogisticRegression(optimizer=FTRLProximal(...))``.

    Features of a row (a sparse dict, as River takes them): a bias, one-hot hashed ids (missing ids,
    ``0``, are left out), hashed pairwise crosses of the present ids, the behaviour sequences as hashed
    bags, and the dense features (raw, plus the logit of the rate features) -- what the neural models
    get. The bias is one more FTRL coordinate rather than River's separately SGD-updated intercept, so
    every weight follows the same per-coordinate schedule. Within a batch all rows are scored first,
    then learned one by one, in order.

    >>> from model.spec import default_live_spec
    >>> spec = default_live_spec()
    >>> learner = FTRLLearner(spec)
    >>> part = SampleArrays(np.ones((2, spec.n_ids), np.int64), np.zeros((2, spec.n_seqs, spec.seq_len), np.int64),
    ...                     np.zeros((2, spec.n_dense), np.float32), np.ones((2, len(spec.tasks)), np.float32),
    ...                     np.ones(2, np.int64), np.arange(2))
    >>> learner.step(part).probs[:, 0].tolist()   # before any label: 0.5
    [0.5, 0.5]
    >>> bool(learner.step(part).probs[0, 0] > 0.5)   # the same row, after learning it was clicked
    True
    """

    def __init__(self, spec: FeatureSpec, config: FTRLConfig | None = None) -> None:
        if not river_available():
            raise ModuleNotFoundError("FTRLLearner needs River: pip install 'zenith-live[bench]' (or river)")
        from river import linear_model, optim

        self.spec = spec
        self.config = cfg = config or FTRLConfig()
        self.models = [
            linear_model.LogisticRegression(
                optimizer=optim.FTRLProximal(alpha=cfg.alpha, beta=cfg.beta, l1=cfg.l1, l2=cfg.l2),
                intercept_lr=0.0)  # the bias is an FTRL coordinate (see the class docstring)
            for _ in spec.tasks
        ]
        mask = (1 << cfg.hash_bits) - 1
        self._mask = np.uint64(mask)
        dense_names = [d.name for d in spec.dense]
        # dense coordinates live above the hashed range, so they never collide with an id
        self._bias_key = mask + 1
        self._dense_keys = [mask + 2 + j for j in range(spec.n_dense)]
        rates = [n for n in _rate_features(spec, cfg.rate_features) if n in dense_names] \
            if cfg.dense is DenseInput.RAW_AND_LOGIT_RATES else []
        self._rate_cols = [spec.dense_index(n) for n in rates]
        self._rate_keys = [mask + 2 + spec.n_dense + j for j in range(len(rates))]
        self._pairs = list(itertools.combinations(range(spec.n_ids), 2)) if cfg.crosses else []

    def features(self, part: SampleArrays) -> list[dict[int, float]]:
        """The sparse feature dict of every row (hashed int keys -> values)."""
        ids = part.ids.astype(np.int64)
        present = ids != 0
        seed = np.arange(1, ids.shape[1] + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        with np.errstate(over="ignore"):
            h = _mix(ids.astype(np.uint64) + seed[None, :])  # [B, n_ids], feature-salted
            cols = [h & self._mask]
            keep = [present]
            for a, b in self._pairs:
                cols.append((_mix(h[:, a] * np.uint64(31) + h[:, b] + np.uint64(0xD1B54A32D192ED03)) & self._mask)
                            [:, None])
                keep.append((present[:, a] & present[:, b])[:, None])
            if self.config.sequences:
                seqs = part.seqs.astype(np.int64)  # [B, n_seqs, L]
                salt = (np.arange(1, seqs.shape[1] + 1, dtype=np.uint64) * np.uint64(0xA0761D6478BD642F))
                hs = _mix(seqs.astype(np.uint64) + salt[None, :, None]) & self._mask
                cols.append(hs.reshape(len(part), -1))
                keep.append((seqs != 0).reshape(len(part), -1))
                seq_len = np.maximum((seqs != 0).sum(2), 1)  # [B, n_seqs]
                seq_w = np.repeat(1.0 / np.sqrt(seq_len), seqs.shape[2], axis=1)  # [B, n_seqs * L]
        keys = np.concatenate(cols, axis=1).astype(np.int64)
        ok = np.concatenate(keep, axis=1)
        n_single = keys.shape[1] - (seq_w.shape[1] if self.config.sequences else 0)
        values = np.ones(keys.shape)
        if self.config.sequences:
            values[:, n_single:] = seq_w
        dense = part.dense.astype(np.float64)
        logits = _logit(dense[:, self._rate_cols]) if self._rate_cols else np.zeros((len(part), 0))
        out = []
        for r in range(len(part)):
            x = dict(zip(keys[r, ok[r]].tolist(), values[r, ok[r]].tolist(), strict=True))
            x[self._bias_key] = 1.0
            x.update(zip(self._dense_keys, dense[r].tolist(), strict=True))
            x.update(zip(self._rate_keys, logits[r].tolist(), strict=True))
            out.append(x)
        return out

    def _settle(self, model: Any, x: dict[int, float]) -> None:
        """Set the weights of ``x``'s coordinates from the current z, n (McMahan et al., Algorithm 1)."""
        opt, w = model.optimizer, model._weights  # noqa: SLF001 - River keeps them there; see FTRLConfig
        a, b, l1, l2 = opt.alpha, opt.beta, opt.l1, opt.l2
        z, n = opt.z, opt.n
        for i in x:
            zi = z[i]
            w[i] = 0.0 if abs(zi) <= l1 else -(zi - math.copysign(l1, zi)) / ((b + math.sqrt(n[i])) / a + l2)

    def step(self, part: SampleArrays) -> StepResult:
        xs = self.features(part)
        probs = np.array([[m.predict_proba_one(x)[True] for m in self.models] for x in xs])
        settle = self.config.settle_weights
        for x, y in zip(xs, (part.labels > 0.5).tolist(), strict=True):
            for m, yy in zip(self.models, y, strict=True):
                m.learn_one(x, yy)
                if settle:
                    self._settle(m, x)
        return _result(probs, part.labels)


def make_reference(kind: Reference, spec: FeatureSpec) -> CountingLearner | FTRLLearner:
    """A fresh reference learner of ``kind`` with its default configuration."""
    if kind is Reference.COUNTING:
        return CountingLearner(spec)
    if kind is Reference.FTRL:
        return FTRLLearner(spec)
    raise ValueError(f"unknown reference {kind!r}; choose from {[r.value for r in Reference]}")


__all__ = ["CountingConfig", "CountingLearner", "DenseInput", "FTRLConfig", "FTRLLearner", "Reference",
           "constant_rate_logloss", "make_reference", "river_available"]
