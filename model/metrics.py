"""Streaming (prequential) ranking metrics with a small River-style protocol: ``update(...)`` then ``get()``.

Each metric takes ``update(y_true, y_prob, user=None)`` with scalars or 1-d arrays, and ``get()`` returns a
float (``nan`` until it is defined, e.g. AUC before both classes were seen). What is exact and what is not:

* :class:`AUC` keeps a fixed histogram of scores on the logit scale (``bins`` over logit ``[-12, 12]``);
  pairs in one bin count as ties, so it is **approximate** (with 8192 bins the error is far below the
  noise of any real comparison) and its memory is bounded forever.
* :class:`WindowAUC`, :class:`WindowLogLoss` and :class:`UAUC` keep the last ``window`` samples (per user
  for UAUC) and compute **exactly** on what they keep.
* :class:`LogLoss` is exact (a running mean).

>>> auc = AUC()
>>> auc.update([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6])
>>> round(auc.get(), 6)
1.0
>>> ll = LogLoss(); ll.update([1, 0], [0.5, 0.5]); round(ll.get(), 4)
0.6931
>>> u = UAUC(); u.update([0, 1, 0, 1], [0.2, 0.1, 0.4, 0.9], user=[7, 7, 8, 8]); u.get()   # user 7: 0, user 8: 1
0.5
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

_EPS = 1e-7
_LOGIT_MAX = 12.0


def _arr(x: float | Iterable[float], dtype: type = np.float64) -> np.ndarray:
    return np.atleast_1d(np.asarray(x, dtype=dtype))


def auc_exact(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Exact ROC AUC by ranks (ties get half credit); ``nan`` if only one class is present.

    >>> auc_exact(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    y = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_prob, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sp = p[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # average rank within runs of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sp)) + 1]
    ends = np.r_[starts[1:], len(sp)]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(y_prob, dtype=np.float64), _EPS, 1 - _EPS)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else float("nan")


class AUC:
    """Overall streaming AUC from score histograms on the logit scale (approximate, bounded memory)."""

    def __init__(self, bins: int = 8192) -> None:
        self.bins = bins
        self.pos = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)

    def update(self, y_true, y_prob, user=None) -> None:  # noqa: ARG002 - user is part of the protocol
        y = _arr(y_true) > 0.5
        p = np.clip(_arr(y_prob), _EPS, 1 - _EPS)
        z = np.clip(np.log(p / (1 - p)), -_LOGIT_MAX, _LOGIT_MAX)
        b = np.minimum(((z + _LOGIT_MAX) / (2 * _LOGIT_MAX) * self.bins).astype(np.int64), self.bins - 1)
        self.pos += np.bincount(b[y], minlength=self.bins)
        self.neg += np.bincount(b[~y], minlength=self.bins)

    def get(self) -> float:
        n_pos, n_neg = self.pos.sum(), self.neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(self.neg) - self.neg  # negatives in strictly lower bins
        return float((self.pos * (neg_below + 0.5 * self.neg)).sum() / (n_pos * n_neg))


class LogLoss:
    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def update(self, y_true, y_prob, user=None) -> None:  # noqa: ARG002
        y = _arr(y_true)
        self.total += logloss(y, _arr(y_prob)) * len(y)
        self.n += len(y)

    def get(self) -> float:
        return self.total / self.n if self.n else float("nan")


class _Window:
    def __init__(self, window: int) -> None:
        assert window > 0, f"window must be positive, got {window}"
        self.window = window
        self.y: deque[float] = deque(maxlen=window)
        self.p: deque[float] = deque(maxlen=window)

    def update(self, y_true, y_prob, user=None) -> None:  # noqa: ARG002
        self.y.extend(_arr(y_true).tolist())
        self.p.extend(_arr(y_prob).tolist())


class WindowAUC(_Window):
    """Exact AUC over the last ``window`` samples."""

    def get(self) -> float:
        return auc_exact(np.fromiter(self.y, float), np.fromiter(self.p, float))


class WindowLogLoss(_Window):
    """Exact logloss over the last ``window`` samples."""

    def get(self) -> float:
        return logloss(np.fromiter(self.y, float), np.fromiter(self.p, float))


class UAUC:
    """User-averaged AUC: the unweighted mean of per-user AUC over users with both classes.

    Keeps each user's last ``per_user`` samples (exact on those), and at most ``max_users`` users (the
    least recently seen are dropped), so memory is bounded on an endless stream.
    """

    def __init__(self, per_user: int = 1000, max_users: int = 1_000_000) -> None:
        self.per_user, self.max_users = per_user, max_users
        self.users: dict[int, deque[tuple[float, float]]] = {}

    def update(self, y_true, y_prob, user=None) -> None:
        assert user is not None, "UAUC needs the user of every sample: update(y, p, user=...)"
        y, p, u = _arr(y_true), _arr(y_prob), _arr(user, np.int64)
        for uid, yy, pp in zip(u.tolist(), y.tolist(), p.tolist(), strict=True):
            d = self.users.pop(uid, None)  # pop + reinsert keeps dict order = recency
            if d is None:
                d = deque(maxlen=self.per_user)
            d.append((yy, pp))
            self.users[uid] = d
        while len(self.users) > self.max_users:
            self.users.pop(next(iter(self.users)))

    def get(self) -> float:
        aucs = []
        for d in self.users.values():
            ys = [y for y, _ in d]
            s = sum(ys)
            if 0 < s < len(ys):
                aucs.append(auc_exact(np.array(ys), np.array([p for _, p in d])))
        return float(np.mean(aucs)) if aucs else float("nan")

    def n_users(self) -> int:
        """Users with both classes (the ones the mean is over)."""
        return sum(1 for d in self.users.values() if 0 < sum(y for y, _ in d) < len(d))


@dataclass
class TaskMetrics:
    """Overall + trailing-window AUC, UAUC and logloss for one task."""

    window: int = 10_000
    auc: AUC = field(default_factory=AUC)
    logloss: LogLoss = field(default_factory=LogLoss)
    uauc: UAUC = field(default_factory=UAUC)

    def __post_init__(self) -> None:
        self.window_auc, self.window_logloss = WindowAUC(self.window), WindowLogLoss(self.window)
        self.window_uauc = _WindowUAUC(self.window)
        self.n = 0
        self.positives = 0.0

    def update(self, y_true, y_prob, user=None) -> None:
        y = _arr(y_true)
        self.n += len(y)
        self.positives += float(y.sum())
        for m in (self.auc, self.logloss, self.uauc, self.window_auc, self.window_logloss, self.window_uauc):
            m.update(y_true, y_prob, user)

    def get(self) -> dict[str, float]:
        return {"auc": self.auc.get(), "uauc": self.uauc.get(), "logloss": self.logloss.get(),
                "window_auc": self.window_auc.get(), "window_uauc": self.window_uauc.get(),
                "window_logloss": self.window_logloss.get(), "n": self.n,
                "positive_rate": self.positives / self.n if self.n else math.nan}


class _WindowUAUC(_Window):
    """Exact UAUC over the last ``window`` samples."""

    def __init__(self, window: int) -> None:
        super().__init__(window)
        self.u: deque[int] = deque(maxlen=window)

    def update(self, y_true, y_prob, user=None) -> None:
        super().update(y_true, y_prob)
        self.u.extend(_arr(user, np.int64).tolist())

    def get(self) -> float:
        return uauc_exact(np.fromiter(self.y, float), np.fromiter(self.p, float), np.fromiter(self.u, np.int64))


def uauc_exact(y_true: np.ndarray, y_prob: np.ndarray, user: np.ndarray) -> float:
    """Mean per-user AUC over users with both classes (vectorised grouping; exact)."""
    if len(user) == 0:
        return float("nan")
    order = np.argsort(user, kind="stable")
    u, y, p = user[order], np.asarray(y_true)[order], np.asarray(y_prob)[order]
    cuts = np.flatnonzero(np.diff(u)) + 1
    aucs = [auc_exact(yy, pp) for yy, pp in zip(np.split(y, cuts), np.split(p, cuts), strict=True)
            if 0 < yy.sum() < len(yy)]
    return float(np.mean(aucs)) if aucs else float("nan")


class MultiTaskMetrics:
    """One :class:`TaskMetrics` per task name; ``update`` takes ``[N, n_tasks]`` labels and probabilities."""

    def __init__(self, task_names: Sequence[str], window: int = 10_000) -> None:
        self.names = list(task_names)
        self.tasks = {name: TaskMetrics(window=window) for name in self.names}

    def update(self, labels: np.ndarray, probs: np.ndarray, user: np.ndarray) -> None:
        assert labels.shape == probs.shape and labels.shape[1] == len(self.names), (
            f"labels {labels.shape} and probs {probs.shape} must both be [N, {len(self.names)}]")
        for j, name in enumerate(self.names):
            self.tasks[name].update(labels[:, j], probs[:, j], user)

    def get(self) -> dict[str, dict[str, float]]:
        return {name: m.get() for name, m in self.tasks.items()}


__all__ = ["AUC", "LogLoss", "MultiTaskMetrics", "TaskMetrics", "UAUC", "WindowAUC", "WindowLogLoss",
           "auc_exact", "logloss", "uauc_exact"]
