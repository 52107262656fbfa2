"""Typed event records, their wire format, and validation.

Wire format: one JSON object per Kafka message (orjson), with an explicit schema version ``v`` and a
``type`` tag. JSON rather than a binary schema because producers on a live platform are many and varied;
decoding is validated field by field so a bad producer is told exactly what is wrong.

>>> imp = Impression(event_id="e1", request_id="r1", user_id="u1", room_id="r9", author_id="a3",
...                  position=0, ts_ms=1_700_000_000_000, hour=20, device="ios", tab="live")
>>> decode_event(encode_event(imp)) == imp
True
>>> decode_event(b'{"v":1,"type":"engagement","event_id":"x"}')
Traceback (most recent call last):
...
stream.events.MalformedEvent: engagement: missing field 'user_id'
"""

from __future__ import annotations

import enum
import math
import re
import time
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar

import orjson

SCHEMA_VERSION = 1


class RejectCode(enum.StrEnum):
    """Why a record was refused, in a few fixed words (a metric label; the reason text has the details)."""

    EMPTY = "empty"
    OVERSIZED = "oversized"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    SCHEMA_VERSION = "schema_version"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"
    FUTURE_TIME = "future_time"
    TOO_OLD = "too_old"
    BEHIND_STREAM = "behind_stream_time"


class MalformedEvent(ValueError):
    """Raised with a human-readable reason; the stream sends the raw bytes and this reason to dead letters."""

    def __init__(self, reason: str, code: RejectCode = RejectCode.BAD_FIELD) -> None:
        super().__init__(reason)
        self.code = code


class EngagementKind(enum.StrEnum):
    ENTER = "enter"
    WATCH = "watch"  # carries watch_seconds
    LIKE = "like"
    COMMENT = "comment"
    FOLLOW = "follow"
    GIFT = "gift"  # carries gift_value


class LiveAction(enum.StrEnum):
    START = "start"
    END = "end"


@dataclass(frozen=True, slots=True)
class Impression:
    """A live room shown to a user. The sample for it is labelled by engagements within the window."""

    TYPE: ClassVar[str] = "impression"
    event_id: str
    request_id: str
    user_id: str
    room_id: str
    author_id: str
    position: int
    ts_ms: int
    hour: int
    device: str
    tab: str
    category: str = ""


@dataclass(frozen=True, slots=True)
class Engagement:
    TYPE: ClassVar[str] = "engagement"
    event_id: str
    user_id: str
    room_id: str
    kind: EngagementKind
    ts_ms: int
    author_id: str = ""
    watch_seconds: float = 0.0
    gift_value: float = 0.0


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """Room lifecycle. Keyed by author id on the wire (rooms have no user)."""

    TYPE: ClassVar[str] = "live"
    event_id: str
    room_id: str
    author_id: str
    action: LiveAction
    ts_ms: int
    category: str = ""
    title: str = ""


Event = Impression | Engagement | LiveEvent
_BY_TYPE: dict[str, type] = {c.TYPE: c for c in (Impression, Engagement, LiveEvent)}
_ENUMS: dict[str, type[enum.Enum]] = {"kind": EngagementKind, "action": LiveAction}
_MIN_TS_MS = 946_684_800_000  # 2000-01-01: older timestamps are unit mistakes (seconds, not ms)
_IDS = frozenset({"event_id", "request_id", "user_id", "room_id", "author_id"})
_REQUIRED_NON_EMPTY = frozenset({"event_id", "user_id", "room_id"})
_FREE_TEXT = frozenset({"title"})
# Ids become Redis key parts and '|'-separated log members (state/store.py): no separators, no whitespace.
_ID_CHARS = re.compile(r"[^|\s\x00-\x1f\x7f]*")
_TEXT_CHARS = re.compile(r"[^|\x00-\x1f\x7f]*")


