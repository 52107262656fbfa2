"""A poison corpus for the stream worker: malformed, hostile and out-of-bounds records of many kinds.

``corpus(now_ms, stream_ms)`` builds the records; ``run_poison`` produces them to the real input topics of a
running worker (after a valid warm-up whose samples prove the worker is live), then checks that each one
is in the dead-letter topic with a reason and its source coordinates, that Redis holds exactly what it
held before, that stream time did not move, and that the worker still processes valid events afterwards.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

import orjson


@dataclass(frozen=True)
class Poison:
    kind: str
    topic: str  # "impression" | "engagement" | "live": which input topic it is sent to
    value: bytes | None
    reason: str  # a fragment the dead letter's x-reason must contain
    key: bytes = b"u-poison"


def _impression(ts_ms: int, **over: object) -> dict:
    base = {"v": 1, "type": "impression", "event_id": "p-imp", "request_id": "q", "user_id": "u-poison",
            "room_id": "r-poison", "author_id": "a-poison", "position": 0, "ts_ms": ts_ms, "hour": 1,
            "device": "ios", "tab": "live"}
    return {**base, **over}


def _engagement(ts_ms: int, **over: object) -> dict:
    base = {"v": 1, "type": "engagement", "event_id": "p-eng", "user_id": "u-poison", "room_id": "r-poison",
            "kind": "watch", "ts_ms": ts_ms, "watch_seconds": 3.0}
    return {**base, **over}


def _j(obj: object) -> bytes:
    return orjson.dumps(obj)


def corpus(now_ms: int, stream_ms: int, max_message_bytes: int = 64 * 1024) -> list[Poison]:
    """At least 15 kinds; ``stream_ms``: the worker's stream time (for the one that is too far behind it)."""
    year_3000 = 32_503_680_000_000
    imp, eng = _impression, _engagement
    without_user = {k: v for k, v in imp(now_ms).items() if k != "user_id"}
    return [
        Poison("bad JSON", "impression", b'{"v": 1, "type": "impression", ', "not JSON"),
        Poison("empty value", "impression", b"", "empty"),
        Poison("null value (tombstone)", "engagement", None, "empty"),
        Poison("binary", "engagement", bytes(range(256)), "not JSON"),
        Poison("bad UTF-8", "impression", _j(imp(now_ms, event_id="X"))
               .replace(b'"X"', b'"\xff\xfe"'), "not JSON"),
        Poison("JSON array", "impression", b"[1, 2, 3]", "expected a JSON object"),
        Poison("schema version", "impression", _j(imp(now_ms, v=2)), "unsupported schema version"),
        Poison("unknown type", "engagement", _j({**eng(now_ms), "type": "purchase"}), "unknown event type"),
        Poison("missing field", "impression", _j(without_user), "missing field 'user_id'"),
        Poison("wrong type", "impression", _j(imp(now_ms, position="3")), "position must be an integer"),
        Poison("bool as int", "impression", _j(imp(now_ms, hour=True)), "hour must be an integer"),
        Poison("float time", "engagement", _j(eng(now_ms + 0.5)), "ts_ms must be an integer"),
        Poison("negative time", "impression", _j(imp(-5)), "before 2000"),
        Poison("seconds not ms", "engagement", _j(eng(now_ms // 1000)), "before 2000"),
        Poison("far-future time", "impression", _j(imp(year_3000)), "in the future"),
        Poison("far-future engagement", "engagement", _j(eng(year_3000)), "in the future"),
        Poison("behind stream time", "engagement", _j(eng(stream_ms - 3 * 3_600_000)), "behind stream time"),
        Poison("huge integer", "impression", _j(imp(now_ms)).replace(str(now_ms).encode(), b"1" * 40),
               "ts_ms must be an integer"),
        Poison("non-finite number", "engagement", _j(eng(now_ms)).replace(b"3.0", b"1e999"), "not JSON"),
        Poison("NaN literal", "engagement", _j(eng(now_ms)).replace(b"3.0", b"NaN"), "not JSON"),
        Poison("negative amount", "engagement", _j(eng(now_ms, watch_seconds=-1.0)), "non-negative"),
        Poison("absurd amount", "engagement", _j(eng(now_ms, kind="gift", gift_value=1e300)), "more than"),
        Poison("unknown kind", "engagement", _j(eng(now_ms, kind="hug")), "is not one of"),
        Poison("unknown live action", "live", _j({"v": 1, "type": "live", "event_id": "p-live",
                                                  "room_id": "r-poison", "author_id": "a-poison",
                                                  "action": "pause", "ts_ms": now_ms}), "is not one of"),
        Poison("hour out of range", "impression", _j(imp(now_ms, hour=25)), "must be in 0..23"),
        Poison("empty id", "engagement", _j(eng(now_ms, user_id="")), "must not be empty"),
        Poison("overlong id", "impression", _j(imp(now_ms, room_id="r" * 500)), "more than 128"),
        Poison("separator in id", "engagement", _j(eng(now_ms, room_id="r|1|x")), "must not contain"),
        Poison("control char in id", "impression", _j(imp(now_ms, user_id="u\n1")), "must not contain"),
        Poison("oversized", "live", _j({"v": 1, "type": "live", "event_id": "p-big", "room_id": "r-poison",
                                        "author_id": "a-poison", "action": "start", "ts_ms": now_ms,
                                        "title": "x" * 900_000}), "oversized"),
        Poison("just over the size limit", "impression",
               _j(imp(now_ms, tab="t" * (max_message_bytes + 10))), "oversized"),
    ]


@dataclass
class PoisonReport:
    kinds: int = 0
    produced: int = 0
    dead_lettered: int = 0
    with_reason: int = 0
    with_source: int = 0
    truncated: int = 0
    missing: list[str] = field(default_factory=list)
    wrong_reason: list[str] = field(default_factory=list)
    state_changed: bool = False
    watermark_before: float = 0.0
    watermark_after: float = 0.0
    worker_alive: bool = False
    valid_after: bool = False

    @property
    def ok(self) -> bool:
        return (self.dead_lettered == self.produced and not self.missing and not self.wrong_reason
                and not self.state_changed and self.watermark_before == self.watermark_after
                and self.worker_alive and self.valid_after)


def state_dump(redis_url: str, prefix: str = "zl:") -> dict[bytes, bytes]:
    """Every key of the state and its serialized value (TTL aside): equal dumps mean equal state."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return {k: client.dump(k) or b"" for k in client.scan_iter(match=f"{prefix}*", count=1000)}
    finally:
        client.close()


def scrape_watermark(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    for line in text.splitlines():
        if line.startswith("zenith_stream_watermark_ms "):
            return float(line.split()[1])
    return float("nan")


def produce_poison(bootstrap: str, topics: object, items: list[Poison]) -> dict[tuple[str, int, int], Poison]:
    """Send each record; returns (topic, partition, offset) -> what was sent there."""
    from confluent_kafka import Producer

    by_name = {"impression": topics.impression, "engagement": topics.engagement,  # type: ignore[attr-defined]
               "live": topics.live}  # type: ignore[attr-defined]
    p = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 2_000_000, "partitioner": "murmur2_random"})
    placed: dict[tuple[str, int, int], Poison] = {}
    errors: list[str] = []

    def on_delivery(item: Poison):  # noqa: ANN202
        def cb(err: object, msg: object) -> None:
            if err is not None:
                errors.append(f"{item.kind}: {err}")
            else:
                placed[(msg.topic(), msg.partition(), msg.offset())] = item  # type: ignore[attr-defined]
        return cb

    for item in items:
        p.produce(by_name[item.topic], value=item.value, key=item.key, on_delivery=on_delivery(item))
    p.flush(60)
    if errors or len(placed) != len(items):
        raise RuntimeError(f"poison records not delivered: {errors or len(items) - len(placed)}")
    return placed


def check_dead_letters(letters: list[tuple[bytes | None, dict]], placed: dict[tuple[str, int, int], Poison],
                       max_message_bytes: int) -> PoisonReport:
    report = PoisonReport(kinds=len({p.kind for p in placed.values()}), produced=len(placed))
    seen: set[tuple[str, int, int]] = set()
    for value, headers in letters:
        try:
            where = (headers["x-source-topic"].decode(), int(headers["x-source-partition"]),
                     int(headers["x-source-offset"]))
        except (KeyError, ValueError):
            continue
        report.with_source += 1
        item = placed.get(where)
        if item is None:
            continue
        seen.add(where)
        reason = headers.get("x-reason", b"").decode()
        report.with_reason += bool(reason)
        if item.reason not in reason:
            report.wrong_reason.append(f"{item.kind}: {reason[:120]!r} lacks {item.reason!r}")
        if headers.get("x-truncated") == b"true":
            report.truncated += 1
            if len(value or b"") > 8192:
                report.wrong_reason.append(f"{item.kind}: truncated copy still {len(value or b'')} bytes")
        elif (value or b"") != (item.value or b""):
            report.wrong_reason.append(f"{item.kind}: dead letter is not the original bytes")
    report.dead_lettered = len(seen)
    report.missing = sorted(p.kind for w, p in placed.items() if w not in seen)
    return report
