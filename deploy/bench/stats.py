"""One percentile helper for every bench."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal


def percentile(values: Iterable[float], q: float, *, method: Literal["linear", "rank"] = "linear",
               empty: float | None = None) -> float | None:
    """The ``q``-quantile (0 <= q <= 1) of ``values``; ``empty`` when there are none.

    ``linear``: interpolation between the closest ranks (numpy's default, ``np.percentile(v, 100 * q)``).
    ``rank``: the sorted value at index ``floor(q * n)`` (no interpolation; the serve bench's latencies).

    >>> percentile([1, 2, 3, 4], 0.5), percentile([1, 2, 3, 4], 0.5, method="rank")
    (2.5, 3)
    >>> percentile([], 0.99) is None
    True
    """
    s = sorted(values)
    if not s:
        return empty
    if method == "rank":
        return s[min(len(s) - 1, int(q * len(s)))]
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