@dataclass(frozen=True)
class EventLimits:
    """Bounds an event must keep before it may touch state (checked in ``decode_event``).

    Why each exists: a far-future time trims the point-in-time logs and drags stream time and the trainer's
    watermark with it; an event far behind stream time lands in windows that closed long ago; oversized
    strings and payloads cost memory everywhere downstream and cannot even be dead-lettered whole.
    """

    max_message_bytes: int = 64 * 1024
    max_id_chars: int = 128
    max_text_chars: int = 256  # titles and short labels (device, tab, category)
    max_future_skew_ms: int = 5 * 60_000  # ahead of this process's wall clock
    # Behind *stream time* (the worker's watermark), so replays of old logs keep working: their stream
    # time is the log's own. 0 disables it. Default: the point-in-time logs' horizon (StateConfig.asof_keep_ms).
    max_lag_ms: int = 3_600_000
    # Behind the wall clock; for live-only deployments. 0 (default) disables it, so old logs can be replayed.
    max_age_ms: int = 0
    max_position: int = 10_000
    max_watch_s: float = 86_400.0
    max_gift_value: float = 1e9

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_id_chars", "max_text_chars", "max_future_skew_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EventLimits.{name} must be positive, got {getattr(self, name)}")
        if self.max_lag_ms < 0 or self.max_age_ms < 0:
            raise ValueError("EventLimits.max_lag_ms and max_age_ms must be >= 0 (0 disables them)")


DEFAULT_LIMITS = EventLimits()


def encode_event(event: Event) -> bytes:
    body = {"v": SCHEMA_VERSION, "type": event.TYPE, **asdict(event)}
    return orjson.dumps(body)


def decode_event(raw: bytes | str | None, limits: EventLimits = DEFAULT_LIMITS, *, now_ms: int | None = None,
                 stream_ms: int = 0) -> Event:
    """Parse and validate one event; raise ``MalformedEvent`` with the reason.

    ``now_ms``: the wall clock (default: now) for the future-skew and age bounds; ``stream_ms``: the
    consumer's stream time for the lag bound (0: unknown, not checked).
    """
    if raw is None or len(raw) == 0:
        raise MalformedEvent("empty: the message has no value", RejectCode.EMPTY)
    if len(raw) > limits.max_message_bytes:
        raise MalformedEvent(f"oversized: {len(raw)} bytes > max_message_bytes={limits.max_message_bytes}",
                             RejectCode.OVERSIZED)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"not JSON: {exc}", RejectCode.NOT_JSON) from None
    if not isinstance(obj, dict):
        raise MalformedEvent(f"expected a JSON object, got {type(obj).__name__}", RejectCode.NOT_OBJECT)
    if obj.get("v") != SCHEMA_VERSION:
        raise MalformedEvent(f"unsupported schema version {_short(obj.get('v'))} (this build reads v{SCHEMA_VERSION})",
                             RejectCode.SCHEMA_VERSION)
    kind = obj.get("type")
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MalformedEvent(f"unknown event type {_short(kind)}; expected one of {sorted(_BY_TYPE)}",
                             RejectCode.UNKNOWN_TYPE)
    event = cls(**{name: _field(cls.TYPE, name, kind, default, obj, limits) for name, kind, default in _PLANS[cls]})
    _check_time(cls.TYPE, event.ts_ms, limits, int(time.time() * 1000) if now_ms is None else now_ms, stream_ms)
    return event


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _check_time(type_name: str, ts_ms: int, limits: EventLimits, now_ms: int, stream_ms: int) -> None:
    if ts_ms > now_ms + limits.max_future_skew_ms:
        raise MalformedEvent(f"{type_name}: ts_ms={ts_ms} is {(ts_ms - now_ms) / 1000:.0f}s in the future "
                             f"(max_future_skew_ms={limits.max_future_skew_ms})", RejectCode.FUTURE_TIME)
    if limits.max_age_ms and ts_ms < now_ms - limits.max_age_ms:
        raise MalformedEvent(f"{type_name}: ts_ms={ts_ms} is {(now_ms - ts_ms) / 1000:.0f}s old "
                             f"(max_age_ms={limits.max_age_ms})", RejectCode.TOO_OLD)
    if limits.max_lag_ms and stream_ms and ts_ms < stream_ms - limits.max_lag_ms:
        raise MalformedEvent(f"{type_name}: ts_ms={ts_ms} is {(stream_ms - ts_ms) / 1000:.0f}s behind stream time "
                             f"{stream_ms} (max_lag_ms={limits.max_lag_ms})", RejectCode.BEHIND_STREAM)


