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
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar

import orjson

SCHEMA_VERSION = 1


class MalformedEvent(ValueError):
    """Raised with a human-readable reason; the stream sends the raw bytes and this reason to dead letters."""


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
_MAX_ID_LEN = 128
_MIN_TS_MS = 946_684_800_000  # 2000-01-01: older timestamps are unit mistakes (seconds, not ms)


def encode_event(event: Event) -> bytes:
    body = {"v": SCHEMA_VERSION, "type": event.TYPE, **asdict(event)}
    return orjson.dumps(body)


def decode_event(raw: bytes | str) -> Event:
    """Parse and validate one event; raise ``MalformedEvent`` with the reason."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedEvent(f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("v") != SCHEMA_VERSION:
        raise MalformedEvent(f"unsupported schema version {obj.get('v')!r} (this build reads v{SCHEMA_VERSION})")
    cls = _BY_TYPE.get(obj.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise MalformedEvent(f"unknown event type {obj.get('type')!r}; expected one of {sorted(_BY_TYPE)}")
    return cls(**{f.name: _field(cls.TYPE, f, obj) for f in fields(cls)})


def _field(type_name: str, f: Any, obj: dict) -> Any:
    if f.name not in obj:
        if f.default is not MISSING:
            return f.default
        raise MalformedEvent(f"{type_name}: missing field {f.name!r}")
    value = obj[f.name]
    if f.name in _ENUMS:
        try:
            return _ENUMS[f.name](value)
        except ValueError:
            allowed = [e.value for e in _ENUMS[f.name]]
            raise MalformedEvent(f"{type_name}: {f.name}={value!r} is not one of {allowed}") from None
    expected = f.type if isinstance(f.type, str) else f.type.__name__
    if expected == "str":
        if not isinstance(value, str) or len(value) > _MAX_ID_LEN:
            raise MalformedEvent(f"{type_name}: {f.name} must be a string of at most {_MAX_ID_LEN} chars")
        if f.name in ("event_id", "user_id", "room_id") and not value:
            raise MalformedEvent(f"{type_name}: {f.name} must not be empty")
        return value
    if expected == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise MalformedEvent(f"{type_name}: {f.name} must be an integer, got {value!r}")
        if f.name == "ts_ms" and value < _MIN_TS_MS:
            raise MalformedEvent(f"{type_name}: ts_ms={value} is before 2000; send epoch milliseconds")
        if f.name == "hour" and not 0 <= value <= 23:
            raise MalformedEvent(f"{type_name}: hour={value} must be in 0..23")
        if f.name == "position" and value < 0:
            raise MalformedEvent(f"{type_name}: position must be >= 0")
        return value
    if expected == "float":
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0 or value != value:
            raise MalformedEvent(f"{type_name}: {f.name} must be a non-negative number, got {value!r}")
        return float(value)
    raise AssertionError(f"unhandled field type {expected} for {f.name}")  # a new field needs a rule here
