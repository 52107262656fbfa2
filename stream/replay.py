"""The public KuaiRand log as a stream of our events, in time order.

Each CSV row is an impression at ``time_ms`` followed shortly by its engagements: click -> enter (+0.5 s),
then like / follow / comment (+1 s) and, for clicked rows, a watch carrying the play time (+1.5 s). The
"shortly after" offsets keep every label inside any sensible attribution window, so a replay's samples
carry the log's own labels. KuaiRand is short video: a video stands in for a live room, it has no author
or category in this file, and the tab column is the context.
"""

from __future__ import annotations

import csv
import heapq
import itertools
from collections.abc import Iterator
from pathlib import Path

from stream.events import Engagement, EngagementKind, Event, Impression

REQUIRED = ("user_id", "video_id", "time_ms", "is_click", "is_like", "is_follow", "is_comment", "play_time_ms",
            "hourmin", "tab")


def kuairand_events(path: str | Path, limit: int | None = None) -> Iterator[Event]:
    """Yield the log's events in timestamp order (ties keep row order); ``limit``: the first N rows only."""
    seq = itertools.count()
    heap: list[tuple[int, int, Event]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a KuaiRand log, columns {missing} are missing")
        for i, row in enumerate(reader):
            if limit is not None and i >= limit:
                break
            ts = int(row["time_ms"])
            while heap and heap[0][0] <= ts:
                yield heapq.heappop(heap)[2]
            for ev in _row_events(i, row, ts):
                if ev.ts_ms == ts:
                    yield ev
                else:
                    heapq.heappush(heap, (ev.ts_ms, next(seq), ev))
    while heap:
        yield heapq.heappop(heap)[2]


def _row_events(i: int, row: dict[str, str], ts: int) -> list[Event]:
    user, room = f"ku{row['user_id']}", f"kv{row['video_id']}"
    imp_id = f"kr{i}"
    out: list[Event] = [Impression(
        event_id=imp_id, request_id=imp_id, user_id=user, room_id=room, author_id="", position=0, ts_ms=ts,
        hour=int(row["hourmin"]) // 100 % 24, device="", tab=f"t{row['tab']}",
    )]

    def eng(suffix: str, kind: EngagementKind, delay_ms: int, **extra: float) -> None:
        out.append(Engagement(event_id=f"{imp_id}{suffix}", user_id=user, room_id=room, kind=kind,
                              ts_ms=ts + delay_ms, **extra))

    clicked = row["is_click"] == "1"
    if clicked:
        eng("e", EngagementKind.ENTER, 500)
    if row["is_like"] == "1":
        eng("l", EngagementKind.LIKE, 1000)
    if row["is_follow"] == "1":
        eng("f", EngagementKind.FOLLOW, 1000)
    if row["is_comment"] == "1":
        eng("c", EngagementKind.COMMENT, 1000)
    if clicked and int(row["play_time_ms"]) > 0:
        eng("w", EngagementKind.WATCH, 1500, watch_seconds=int(row["play_time_ms"]) / 1000)
    return out