def _plan(cls: type) -> list[tuple[str, str, Any]]:
    """(name, kind, default) per field, worked out once per event class rather than per message."""
    out = []
    for f in fields(cls):
        kind = "enum" if f.name in _ENUMS else (f.type if isinstance(f.type, str) else f.type.__name__)
        if kind not in ("enum", "str", "int", "float"):
            raise AssertionError(f"unhandled field type {kind} for {f.name}")  # a new field needs a rule here
        out.append((f.name, kind, f.default))
    return out


def _field(type_name: str, name: str, kind: str, default: Any, obj: dict, limits: EventLimits) -> Any:
    if name not in obj:
        if default is not MISSING:
            return default
        raise MalformedEvent(f"{type_name}: missing field {name!r}", RejectCode.MISSING_FIELD)
    value = obj[name]
    if kind == "str":
        return _string(type_name, name, value, limits)
    if kind == "int":
        return _integer(type_name, name, value, limits)
    if kind == "enum":
        try:
            return _ENUMS[name](value)
        except (ValueError, TypeError):
            allowed = [e.value for e in _ENUMS[name]]
            raise MalformedEvent(f"{type_name}: {name}={_short(value)} is not one of {allowed}") from None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise MalformedEvent(f"{type_name}: {name} must be a finite non-negative number, got {_short(value)}")
    cap = limits.max_watch_s if name == "watch_seconds" else limits.max_gift_value
    if value > cap:
        raise MalformedEvent(f"{type_name}: {name}={value} is more than {cap}")
    return float(value)


def _string(type_name: str, name: str, value: Any, limits: EventLimits) -> str:
    if not isinstance(value, str):
        raise MalformedEvent(f"{type_name}: {name} must be a string, got {_short(value)}")
    is_id = name in _IDS
    cap = limits.max_id_chars if is_id else limits.max_text_chars
    if len(value) > cap:
        raise MalformedEvent(f"{type_name}: {name} is {len(value)} chars, more than {cap}")
    if name in _REQUIRED_NON_EMPTY and not value:
        raise MalformedEvent(f"{type_name}: {name} must not be empty")
    allowed = _TEXT_CHARS if name in _FREE_TEXT else _ID_CHARS
    if not allowed.fullmatch(value):
        what = "'|' or control characters" if name in _FREE_TEXT else "'|', whitespace or control characters"
        raise MalformedEvent(f"{type_name}: {name} must not contain {what}, got {_short(value)}")
    return value


def _integer(type_name: str, name: str, value: Any, limits: EventLimits) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedEvent(f"{type_name}: {name} must be an integer, got {_short(value)}")
    if name == "ts_ms" and value < _MIN_TS_MS:
        raise MalformedEvent(f"{type_name}: ts_ms={value} is before 2000; send epoch milliseconds")
    if name == "hour" and not 0 <= value <= 23:
        raise MalformedEvent(f"{type_name}: hour={value} must be in 0..23")
    if name == "position" and not 0 <= value <= limits.max_position:
        raise MalformedEvent(f"{type_name}: position={value} must be in 0..{limits.max_position}")
    return value


_PLANS: dict[type, list[tuple[str, str, Any]]] = {cls: _plan(cls) for cls in _BY_TYPE.values()}
